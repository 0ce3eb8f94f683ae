"""Settings of ``gpufleet cache node``: the environment first, flags on top.

The node process runs as a DaemonSet pod; its manifest sets ``NODE_NAME`` from the downward
API. Every other value has a default that matches the kubelet's standard paths, so the
DaemonSet of the ``kcache`` overlay needs no flags.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr, field_validator

from gpufleet.core.config import CommonSettings, Duration, NonBlank
from gpufleet.kube.settings import KubeSettings

__all__ = [
    "DEFAULT_CSI_ENDPOINT",
    "DEFAULT_KUBELET_DIR",
    "DEFAULT_STORE",
    "MAX_SOCKET_PATH",
    "NodeSettings",
    "parse_bytes",
    "socket_path",
]

DEFAULT_CSI_ENDPOINT = "unix:///var/lib/kubelet/plugins/csi-gkm/csi.sock"
DEFAULT_KUBELET_DIR = Path("/var/lib/kubelet")
DEFAULT_STORE = Path("/var/lib/gpufleet/kcache")
MAX_SOCKET_PATH = 107
"""The longest unix socket path Linux takes (``sun_path`` is 108 bytes with its NUL)."""

_UNITS = {
    "": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}  # fmt: skip
_BYTES = re.compile(r"(\d+)\s*([kmgt]i?)?b?", re.IGNORECASE)


def parse_bytes(value: object) -> object:
    """``50Gi``, ``500M``, ``1073741824`` → bytes; other input is left for pydantic to refuse."""
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        match = _BYTES.fullmatch(text)
        if match is None:
            raise ValueError("expected a byte count such as 50Gi, 500M or 1073741824")
        return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    return value


def socket_path(endpoint: str) -> Path:
    """The path of a ``unix:///path`` endpoint (``unix:/path`` too, as gRPC writes it)."""
    if endpoint.startswith("unix://"):
        path = endpoint.removeprefix("unix://")
    elif endpoint.startswith("unix:"):
        path = endpoint.removeprefix("unix:")
    else:
        raise ValueError("expected unix:///absolute/path (the kubelet talks to CSI over a socket)")
    if not path.startswith("/"):
        raise ValueError("expected unix:///absolute/path: the path must be absolute")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"the socket path is longer than the {MAX_SOCKET_PATH} bytes Linux takes")
    return Path(path)


class NodeSettings(CommonSettings, KubeSettings):
    """Everything ``gpufleet cache node`` reads from its environment or flags."""

    node_name: NonBlank = Field(
        description="This node's name, from the downward API (spec.nodeName); required"
    )
    csi_endpoint: str = Field(
        default=DEFAULT_CSI_ENDPOINT,
        description="The CSI socket the kubelet (and the node-driver-registrar) connects to",
    )
    kubelet_dir: Path = Field(
        default=DEFAULT_KUBELET_DIR,
        description="The kubelet's root directory: publish targets must lie under its pods/",
    )
    kcache_store: Path = Field(
        default=DEFAULT_STORE, description="The node's content-addressed store of extracted caches"
    )
    kcache_store_max_bytes: Annotated[int | None, BeforeValidator(parse_bytes)] = Field(
        default=None,
        ge=1,
        description="Disk budget of the store (50Gi, 500M, bytes); unmounted caches are "
        "evicted least recently used first; unset: no budget",
    )
    kcache_simulate: str | None = Field(
        default=None,
        description="Read simulated GPUs of this preset instead of NVML (kind, tests)",
    )
    metrics_port: int = Field(
        default=8084, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz"
    )
    kcache_gc_interval: Duration = Field(
        default=300.0, gt=0, description="How often the store is collected besides after changes"
    )
    kcache_deadline: Duration = Field(
        default=30 * 60.0, gt=0, description="The longest one pull of an image may take in all"
    )
    kcache_max_bytes: Annotated[int, BeforeValidator(parse_bytes)] = Field(
        default=8 * 2**30, ge=1, description="Refuse caches larger than this (extracted bytes)"
    )
    kcache_max_config_bytes: int = Field(
        default=4 * 1024**2, ge=1, description="Refuse image configs larger than this"
    )
    kcache_plain_http: bool = Field(
        default=False,
        description="Pull over plain HTTP from every registry (loopback ones always are)",
    )
    kcache_retry_max: Duration = Field(
        default=300.0, gt=0, description="The longest wait between two tries of a failed pull"
    )
    registry_username: str | None = Field(
        default=None, description="Registry user name (else DOCKER_CONFIG's config.json)"
    )
    registry_password: SecretStr | None = Field(default=None, description="Registry password")

    @field_validator("csi_endpoint")
    @classmethod
    def _unix_socket(cls, value: str) -> str:
        socket_path(value.strip())
        return value.strip()

    @field_validator("kubelet_dir", "kcache_store")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @property
    def csi_socket(self) -> Path:
        """The CSI socket's path."""
        return socket_path(self.csi_endpoint)
