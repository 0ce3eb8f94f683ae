"""One consistent look at every GPU of a source: identities, telemetry, processes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from gpufleet.gpu.model import DeviceList, GpuProcess, GpuSample
from gpufleet.gpu.source import GpuError, GpuSource

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """Everything a source said about its GPUs at one moment."""

    devices: DeviceList
    samples: Mapping[str, GpuSample]
    """Telemetry by GPU UUID; a GPU whose sampling failed has no entry."""
    processes: tuple[GpuProcess, ...]


def take_snapshot(source: GpuSource) -> GpuSnapshot:
    """Enumerate, sample and list processes; a GPU that fails is logged and skipped.

    A GPU can fall off the bus between enumeration and sampling: that GPU loses
    its sample and processes, and every other GPU is still read.
    """
    listing = source.devices()
    samples: dict[str, GpuSample] = {}
    processes: list[GpuProcess] = []
    for device in listing.devices:
        try:
            samples[device.uuid] = source.sample(device.uuid)
            processes.extend(source.processes(device.uuid))
        except GpuError as exc:
            _log.warning("cannot read GPU", extra={"uuid": device.uuid, "error": str(exc)})
    return GpuSnapshot(listing, samples, tuple(processes))
