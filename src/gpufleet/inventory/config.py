"""Settings of the inventory commands, from the environment (gpuid's names) and flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import NoDecode

from gpufleet.core.config import CommonSettings, Duration
from gpufleet.inventory.exporters.base import ExporterType
from gpufleet.inventory.spool import FullPolicy


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


class HistorySettings(CommonSettings):
    """``gpufleet inventory history``: query the SQLite inventory."""

    sqlite_path: Path = Path("gpufleet-inventory.db")


class ScanSettings(DeliverySettings, HistorySettings):
    """``gpufleet inventory scan``: read this machine's GPUs once and export them."""

    cluster_name: str = Field(min_length=1)
    node_name: str = Field(default_factory=socket.gethostname, min_length=1)
    machine_id: str | None = None
    exporter_type: ExporterTypes = ("stdout",)
    dmi_dir: Path = Path("/sys/class/dmi/id")
