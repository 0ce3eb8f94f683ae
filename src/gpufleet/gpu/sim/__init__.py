"""A simulated NVML at the library boundary, like the ``dgxa100`` mock of go-nvml.

``SimulatedNvml`` has the function surface of nvidia-ml-py's ``pynvml``, so
``NvmlSource(sim.open("dgx-h100"))`` runs the same code as on a real node::

    nvml = sim.open("dgx-h100", seed=3)          # a preset; another seed, another machine
    nvml = sim.open("fleet.yaml")                # a fleet file
    nvml = sim.open(sim.preset("gb200"))         # a SimFleet built or edited in code
    nvml.inject_xid(2, 79)                       # GPU 2 reports XID 79
    nvml.add_process(0, 4242, used_memory_bytes=2 << 30, sm_util_percent=55)
    nvml.set_lost(5)                             # GPU 5 falls off the bus
    nvml.set_unsupported(1, "nvmlDeviceGetSerial", "nvmlDeviceGetPowerUsage")

Presets (``PRESETS``): ``dgx-h100`` (8 x H100 80GB HBM3), ``dgx-a100`` (8 x
A100-SXM4-80GB), ``gb200`` (one compute tray: 4 GPUs, 2 board serials, one
chassis serial, module ids 1-4), ``l4`` (1 x L4, no MIG), ``mig-a100`` (1 x A100
80GB in MIG mode with 3g.40gb, 2g.20gb and 1g.10gb instances).

Fleet file format (YAML). Either a preset with overrides::

    preset: dgx-h100
    seed: 7                       # optional, default 0
    driver_version: "550.90.07"   # optional fleet-level overrides
    gpus:                         # optional: GPU index -> fields to replace
      3: {lost: true}
      5:
        temperature_celsius: 91
        unsupported: [nvmlDeviceGetSerial]
        processes:
          - {pid: 4242, used_memory_bytes: 1073741824, sm_util_percent: 40}

or a full description, where ``gpus`` is a list::

    driver_version: "550.54.15"
    cuda_driver_version: 12040    # as NVML returns it: 12.4
    gpus:
      - uuid: GPU-5b9a2e6c-0d47-4c5e-9f0a-3e1c2b7d8a91
        name: NVIDIA H100 80GB HBM3
        pci_bus_id: "00000000:18:00.0"
        serial: "1654922001234"
        architecture: hopper
        compute_capability: [9, 0]
        memory_total_bytes: 85520809984

GPU fields are those of ``SimGpu`` (identity, telemetry such as
``temperature_celsius`` or ``power_usage_milliwatts``, ``mig_capable``,
``mig_enabled``, ``mig_instances``, ``processes``, ``unsupported``, ``lost``);
``null`` makes the matching NVML call raise NotSupported. Unknown fields, wrong
types and unknown NVML function names raise ``FleetFileError`` naming the file
and the field, e.g. ``fleet.yaml: gpus.2.temperature_celsius: Input should be a
valid integer``.

Modules, each importing only those above it:

* ``fleet``: the ``SimFleet`` records (data only: no behaviour of the simulator);
* ``presets``: the realistic machines of ``PRESETS``, built from those records;
* ``handles``: device handles and event sets as opaque ctypes pointers;
* ``events``: the event sets behind ``nvmlEventSet*``, their registrations and queues;
* ``library``: ``SimulatedNvml``, pynvml's surface over a fleet, and its injection API;
* ``fleetfile``: reading a fleet file (a preset with overrides, or a full description).
"""

from __future__ import annotations

from pathlib import Path

from gpufleet.gpu.sim.fleet import SimError, SimFleet, SimGpu, SimMigInstance, SimProcess
from gpufleet.gpu.sim.fleetfile import FleetFileError, fleet_from_dict, load_fleet
from gpufleet.gpu.sim.library import SimulatedNvml
from gpufleet.gpu.sim.presets import PRESETS, UnknownPresetError, preset

__all__ = [
    "PRESETS",
    "FleetFileError",
    "SimError",
    "SimFleet",
    "SimGpu",
    "SimMigInstance",
    "SimProcess",
    "SimulatedNvml",
    "UnknownPresetError",
    "fleet_from_dict",
    "load_fleet",
    "open",
    "preset",
]


def open(fleet: str | Path | SimFleet, *, seed: int = 0) -> SimulatedNvml:
    """A ``SimulatedNvml`` for a preset name, a YAML fleet file, or a ``SimFleet``.

    ``seed`` applies to preset names only. The library is not initialised:
    ``nvmlInit`` is the caller's (``NvmlSource``'s) job, as with ``pynvml``.
    """
    if isinstance(fleet, SimFleet):
        return SimulatedNvml(fleet)
    if isinstance(fleet, str) and fleet in PRESETS:
        return SimulatedNvml(preset(fleet, seed))
    if isinstance(fleet, Path) or fleet.endswith((".yaml", ".yml")):
        return SimulatedNvml(load_fleet(fleet))
    raise UnknownPresetError(f"unknown preset {fleet!r} (known: {', '.join(PRESETS)})")
