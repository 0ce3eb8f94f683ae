"""The description of a simulated machine: its GPUs, their telemetry and faults.

These records are deliberately mutable: a test (or the injection methods of
``SimulatedNvml``) changes them while the simulated library is being read, the
way a real GPU heats up, gains processes or falls off the bus.

Convention: a value of ``None`` makes the matching NVML call raise
``NVMLError_NotSupported``, exactly as ``None`` in ``gpufleet.gpu.model`` means
"the driver does not report this".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import yaml

from gpufleet.core.errors import ConfigError
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


class FleetFileError(SimError):
    """A fleet description (YAML file or dict) is invalid; the message names the field."""


class UnknownPresetError(SimError, ConfigError):
    """No preset has the requested name: a usage error, so the command exits 2."""


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


_FLEET = pydantic.TypeAdapter(SimFleet)


def fleet_from_dict(data: object, *, origin: str = "<fleet>") -> SimFleet:
    """Build a fleet from a parsed fleet file (see ``gpufleet.gpu.sim`` for the format).

    ``origin`` names the file in error messages.
    """
    # Imported here because presets build fleets with this module's records.
    from gpufleet.gpu.sim.presets import PRESETS, preset

    if not isinstance(data, dict):
        raise FleetFileError(f"{origin}: a fleet file must be a mapping, got {type(data).__name__}")
    if "preset" in data:
        name = data["preset"]
        if name not in PRESETS:
            raise FleetFileError(f"{origin}: preset: unknown preset {name!r} ({_known(PRESETS)})")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FleetFileError(f"{origin}: seed: must be an integer, got {seed!r}")
        base = dataclasses.asdict(preset(name, seed))
        merged = _apply_overrides(base, data, origin)
    else:
        if "seed" in data:
            raise FleetFileError(f"{origin}: seed: only allowed together with preset")
        merged = data
    fleet = _validate(merged, origin)
    _check_consistency(fleet, origin)
    return fleet


def load_fleet(path: str | Path) -> SimFleet:
    """Read a YAML fleet file; raises ``FleetFileError`` naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetFileError(f"{path}: cannot read fleet file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise FleetFileError(
            f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); a fleet file is YAML"
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FleetFileError(f"{path}: not valid YAML: {exc}") from exc
    return fleet_from_dict(data, origin=str(path))


def _apply_overrides(base: dict[str, Any], data: dict[str, Any], origin: str) -> dict[str, Any]:
    merged = dict(base)
    for key, value in data.items():
        if key in ("preset", "seed"):
            continue
        if key != "gpus":
            merged[key] = value
            continue
        if not isinstance(value, dict):
            raise FleetFileError(
                f"{origin}: gpus: with a preset, gpus maps a GPU index to its overrides"
            )
        gpus = list(merged["gpus"])
        for index, overrides in value.items():
            if not isinstance(index, int) or not 0 <= index < len(gpus):
                raise FleetFileError(
                    f"{origin}: gpus.{index}: no GPU with that index (the preset has {len(gpus)})"
                )
            if not isinstance(overrides, dict):
                raise FleetFileError(f"{origin}: gpus.{index}: overrides must be a mapping")
            gpus[index] = {**gpus[index], **overrides}
        merged["gpus"] = gpus
    return merged


def _validate(data: dict[str, Any], origin: str) -> SimFleet:
    try:
        return _FLEET.validate_python(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        unknown = first["type"] == "unexpected_keyword_argument"
        message = "unknown field" if unknown else first["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise FleetFileError(f"{origin}: {where}: {message}{more}") from exc


def _check_consistency(fleet: SimFleet, origin: str) -> None:
    from gpufleet.gpu.sim.library import check_function_names

    seen: set[str] = set()
    for index, gpu in enumerate(fleet.gpus):
        try:
            check_function_names(gpu.unsupported)
            check_function_names(gpu.errors)
        except SimError as exc:
            raise FleetFileError(f"{origin}: gpus.{index}: {exc}") from None
        uuids = [gpu.uuid, *(mig.uuid for mig in gpu.mig_instances)]
        for uuid in uuids:
            if uuid in seen:
                raise FleetFileError(f"{origin}: gpus.{index}.uuid: duplicate UUID {uuid}")
            seen.add(uuid)
        for pos, process in enumerate(gpu.processes):
            mig = process.mig_index
            if mig is not None and not 0 <= mig < len(gpu.mig_instances):
                raise FleetFileError(
                    f"{origin}: gpus.{index}.processes.{pos}.mig_index: "
                    f"no MIG instance {mig} on this GPU"
                )


def _known(names: tuple[str, ...]) -> str:
    return "known: " + ", ".join(names)
