"""GPU truth: one model of GPUs, and the sources that fill it (NVML, simulated NVML, nvidia-smi).

Where things are:

* ``model``: the frozen records (``GpuDevice``, ``GpuSample``, ``GpuProcess``, ...);
* ``source``: the ``GpuSource`` and ``XidEventStream`` protocols and the GPU errors;
* ``nvml``: ``NvmlSource``, the one code that calls NVML (real or simulated);
* ``nvml_events``: ``NvmlXidEventStream``, XID events from one NVML event set;
* ``sim``: the simulated NVML library, its presets and fleet files;
* ``smi``: nvidia-smi XML and CSV, parsed and written;
* ``xid``: the XID catalogue (meaning, severity, action) and its overrides;
* ``snapshot``: one consistent look at every GPU of a source;
* ``select`` and ``cli``: the source a command asked for, and ``gpufleet gpu``.

This package imports only ``gpufleet.core``; the features build on it.
"""

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
