"""Settings of the inventory commands, from the environment (gpuid's names) and flags."""

from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from gpufleet.core.config import CommonSettings, Duration, NonBlank
from gpufleet.core.retry import Backoff
from gpufleet.inventory.exporters.base import ExporterType
from gpufleet.inventory.spool import FullPolicy
from gpufleet.kube.settings import KubeSettings, LeaseSettings


def _split_names(value: object) -> object:
    # EXPORTER_TYPE=stdout,sqlite names several sinks; a flag may be repeated.
    if isinstance(value, str):
        return tuple(part.strip().lower() for part in value.split(",") if part.strip())
    if isinstance(value, list | tuple):
        names: list[str] = []
        for item in value:
            names.extend(part.strip().lower() for part in str(item).split(",") if part.strip())
        return tuple(names)
    return value


ExporterTypes = Annotated[
    tuple[ExporterType, ...], NoDecode, BeforeValidator(_split_names), Field(min_length=1)
]


def default_spool_dir() -> Path:
    """``$XDG_STATE_HOME/gpufleet/spool`` (``~/.local/state/gpufleet/spool``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "gpufleet" / "spool"


class DeliverySettings(CommonSettings):
    """How readings reach remote exporters (postgres, s3, http): batches and the spool."""

    batch_size: int = Field(default=500, ge=1, le=100_000)
    flush_interval: Duration = 2.0
    spool_dir: Path = Field(default_factory=default_spool_dir)
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    spool_full_policy: FullPolicy = FullPolicy.REJECT_NEW
    delivery_timeout: Duration = 30.0
    retry_max_backoff: Duration = Field(default=30.0, gt=0)
    # A batch past either limit is dead-lettered once the exporter takes the
    # batch behind it; 0 turns a limit off.
    retry_max_attempts: int = Field(default=20, ge=0)
    retry_max_age: Duration = Field(default=3600.0, ge=0)


class HistorySettings(CommonSettings):
    """``gpufleet inventory history``: query the SQLite inventory."""

    sqlite_path: Path = Path("gpufleet-inventory.db")


class ExportSettings(DeliverySettings, HistorySettings):
    """Where readings go: the exporters, their cluster, and the delivery knobs."""

    cluster_name: NonBlank
    exporter_type: ExporterTypes = ("stdout",)


class ScanSettings(ExportSettings):
    """``gpufleet inventory scan``: read this machine's GPUs once and export them."""

    node_name: NonBlank = Field(default_factory=socket.gethostname)
    machine_id: str | None = None
    dmi_dir: Path = Path("/sys/class/dmi/id")


class ServerSettings(CommonSettings):
    """Long-running commands serve /metrics, /healthz and /readyz here."""

    server_port: int = Field(default=8080, ge=0, le=65535)


class PodWatchSettings(ExportSettings, ServerSettings, KubeSettings, LeaseSettings):
    """The controller and check mode: which pods to watch and how to work on them."""

    namespace: str = Field(default="gpu-operator", min_length=1)
    label_selector: str = "app=nvidia-device-plugin-daemonset"
    container: str = Field(default="nvidia-device-plugin", min_length=1)
    workers: int = Field(default=16, ge=1, le=100)
    timeout: Duration = Field(default=30.0, gt=0, le=600)
    resync: Duration = 0.0
    max_retries: int = Field(default=5, ge=0, le=100)
    pod_retry_backoff: Duration = Field(default=1.0, gt=0)
    pod_retry_max_backoff: Duration = Field(default=30.0, gt=0)

    @field_validator("pod_retry_max_backoff")
    @classmethod
    def _cap_covers_initial(cls, cap: float, info: ValidationInfo) -> float:
        initial = info.data.get("pod_retry_backoff")  # validated first (or reported alone)
        if isinstance(initial, float) and cap < initial:
            raise ValueError(f"must be >= POD_RETRY_BACKOFF ({initial:g}s)")
        return cap

    @property
    def pod_backoff(self) -> Backoff:
        """A failed pod's wait before retry n: the initial step doubled n times, capped."""
        return Backoff(
            initial=self.pod_retry_backoff, factor=2.0, cap=self.pod_retry_max_backoff,
            jitter=0.5,
        )  # fmt: skip


class ControllerSettings(PodWatchSettings):
    """``gpufleet inventory controller``: nvidia-smi in every device-plugin pod."""

    smi_command: str = "nvidia-smi -q -x"
    node_labels: bool = False

    @field_validator("smi_command")
    @classmethod
    def _argv(cls, value: str) -> str:
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split into arguments: {exc}") from None
        if not argv:
            raise ValueError("must name a command")
        return value

    @property
    def smi_argv(self) -> list[str]:
        """The command as argv: it runs without a shell."""
        return shlex.split(self.smi_command)


class CheckSettings(PodWatchSettings):
    """``gpufleet inventory check``: run COMMAND in every matching pod."""

    command: str = Field(min_length=1)
    force_restart: bool = False


class AgentSettings(ExportSettings, ServerSettings, KubeSettings):
    """``gpufleet inventory agent``: a DaemonSet reading its own node's GPUs."""

    node_name: NonBlank
    simulate: str | None = None
    scan_interval: Duration = Field(default=3600.0, gt=0)
    dmi_dir: Path = Path("/sys/class/dmi/id")
