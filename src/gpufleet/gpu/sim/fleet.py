"""The description of a simulated machine: its GPUs, their telemetry and faults.

This is data only: it imports neither the library (``library.py``) nor the
presets (``presets.py``), which both build on it; reading a fleet file, which
needs both, is ``fleetfile.py``'s job.

These records are deliberately mutable: a test (or the injection methods of
``SimulatedNvml``) changes them while the simulated library is being read, the
way a real GPU heats up, gains processes or falls off the bus.

Convention: a value of ``None`` makes the matching NVML call raise
``NVMLError_NotSupported``, exactly as ``None`` in ``gpufleet.gpu.model`` means
"the driver does not report this".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pydantic

from gpufleet.gpu.source import GpuError

Architecture = Literal[
    "kepler",
    "maxwell",
    "pascal",
    "volta",
    "turing",
    "ampere",
    "ada",
    "hopper",
    "blackwell",
]
"""Lower-case architecture names, mapped to ``NVML_DEVICE_ARCH_*`` by the simulator."""

# Unknown keys in a fleet file are mistakes (a typo silently ignored would make
# a test pass for the wrong reason), so every record forbids extras.
_STRICT = pydantic.ConfigDict(extra="forbid")


class SimError(GpuError):
    """The simulator was asked for something it cannot simulate."""


@dataclass
class SimProcess:
    """A compute process holding a context on a simulated GPU."""

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STRICT

    pid: int
    used_memory_bytes: int | None = None
    """``None`` is what NVML reports where usage is unknown (WDDM)."""
    sm_util_percent: int | None = None
    """``None``: no utilization sample for this process (``NVMLError_NotFound``)."""
    mig_index: int | None = None
    """Index into the GPU's ``mig_instances`` when the process runs on a MIG instance."""


@dataclass
class SimMigInstance:
    """One MIG instance (a GPU instance with one compute instance) of a simulated GPU."""

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STRICT

    uuid: str
    profile: str
    """Profile name as NVML prints it in the MIG device name, e.g. ``3g.40gb``."""
    gpu_instance_id: int
    memory_total_bytes: int
    compute_instance_id: int = 0
    memory_used_bytes: int = 0


@dataclass
class SimGpu:
    """One simulated physical GPU.

    Identity fields mirror ``nvidia-smi -q``; telemetry fields are what the
    matching NVML getters return (``None`` makes them raise NotSupported).
    ``unsupported`` names NVML functions (``nvmlDeviceGetSerial``) that raise
    NotSupported on this GPU whatever the fields say, ``errors`` makes named
    functions raise any other NVML error, and ``lost`` makes every call on its
    handles raise ``NVMLError_GpuIsLost``.
    """

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STRICT

    uuid: str
    name: str
    pci_bus_id: str
    serial: str | None = None
    architecture: Architecture | None = None
    compute_capability: tuple[int, int] | None = None
    board_part_number: str | None = None
    vbios_version: str | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int = 0
    module_id: int | None = None
    chassis_serial: str | None = None
    """Set only where NVML has platform info (GB200); ``None`` -> NotSupported."""
    utilization_gpu_percent: int | None = 0
    utilization_memory_percent: int | None = 0
    temperature_celsius: int | None = None
    power_usage_milliwatts: int | None = None
    power_limit_milliwatts: int | None = None
    clock_sm_mhz: int | None = None
    clock_memory_mhz: int | None = None
    ecc_corrected_errors: int | None = None
    """Volatile and aggregate counters report the same value in the simulator."""
    ecc_uncorrected_errors: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    """``None`` makes ``nvmlDeviceGetRemappedRows`` raise NotSupported."""
    remapped_rows_pending: bool = False
    remapped_rows_correctable: int = 0
    remapped_rows_uncorrectable: int = 0
    mig_capable: bool = False
    mig_enabled: bool = False
    max_mig_devices: int = 7
    mig_instances: list[SimMigInstance] = field(default_factory=list)
    processes: list[SimProcess] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)
    """NVML function name -> ``NVML_ERROR_*`` code that the function raises on this GPU."""
    lost: bool = False


@dataclass
class SimFleet:
    """The GPUs of one simulated machine and its driver."""

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STRICT

    driver_version: str
    cuda_driver_version: int
    """As NVML returns it: ``12040`` for CUDA 12.4."""
    gpus: list[SimGpu] = field(default_factory=list)
