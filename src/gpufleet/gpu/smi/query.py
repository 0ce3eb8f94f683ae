"""Read ``nvidia-smi --query-gpu=... --format=csv`` output into the GPU model.

The CSV query is what to run where XML is too heavy: one line per GPU, only the
identity fields. Both ``--format=csv,noheader`` ("81559 MiB") and
``--format=csv,noheader,nounits`` ("81559") are read; a header line, if present,
is skipped.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence

from gpufleet.gpu.model import GpuDevice
from gpufleet.gpu.smi._values import (
    SmiParseError,
    present,
    to_bool,
    to_bytes,
    to_compute_capability,
    to_int,
)

DEFAULT_QUERY_FIELDS: tuple[str, ...] = (
    "index",
    "uuid",
    "serial",
    "name",
    "pci.bus_id",
    "vbios_version",
    "memory.total",
    "driver_version",
    "compute_cap",
    "mig.mode.current",
)
"""The ``--query-gpu`` fields that fill a :class:`GpuDevice` (every driver since R510 has them).

``module_id`` is read when asked for, but left out by default: drivers that do not
know a field refuse the whole query.
"""

# nvidia-smi accepts several names for some fields (see `nvidia-smi --help-query-gpu`).
_ALIASES = {
    "gpu_uuid": "uuid",
    "gpu_serial": "serial",
    "gpu_name": "name",
    "gpu_bus_id": "pci.bus_id",
}
_REQUIRED = ("uuid", "name", "pci.bus_id")


def smi_query_command(fields: Sequence[str] = DEFAULT_QUERY_FIELDS) -> tuple[str, ...]:
    """The argv that produces what :func:`parse_smi_csv` reads for ``fields``."""
    return ("nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")


def parse_smi_csv(
    text: str, fields: Sequence[str] = DEFAULT_QUERY_FIELDS, *, origin: str = "<input>"
) -> tuple[GpuDevice, ...]:
    """Parse ``--query-gpu`` CSV output whose columns are ``fields``, in that order.

    ``fields`` must include ``uuid``, ``name`` and ``pci.bus_id``; unknown fields
    are read past. The index comes from an ``index`` column, else from the line's
    position. Raises :class:`SmiParseError` naming ``origin`` and the line for a
    wrong column count or an unreadable value.
    """
    names = [_ALIASES.get(f.strip().lower(), f.strip().lower()) for f in fields]
    missing = [name for name in _REQUIRED if name not in names]
    if missing:
        raise ValueError(f"CSV query fields must include {', '.join(missing)}")
    rows = [
        (number, row)
        for number, row in enumerate(csv.reader(text.splitlines(), skipinitialspace=True), 1)
        if any(cell.strip() for cell in row)
    ]
    if rows and rows[0][1] and rows[0][1][0].strip().lower().startswith(names[0]):
        rows = rows[1:]
    devices: list[GpuDevice] = []
    for position, (number, row) in enumerate(rows):
        where = f"{origin}: line {number}"
        if len(row) != len(names):
            raise SmiParseError(f"{where}: expected {len(names)} columns, got {len(row)}")
        devices.append(_device(dict(zip(names, row, strict=True)), position, where))
    return tuple(devices)


def _device(cells: dict[str, str], position: int, where: str) -> GpuDevice:
    def cell(name: str) -> str | None:
        return present(cells.get(name))

    def at(name: str) -> str:
        return f"{where} column {name}"

    uuid = cell("uuid")
    if uuid is None:
        raise SmiParseError(f"{where}: GPU has no uuid")
    index = to_int(cell("index"), frozenset(), at("index"))
    return GpuDevice(
        index=position if index is None else index,
        uuid=uuid,
        serial=cell("serial"),
        product_name=cell("name") or "",
        pci_bus_id=(cell("pci.bus_id") or "").upper(),
        compute_capability=to_compute_capability(cell("compute_cap"), at("compute_cap")),
        vbios_version=cell("vbios_version"),
        memory_total_bytes=to_bytes(cell("memory.total"), at("memory.total")),
        driver_version=cell("driver_version"),
        mig_mode=to_bool(cell("mig.mode.current"), at("mig.mode.current")),
        module_id=to_int(cell("module_id"), frozenset(), at("module_id")),
    )
