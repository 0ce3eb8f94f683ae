"""Settings of ``gpufleet device-api serve``, from the environment and flags.

Listening rules live here, so a bad combination (a non-loopback TCP address
without ``ALLOW_REMOTE`` and TLS) stops start-up with one line before anything
is bound.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from gpufleet.core.config import CommonSettings, Duration
from gpufleet.core.errors import ConfigError

__all__ = [
    "DEFAULT_SOCKET",
    "MAX_MESSAGE_BYTES",
    "MAX_RESPONSE_BYTES",
    "DeviceApiClientSettings",
    "DeviceApiSettings",
    "ListenAddress",
    "list_bytes_bound",
    "parse_listen",
]

DEFAULT_SOCKET = Path("/var/run/gpufleet/device.sock")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""The most bytes of one request."""
# Responses may exceed the 4 MiB request cap: a List of MAX_GPUS GPUs with full
# condition lists is larger, and refusing to send it would break every informer.
# DeviceApiClient receives as much; MAX_STORE_BYTES keeps every List within it.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""The most bytes of one response (and what DeviceApiClient accepts)."""
_LIST_ENTRY_OVERHEAD = 5  # GpuList.items: a tag and the length of an object under 4 MiB
_LIST_FIXED_OVERHEAD = 32  # GpuList.resource_version


def list_bytes_bound(max_store_bytes: int, max_gpus: int) -> int:
    """The largest encoded ``GpuList`` a store within these limits can send."""
    return max_store_bytes + _LIST_ENTRY_OVERHEAD * max_gpus + _LIST_FIXED_OVERHEAD


@dataclass(frozen=True)
class ListenAddress:
    """A parsed ``HOST:PORT``; ``loopback`` is true for 127.0.0.0/8, ::1 and localhost."""

    host: str
    port: int
    loopback: bool

    @property
    def target(self) -> str:
        """The address as gRPC wants it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """Parse ``host:port`` or ``[v6]:port``; ValueError with a user-facing message otherwise."""
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"expected HOST:PORT with a host, got {text!r}")
    if host == "localhost":
        return ListenAddress(host, port, loopback=True)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # A name other than localhost may resolve anywhere: treat it as remote.
        return ListenAddress(host, port, loopback=False)
    return ListenAddress(host, port, loopback=address.is_loopback)


class DeviceApiSettings(CommonSettings):
    """``gpufleet device-api serve``: where to listen, the store's limits, metrics."""

    device_api_socket: Path | None = DEFAULT_SOCKET
    device_api_listen: str | None = None
    allow_remote: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    state_file: Path | None = None
    max_gpus: int = Field(default=4096, ge=1, le=1_000_000)
    max_object_bytes: int = Field(default=256 * 1024, ge=4096, le=MAX_MESSAGE_BYTES)
    max_store_bytes: int = Field(default=48 * 1024 * 1024, ge=4096, le=MAX_RESPONSE_BYTES)
    watch_history: int = Field(default=10_000, ge=1)
    watch_history_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    watch_queue: int = Field(default=1024, ge=1)
    bookmark_interval: Duration = Field(default=30.0, gt=0)
    watch_linger: Duration = Field(default=0.0, ge=0, le=0.05)
    max_streams: int = Field(default=256, ge=1)
    metrics_port: int = Field(default=8081, ge=0, le=65535)
    readiness_gate: bool = True
    shutdown_grace: Duration = 5.0

    @field_validator("device_api_listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        return parse_listen(value).target

    @model_validator(mode="after")
    def _check_sizes(self) -> DeviceApiSettings:
        if self.max_object_bytes > self.max_store_bytes:
            raise ValueError(
                f"MAX_OBJECT_BYTES={self.max_object_bytes} is more than"
                f" MAX_STORE_BYTES={self.max_store_bytes}"
            )
        bound = list_bytes_bound(self.max_store_bytes, self.max_gpus)
        if bound > MAX_RESPONSE_BYTES:
            raise ValueError(
                f"MAX_STORE_BYTES={self.max_store_bytes} with MAX_GPUS={self.max_gpus} allows a"
                f" List of {bound} bytes, more than the {MAX_RESPONSE_BYTES} a response may be;"
                " lower MAX_STORE_BYTES or MAX_GPUS"
            )
        return self

    @property
    def listen(self) -> ListenAddress | None:
        """The parsed TCP address, or None for unix-socket only."""
        return None if self.device_api_listen is None else parse_listen(self.device_api_listen)

    @property
    def tls(self) -> bool:
        """True when a certificate and key are configured."""
        return self.tls_cert is not None and self.tls_key is not None

    def check_listen_policy(self) -> None:
        """Raise ConfigError if TCP would be exposed beyond loopback without consent and TLS.

        Called by `serve` before it binds anything, so a refused configuration
        never listens even for a moment.
        """
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS_CERT and TLS_KEY must be given together")
        if self.device_api_socket is None and self.device_api_listen is None:
            raise ConfigError("nothing to listen on: give DEVICE_API_SOCKET or DEVICE_API_LISTEN")
        listen = self.listen
        if listen is None or listen.loopback:
            return
        if not self.allow_remote:
            raise ConfigError(
                f"DEVICE_API_LISTEN={listen.target} is not a loopback address: "
                "remote access needs --allow-remote (ALLOW_REMOTE=true) and TLS"
            )
        if not self.tls:
            raise ConfigError(
                f"DEVICE_API_LISTEN={listen.target} with ALLOW_REMOTE needs TLS: "
                "give --tls-cert and --tls-key (TLS_CERT, TLS_KEY)"
            )


class DeviceApiClientSettings(CommonSettings):
    """``gpufleet gpus ...``: which server to ask."""

    device_api_socket: Path = DEFAULT_SOCKET
