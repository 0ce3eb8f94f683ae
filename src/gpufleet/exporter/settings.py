"""Settings of ``gpufleet exporter``: ``GPU_EXPORTER_*`` variables, flags on top.

The exporter's own variables carry the ``GPU_EXPORTER_`` prefix, so a pod that
also runs the inventory agent cannot mix up `INTERVAL`-like names. The shared
ones keep their names: ``NODE_NAME`` (the downward API), ``KUBECONFIG``,
``KUBERNETES_SERVICE_HOST``, ``QPS``, ``BURST``, ``LOG_LEVEL``, ``LOG_FORMAT``.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from gpufleet.core.config import CaseInsensitiveEnum, CommonSettings, Duration
from gpufleet.exporter.metrics import DEFAULT_PROCESS_LABELS, PROCESS_LABEL_CHOICES
from gpufleet.exporter.podmap.podresources import DEFAULT_SOCKET
from gpufleet.kube.settings import KubeSettings

__all__ = ["MIN_INTERVAL", "SERVICE_ACCOUNT_TOKEN", "ExporterSettings", "K8sMode"]

MIN_INTERVAL = 0.25
"""Collecting more often than this only burns the node's CPU and NVML's."""
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class K8sMode(CaseInsensitiveEnum):
    """Whether to attribute processes to pods through the Kubernetes API."""

    AUTO = "auto"
    """On when a service-account token is mounted or ``KUBERNETES_SERVICE_HOST`` is set."""
    ON = "on"
    OFF = "off"


def _names(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip().lower() for part in value.split(",") if part.strip())
    return value


def _env(name: str) -> str:
    return f"GPU_EXPORTER_{name.upper()}"


class ExporterSettings(CommonSettings, KubeSettings):
    """Everything ``gpufleet exporter`` reads from the environment or its flags."""

    node_name: str = Field(default_factory=socket.gethostname, min_length=1)
    simulate: str | None = Field(default=None, validation_alias=_env("simulate"))
    interval: Duration = Field(default=5.0, validation_alias=_env("interval"))
    bind_address: str = Field(
        default="0.0.0.0", min_length=1, validation_alias=_env("bind_address")
    )
    port: int = Field(default=9400, ge=0, le=65535, validation_alias=_env("port"))
    tls_cert_file: Path | None = Field(default=None, validation_alias=_env("tls_cert_file"))
    tls_key_file: Path | None = Field(default=None, validation_alias=_env("tls_key_file"))
    tls_client_ca_file: Path | None = Field(
        default=None, validation_alias=_env("tls_client_ca_file")
    )
    host_proc: Path | None = Field(default=None, validation_alias=_env("host_proc"))
    k8s: K8sMode = Field(default=K8sMode.AUTO, validation_alias=_env("k8s"))
    process_labels: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_names)] = Field(
        default=DEFAULT_PROCESS_LABELS, validation_alias=_env("process_labels")
    )
    process_info: bool = Field(default=False, validation_alias=_env("process_info"))
    pod_label_allowlist: str | None = Field(
        default=None, validation_alias=_env("pod_label_allowlist")
    )
    max_series: int = Field(default=50_000, ge=1, validation_alias=_env("max_series"))
    podresources_socket: Path = Field(
        default=DEFAULT_SOCKET, validation_alias=_env("podresources_socket")
    )
    podresources_ttl: Duration = Field(default=10.0, validation_alias=_env("podresources_ttl"))
    podresources_max_age: Duration = Field(
        default=120.0, ge=0, validation_alias=_env("podresources_max_age")
    )
    docker_root: Path = Field(default=Path("/var/lib/docker"), validation_alias=_env("docker_root"))
    rediscover_interval: Duration = Field(
        default=60.0, gt=0, validation_alias=_env("rediscover_interval")
    )

    @field_validator("interval")
    @classmethod
    def _not_too_often(cls, value: float) -> float:
        if value < MIN_INTERVAL:
            raise ValueError(f"must be at least {MIN_INTERVAL}s")
        return value

    @field_validator("process_labels")
    @classmethod
    def _known_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in PROCESS_LABEL_CHOICES]
        if unknown:
            raise ValueError(
                f"unknown label(s) {', '.join(unknown)}; "
                f"choose from {', '.join(PROCESS_LABEL_CHOICES)}"
            )
        if len(set(value)) != len(value):
            raise ValueError("names a label twice")
        return value

    @field_validator("pod_label_allowlist")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ExporterSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "GPU_EXPORTER_TLS_CERT_FILE and GPU_EXPORTER_TLS_KEY_FILE go together: "
                "set both or neither"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("GPU_EXPORTER_TLS_CLIENT_CA_FILE needs a server certificate and key")
        return self

    @property
    def label_allowlist(self) -> re.Pattern[str] | None:
        """The compiled `pod_label_allowlist`."""
        return None if self.pod_label_allowlist is None else re.compile(self.pod_label_allowlist)

    def k8s_enabled(self, token: Path = SERVICE_ACCOUNT_TOKEN) -> bool:
        """Whether to use the API: the flag, or in AUTO whether we run in a pod."""
        if self.k8s is not K8sMode.AUTO:
            return self.k8s is K8sMode.ON
        return bool(self.kubernetes_service_host) or token.exists()
