"""GPU truth: one model of GPUs, and the sources that fill it (NVML, simulated NVML, nvidia-smi)."""

from gpufleet.gpu.model import (
    DeviceList,
    FaultKind,
    GpuDevice,
    GpuFault,
    GpuProcess,
    GpuSample,
    MigDevice,
    XidEvent,
)
from gpufleet.gpu.source import GpuError, GpuLostError, GpuSource, XidEventStream

__all__ = [
    "DeviceList",
    "FaultKind",
    "GpuDevice",
    "GpuError",
    "GpuFault",
    "GpuLostError",
    "GpuProcess",
    "GpuSample",
    "GpuSource",
    "MigDevice",
    "XidEvent",
    "XidEventStream",
]
