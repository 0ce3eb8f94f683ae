"""Settings of the inventory commands, from the environment (gpuid's names) and flags."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import NoDecode

from gpufleet.core.config import CommonSettings
from gpufleet.inventory.exporters.base import ExporterType


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


class HistorySettings(CommonSettings):
    """``gpufleet inventory history``: query the SQLite inventory."""

    sqlite_path: Path = Path("gpufleet-inventory.db")


class ScanSettings(HistorySettings):
    """``gpufleet inventory scan``: read this machine's GPUs once and export them."""

    cluster_name: str = Field(min_length=1)
    node_name: str = Field(default_factory=socket.gethostname, min_length=1)
    machine_id: str | None = None
    exporter_type: ExporterTypes = ("stdout",)
    dmi_dir: Path = Path("/sys/class/dmi/id")
