"""The GPU data model shared by every source and every feature.

All records are frozen: a reading taken from a GPU is a fact about a moment and
must not change after the fact. ``None`` always means "the GPU or driver does not
report this" (NVML ``NotSupported``, nvidia-smi ``N/A``), never zero.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class MigDevice:
    """One MIG instance carved out of a parent GPU."""

    index: int
    uuid: str
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    profile: str | None = None
    """The profile name as NVML and nvidia-smi print it, e.g. ``1g.10gb``."""
    memory_total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """The identity of one physical GPU, as the driver reports it.

    ``serial`` is the board serial. On multi-die boards (GB200) several GPUs share
    one serial, so the physical identity is (chassis_serial, serial, module_id)
    and ``uuid`` is the only per-GPU unique key.
    """

    index: int
    uuid: str
    serial: str | None
    product_name: str
    pci_bus_id: str
    """Canonical form ``DDDDDDDD:BB:DD.F`` in upper case, as NVML prints it."""
    architecture: str | None = None
    """Lower-case name: ``hopper``, ``ampere``, ``ada``, ``blackwell``..."""
    compute_capability: tuple[int, int] | None = None
    board_part_number: str | None = None
    vbios_version: str | None = None
    memory_total_bytes: int | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    """Dotted form, e.g. ``12.4``."""
    mig_mode: bool | None = None
    """Current MIG mode; ``None`` where the GPU has no MIG support."""
    mig_devices: tuple[MigDevice, ...] = ()
    module_id: int | None = None
    chassis_serial: str | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """A point-in-time set of GPU telemetry values. Units are in the names."""

    uuid: str
    gpu_utilization_percent: int | None = None
    memory_utilization_percent: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    temperature_celsius: int | None = None
    power_usage_watts: float | None = None
    power_limit_watts: float | None = None
    clock_sm_mhz: int | None = None
    clock_memory_mhz: int | None = None
    ecc_corrected_total: int | None = None
    ecc_uncorrected_total: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_failure: bool | None = None


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding a context on a GPU (or on one of its MIG instances)."""

    pid: int
    gpu_uuid: str
    used_memory_bytes: int | None = None
    sm_utilization_percent: int | None = None
    mig_uuid: str | None = None
    """Set when the process runs on a MIG instance of ``gpu_uuid``."""


@dataclass(frozen=True, slots=True)
class XidEvent:
    """One XID error reported by the driver for a GPU."""

    gpu_uuid: str
    xid: int
    timestamp: datetime
    """When the event was received, timezone-aware UTC."""


class FaultKind(enum.StrEnum):
    """Why a GPU could not be read."""

    LOST = "lost"
    """NVML says the GPU fell off the bus (``NVMLError_GpuIsLost``)."""
    ERROR = "error"
    """Any other NVML error while reading this GPU's identity."""


@dataclass(frozen=True, slots=True)
class GpuFault:
    """A GPU that is present (it counts in the device count) but cannot be read."""

    index: int
    kind: FaultKind
    message: str
    uuid: str | None = None
    pci_bus_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceList:
    """The result of enumerating the GPUs of one machine.

    A fault on one GPU never hides the others: healthy GPUs are in ``devices``,
    unreadable ones in ``faults``, both ordered by index.
    """

    devices: tuple[GpuDevice, ...] = ()
    faults: tuple[GpuFault, ...] = field(default=())
    driver_version: str | None = None
    cuda_driver_version: str | None = None
