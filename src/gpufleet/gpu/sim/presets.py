"""Realistic simulated machines, in the spirit of go-nvml's ``dgxa100`` mock.

Identities (UUIDs, serials) are drawn from a random generator seeded with the
preset name and ``seed``: the same pair always gives the same machine, and a
different seed gives "another machine" of the same kind.
"""

from __future__ import annotations

import random
import uuid as uuid_lib
from dataclasses import dataclass

from gpufleet.core.errors import ConfigError
from gpufleet.gpu.sim.fleet import Architecture, SimError, SimFleet, SimGpu, SimMigInstance

_MIB = 1024 * 1024


class UnknownPresetError(SimError, ConfigError):
    """No preset has the requested name: a usage error, so the command exits 2."""


@dataclass(frozen=True, slots=True)
class _Model:
    """What every board of one product has in common."""

    name: str
    architecture: Architecture
    compute_capability: tuple[int, int]
    board_part_number: str
    vbios_version: str
    memory_mib: int
    power_limit_mw: int
    idle_power_mw: int
    clock_sm_mhz: int
    clock_memory_mhz: int
    serial_prefix: str
    """The leading digits of the 13-digit board serial (they encode the factory lot)."""
    mig_capable: bool


_H100 = _Model(
    name="NVIDIA H100 80GB HBM3",
    architecture="hopper",
    compute_capability=(9, 0),
    board_part_number="692-2G520-0200-000",
    vbios_version="96.00.74.00.0D",
    memory_mib=81559,
    power_limit_mw=700_000,
    idle_power_mw=69_000,
    clock_sm_mhz=345,
    clock_memory_mhz=2619,
    serial_prefix="1654",
    mig_capable=True,
)
_A100 = _Model(
    name="NVIDIA A100-SXM4-80GB",
    architecture="ampere",
    compute_capability=(8, 0),
    board_part_number="692-2G506-0210-002",
    vbios_version="92.00.45.00.06",
    memory_mib=81920,
    power_limit_mw=400_000,
    idle_power_mw=61_000,
    clock_sm_mhz=210,
    clock_memory_mhz=1593,
    serial_prefix="1323",
    mig_capable=True,
)
_GB200 = _Model(
    name="NVIDIA GB200",
    architecture="blackwell",
    compute_capability=(10, 0),
    board_part_number="699-2G548-1200-A00",
    vbios_version="97.00.82.00.11",
    memory_mib=189471,
    power_limit_mw=1_200_000,
    idle_power_mw=155_000,
    clock_sm_mhz=780,
    clock_memory_mhz=3996,
    serial_prefix="1791",
    mig_capable=True,
)
_L4 = _Model(
    name="NVIDIA L4",
    architecture="ada",
    compute_capability=(8, 9),
    board_part_number="900-2G193-0000-001",
    vbios_version="95.04.29.00.06",
    memory_mib=23034,
    power_limit_mw=72_000,
    idle_power_mw=16_000,
    clock_sm_mhz=210,
    clock_memory_mhz=405,
    serial_prefix="1322",
    mig_capable=False,
)

# PCI bus ids as they appear on the real machines, in NVML index order.
_DGX_H100_BUS_IDS = ("18", "2A", "3A", "5D", "9A", "AB", "BA", "DB")
_DGX_A100_BUS_IDS = ("07", "0F", "47", "4E", "87", "90", "B7", "BD")
_GB200_DOMAINS = ("0008", "0009", "0018", "0019")

# nvidia-smi mig -cgi 9,14,19 -C on an A100 80GB: 3g.40gb, 2g.20gb and 1g.10gb.
_A100_MIG_LAYOUT = (("3g.40gb", 2, 40192), ("2g.20gb", 3, 19968), ("1g.10gb", 9, 9856))


class _Identities:
    """Deterministic, collision-free identities for one simulated machine."""

    def __init__(self, preset_name: str, seed: int) -> None:
        # A str seed is hashed with SHA-512, so it is stable across runs and
        # independent of PYTHONHASHSEED.
        self._rng = random.Random(f"gpufleet-sim/{preset_name}/{seed}")
        self._serials: set[str] = set()

    def uuid(self, prefix: str = "GPU") -> str:
        return f"{prefix}-{uuid_lib.UUID(int=self._rng.getrandbits(128))}"

    def serial(self, prefix: str) -> str:
        while True:
            digits = 13 - len(prefix)
            serial = prefix + str(self._rng.randrange(10**digits)).zfill(digits)
            if serial not in self._serials:
                self._serials.add(serial)
                return serial

    def temperature(self) -> int:
        return 28 + self._rng.randrange(10)


