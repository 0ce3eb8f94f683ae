"""The node's GPUs: read once at start through `gpufleet.gpu`, grouped for the node objects.

A cache's compatibility is a property of the GPUs, and a node's GPUs change only with a
reboot (or a driver upgrade, which restarts the DaemonSet pod), so they are read once.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.gpu.model import GpuDevice
from gpufleet.gpu.source import GpuSource

__all__ = ["NodeGpus", "read_gpus"]


@dataclass(frozen=True, slots=True)
class NodeGpus:
    """The readable GPUs of this node, in index order."""

    devices: tuple[GpuDevice, ...]
    driver_version: str | None = None

    def groups(self) -> list[dict[str, object]]:
        """``status.gpus`` of a node object: one entry per GPU model and driver (GKM's shape)."""
        grouped: dict[tuple[str, str], list[int]] = {}
        for device in self.devices:
            driver = device.driver_version or self.driver_version or ""
            grouped.setdefault((device.product_name, driver), []).append(device.index)
        return [
            {"gpuType": product, "driverVersion": driver, "ids": sorted(ids)}
            for (product, driver), ids in sorted(grouped.items())
        ]


def read_gpus(source: GpuSource) -> NodeGpus:
    """Enumerate `source` (blocking: NVML is a C library); faulty GPUs are left out."""
    listing = source.devices()
    return NodeGpus(tuple(sorted(listing.devices, key=_index)), listing.driver_version)


def _index(device: GpuDevice) -> int:
    return device.index
