"""A long kubelet outage: the last PodResources map expires, so deleted pods stop owning GPUs.

The kubelet is the `FakeKubelet` gRPC server on a real unix socket; the
metrics are the exporter's exposition, parsed with `prometheus_client.parser`.
Time is a clock the test moves, so no assertion depends on the wall clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.exporter.collector import GpuCollector
from gpufleet.exporter.metrics import SnapshotMetrics
from gpufleet.exporter.podmap.podresources import PodResourcesClient
from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from tests.doubles.podresources import FakeContainer, FakeKubelet, FakePod

pytestmark = pytest.mark.integration

MAX_AGE = 120.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gpu_owners(registry: CollectorRegistry) -> dict[str, tuple[str, str]]:
    """GPU index -> (namespace, pod) on `gpu_memory_used`, from the parsed exposition."""
    text = generate_latest(registry).decode()
    return {
        sample.labels["index"]: (sample.labels["namespace"], sample.labels["pod"])
        for family in text_string_to_metric_families(text)
        if family.name == "gpu_memory_used"
        for sample in family.samples
    }


async def test_the_last_podresources_map_expires_during_a_long_kubelet_outage(
    kubelet: FakeKubelet, socket_path: Path
) -> None:
    nvml = sim.open("dgx-h100")
    uuid = nvml.fleet.gpus[6].uuid
    kubelet.set_pods(
        [FakePod("ml", "trainer-0", [FakeContainer("main", {"nvidia.com/gpu": [uuid]})])]
    )
    clock = FakeClock()
    client = PodResourcesClient(socket_path, ttl=0.0, clock=clock)
    collector = GpuCollector(
        NvmlSource(nvml), hostname="h", podresources=client, clock=clock,
        podresources_max_age=MAX_AGE,
    )  # fmt: skip
    registry = CollectorRegistry()
    registry.register(SnapshotMetrics(collector.latest_snapshot))
    try:
        await collector.collect()
        seen = [gpu_owners(registry)["6"]]
        await kubelet.stop()  # the kubelet goes away, and stays away
        clock.now += MAX_AGE / 2
        await collector.collect()  # a restart's worth of outage: the map is kept
        seen.append(gpu_owners(registry)["6"])
        clock.now += MAX_AGE  # now older than MAX_AGE: the pods may be long gone
        await collector.collect()
        seen.append(gpu_owners(registry)["6"])
        await kubelet.start()
        await collector.collect()
        seen.append(gpu_owners(registry)["6"])
    finally:
        await client.close()
    assert seen == [("ml", "trainer-0"), ("ml", "trainer-0"), ("", ""), ("ml", "trainer-0")]
    assert set(gpu_owners(registry).values()) == {("", ""), ("ml", "trainer-0")}