def _gpu(
    model: _Model, ids: _Identities, *, pci_bus_id: str, serial: str, module_id: int
) -> SimGpu:
    return SimGpu(
        uuid=ids.uuid(),
        name=model.name,
        pci_bus_id=pci_bus_id,
        serial=serial,
        architecture=model.architecture,
        compute_capability=model.compute_capability,
        board_part_number=model.board_part_number,
        vbios_version=model.vbios_version,
        memory_total_bytes=model.memory_mib * _MIB,
        memory_used_bytes=0,
        module_id=module_id,
        temperature_celsius=ids.temperature(),
        power_usage_milliwatts=model.idle_power_mw,
        power_limit_milliwatts=model.power_limit_mw,
        clock_sm_mhz=model.clock_sm_mhz,
        clock_memory_mhz=model.clock_memory_mhz,
        ecc_corrected_errors=0,
        ecc_uncorrected_errors=0,
        # Ampere and later replace page retirement with row remapping.
        retired_pages_pending=None,
        remapped_rows_failure=False,
        mig_capable=model.mig_capable,
    )


def _dgx(
    name: str, seed: int, model: _Model, bus_ids: tuple[str, ...], driver: str, cuda: int
) -> SimFleet:
    ids = _Identities(name, seed)
    gpus = [
        _gpu(
            model,
            ids,
            pci_bus_id=f"00000000:{bus}:00.0",
            serial=ids.serial(model.serial_prefix),
            module_id=i + 1,
        )
        for i, bus in enumerate(bus_ids)
    ]
    return SimFleet(driver_version=driver, cuda_driver_version=cuda, gpus=gpus)


def _dgx_h100(seed: int) -> SimFleet:
    return _dgx("dgx-h100", seed, _H100, _DGX_H100_BUS_IDS, "550.54.15", 12040)


def _dgx_a100(seed: int) -> SimFleet:
    return _dgx("dgx-a100", seed, _A100, _DGX_A100_BUS_IDS, "535.161.08", 12020)


def _gb200(seed: int) -> SimFleet:
    """One GB200 compute tray: two boards, each carrying two GPUs under one serial."""
    ids = _Identities("gb200", seed)
    board_serials = [ids.serial(_GB200.serial_prefix), ids.serial(_GB200.serial_prefix)]
    chassis_serial = ids.serial("1821")
    gpus = []
    for i, domain in enumerate(_GB200_DOMAINS):
        gpu = _gpu(
            _GB200,
            ids,
            pci_bus_id=f"{domain.zfill(8)}:01:00.0",
            serial=board_serials[i // 2],
            module_id=i + 1,
        )
        gpu.chassis_serial = chassis_serial
        gpus.append(gpu)
    return SimFleet(driver_version="570.86.15", cuda_driver_version=12080, gpus=gpus)


def _l4(seed: int) -> SimFleet:
    ids = _Identities("l4", seed)
    gpu = _gpu(
        _L4, ids, pci_bus_id="00000000:00:03.0", serial=ids.serial(_L4.serial_prefix), module_id=1
    )
    return SimFleet(driver_version="550.90.07", cuda_driver_version=12040, gpus=[gpu])


def _mig_a100(seed: int) -> SimFleet:
    ids = _Identities("mig-a100", seed)
    gpu = _gpu(
        _A100,
        ids,
        pci_bus_id="00000000:07:00.0",
        serial=ids.serial(_A100.serial_prefix),
        module_id=1,
    )
    gpu.mig_enabled = True
    gpu.mig_instances = [
        SimMigInstance(
            uuid=ids.uuid("MIG"),
            profile=profile,
            gpu_instance_id=gi,
            compute_instance_id=0,
            memory_total_bytes=mib * _MIB,
        )
        for profile, gi, mib in _A100_MIG_LAYOUT
    ]
    return SimFleet(driver_version="535.161.08", cuda_driver_version=12020, gpus=[gpu])


_BUILDERS = {
    "dgx-h100": _dgx_h100,
    "dgx-a100": _dgx_a100,
    "gb200": _gb200,
    "l4": _l4,
    "mig-a100": _mig_a100,
}

PRESETS: tuple[str, ...] = tuple(_BUILDERS)
"""The names ``preset`` accepts."""


def preset(name: str, seed: int = 0) -> SimFleet:
    """A fresh simulated machine of kind ``name``; the same seed gives the same identities."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
    return builder(seed)
