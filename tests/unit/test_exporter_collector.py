"""GpuCollector through the simulated NVML: per-device failure, MIG, XIDs, rediscovery."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gpufleet.exporter.collector import GpuCollector, Stage
from gpufleet.exporter.errors import PodResourcesError
from gpufleet.exporter.metrics import SnapshotMetrics
from gpufleet.exporter.podmap.podresources import ContainerRef
from gpufleet.exporter.podmap.procfs import ProcFs
from gpufleet.exporter.podmap.resolver import ProcessAttributor
from gpufleet.exporter.snapshot import Snapshot
from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.sim import SimulatedNvml
from tests.doubles.hostproc import HostProc


class CountingNvml:
    """Forwards to a simulated NVML and counts every NVML function called."""

    def __init__(self, inner: SimulatedNvml) -> None:
        self._inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name.startswith("nvml") and callable(value):

            def counted(*args: Any) -> Any:
                self.calls += 1
                return value(*args)

            return counted
        return value


class FakeKubelet:
    """Stands in for PodResourcesClient: answers a map, or fails."""

    def __init__(self, owners: Mapping[str, ContainerRef]) -> None:
        self.owners = owners
        self.fail = False

    async def devices(self) -> Mapping[str, ContainerRef]:
        if self.fail:
            raise PodResourcesError("kubelet.sock: connection refused")
        return self.owners


def by_index(snapshot: Snapshot) -> dict[str, Any]:
    return {state.index: state for state in snapshot.devices}


async def test_one_gpus_nvml_error_marks_only_that_gpu_down() -> None:
    nvml = sim.open("dgx-h100")
    nvml.set_error(2, "nvmlDeviceGetTemperature", pynvml.NVML_ERROR_UNKNOWN)
    snapshot = await GpuCollector(NvmlSource(nvml), hostname="h").collect()
    states = by_index(snapshot)
    assert [i for i, s in states.items() if not s.up] == ["2"]
    assert all(states[str(i)].sample is not None for i in (0, 1, 3, 4, 5, 6, 7))
    assert dict(snapshot.errors)[Stage.SAMPLE] == 1


async def test_mig_instances_are_their_own_devices_with_their_processes() -> None:
    nvml = sim.open("mig-a100")
    gpu = nvml.fleet.gpus[0]
    nvml.add_process(0, 4242, used_memory_bytes=2**30, mig_index=1)
    snapshot = await GpuCollector(NvmlSource(nvml), hostname="h").collect()
    states = by_index(snapshot)
    assert sorted(states) == ["0", *(f"0:{m}" for m in range(len(gpu.mig_instances)))]
    assert states["0:1"].uuid == gpu.mig_instances[1].uuid
    (process,) = snapshot.processes
    assert (process.device_index, process.device_uuid) == ("0:1", gpu.mig_instances[1].uuid)


async def test_a_lost_gpu_is_rediscovered_when_it_returns() -> None:
    nvml = sim.open("dgx-h100")
    collector = GpuCollector(NvmlSource(nvml), hostname="h", rediscover_interval=3600)
    await collector.collect()
    await collector.collect()
    assert collector.enumerations == 1  # no failure: the device list is reused
    nvml.set_lost(5)
    first = await collector.collect()  # the sample fails: enumerate again next time
    assert not by_index(first)["5"].up
    second = await collector.collect()  # enumeration lists it as a fault
    assert not by_index(second)["5"].up
    assert by_index(second)["5"].uuid == nvml.fleet.gpus[5].uuid
    nvml.set_lost(5, False)
    third = await collector.collect()
    assert by_index(third)["5"].up
    assert collector.enumerations == 3


async def test_xid_events_are_counted_per_gpu_and_xid() -> None:
    nvml = sim.open("dgx-h100")
    collector = GpuCollector(NvmlSource(nvml), hostname="h")
    stop = asyncio.Event()
    runner = asyncio.create_task(collector.run(0.05, stop))
    try:
        async with asyncio.timeout(10):
            while collector.latest_snapshot() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            # Give the XID thread its registration before injecting.
            await asyncio.sleep(0.3)
            nvml.inject_xid(1, 79)
            nvml.inject_xid(1, 79)
            nvml.inject_xid(4, 48)
            while True:
                snapshot = collector.latest_snapshot()
                assert snapshot is not None
                counts = {s.index: dict(s.xid_counts) for s in snapshot.devices}
                if counts["1"] == {79: 2} and counts["4"] == {48: 1}:
                    break
                await asyncio.sleep(0.05)
        assert all(counts[str(i)] == {} for i in (0, 2, 3, 5, 6, 7))
    finally:
        stop.set()
        await runner


async def test_gpu_owners_come_from_podresources_and_survive_a_kubelet_outage() -> None:
    nvml = sim.open("dgx-h100")
    uuid = nvml.fleet.gpus[6].uuid
    kubelet = FakeKubelet(
        {uuid: ContainerRef("ml", "trainer-0", "main"), "2": ContainerRef("ml", "by-index", "c")}
    )
    collector = GpuCollector(NvmlSource(nvml), hostname="h", podresources=kubelet)  # type: ignore[arg-type]
    states = by_index(await collector.collect())
    assert states["6"].owner is not None
    assert states["6"].owner.pod == "trainer-0"
    assert states["2"].owner is not None
    assert states["2"].owner.pod == "by-index"
    assert states["0"].owner is None
    kubelet.fail = True
    snapshot = await collector.collect()
    assert by_index(snapshot)["6"].owner is not None
    assert dict(snapshot.errors)[Stage.PODRESOURCES] == 1


async def test_a_scrape_touches_neither_nvml_nor_proc(tmp_path: Path) -> None:
    counting = CountingNvml(sim.open("dgx-h100"))
    proc = HostProc(tmp_path / "proc")
    for i in range(32):
        counting._inner.add_process(i % 8, 100 + i, used_memory_bytes=2**20)
        proc.add(100 + i)
    procfs = ProcFs(proc.root)
    attributor = ProcessAttributor(procfs)
    collector = GpuCollector(NvmlSource(counting), hostname="h", attributor=attributor)
    await collector.collect()
    registry = CollectorRegistry()
    metrics = SnapshotMetrics(collector.latest_snapshot)
    registry.register(metrics)
    nvml_calls, proc_reads = counting.calls, attributor.proc_reads
    for pid in range(100, 132):  # /proc vanishing under a scrape changes nothing
        proc.remove(pid)
    bodies = [generate_latest(registry) for _ in range(5)]
    assert counting.calls == nvml_calls
    assert attributor.proc_reads == proc_reads
    assert len(set(bodies)) == 1
    assert bodies[0].count(b"process_gpu_memory{") == 32
    assert metrics.renders == 1


async def test_a_process_is_read_from_proc_once_while_it_lives(tmp_path: Path) -> None:
    nvml = sim.open("l4")
    proc = HostProc(tmp_path / "proc")
    nvml.add_process(0, 77, used_memory_bytes=2**20)
    proc.add(77, uid=0, cmdline=["python", "serve.py"])
    attributor = ProcessAttributor(ProcFs(proc.root))
    collector = GpuCollector(NvmlSource(nvml), hostname="h", attributor=attributor)
    for _ in range(4):
        snapshot = await collector.collect()
    assert attributor.proc_reads == 1
    assert snapshot.processes[0].command == "python serve.py"
    nvml.remove_process(0, 77)
    await collector.collect()
    assert len(attributor) == 0


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_rediscover_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError, match="rediscover_interval"):
        GpuCollector(NvmlSource(sim.open("l4")), hostname="h", rediscover_interval=interval)
