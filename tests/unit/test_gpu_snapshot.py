"""take_snapshot: one look at every GPU, where one failing GPU hides nothing else."""

from __future__ import annotations

import pynvml

from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.snapshot import take_snapshot


def test_snapshot_samples_every_gpu_and_lists_processes() -> None:
    library = sim.open("dgx-h100")
    library.add_process(3, 777, used_memory_bytes=2 << 30)
    with NvmlSource(library) as source:
        snap = take_snapshot(source)
    assert len(snap.samples) == 8
    assert [(p.pid, p.gpu_uuid) for p in snap.processes] == [(777, snap.devices.devices[3].uuid)]


def test_gpu_lost_between_enumeration_and_sampling_skips_only_that_gpu() -> None:
    library = sim.open("dgx-h100")
    library.set_error(2, "nvmlDeviceGetTemperature", pynvml.NVML_ERROR_GPU_IS_LOST)
    with NvmlSource(library) as source:
        snap = take_snapshot(source)
    lost = snap.devices.devices[2].uuid
    assert sorted(snap.samples) == sorted(d.uuid for d in snap.devices.devices if d.uuid != lost)
