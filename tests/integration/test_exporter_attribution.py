"""The GPU exporter end to end: simulated NVML, a host /proc, the Kubernetes API double.

8 GPUs carry 256 processes of 64 pods (plus a few host processes). The
exporter runs as `gpufleet exporter` does, with its HTTP server, and each test
reads /metrics over HTTP and parses it with `prometheus_client.parser`.
"""

from __future__ import annotations

import asyncio
import heapq
import tempfile
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpufleet.core.config import load_settings
from gpufleet.exporter.service import Exporter, exporter
from gpufleet.exporter.settings import ExporterSettings
from gpufleet.exporter.snapshot import Snapshot
from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.sim import SimulatedNvml
from gpufleet.kube.client import Kube, KubeSettings, connect
from tests.doubles.hostproc import HostProc, containerd_cgroup_v2
from tests.doubles.kubeapi import KubeApiDouble
from tests.doubles.podresources import FakeContainer, FakeKubelet, FakePod
from tests.polling import next_snapshot

pytestmark = pytest.mark.integration

NODE = "gpu-node-1"
PODS = 64
PROCESSES = 256
HOST_PIDS = (900, 901)
FIRST_PID = 10_000


@dataclass(frozen=True)
class Expected:
    pod: str
    namespace: str
    container: str


@dataclass
class World:
    api: KubeApiDouble
    nvml: SimulatedNvml
    proc: HostProc
    exporter: Exporter
    port: int
    owners: dict[int, Expected]
    """pid -> the pod and container the process belongs to."""
    containers: dict[tuple[str, str], tuple[str, dict[str, str]]]
    """(namespace, pod) -> (pod uid, container name -> bare container id)."""

    async def scrape(self) -> list[Sample]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            text = await response.text()
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    async def next_snapshot(self) -> Snapshot:
        """Wait for a collection that started after this call."""
        snapshot: Snapshot | None = await next_snapshot(self.exporter.collector)
        assert snapshot is not None
        return snapshot


def process_samples(samples: list[Sample], name: str = "process_gpu_memory") -> list[Sample]:
    return [s for s in samples if s.name == name]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    nvml = sim.open("dgx-h100")
    proc = HostProc(tmp_path / "proc")
    owners: dict[int, Expected] = {}
    containers: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    # A unix socket path has at most 107 bytes; pytest's tmp_path may be longer.
    sockets = tempfile.TemporaryDirectory(prefix="gf-kubelet-")
    kubelet = FakeKubelet(Path(sockets.name) / "kubelet.sock")
    kubelet.set_pods([
        FakePod("team-2", "train-6", [
            FakeContainer("main", {"nvidia.com/gpu": [nvml.fleet.gpus[6].uuid]}),
        ]),
    ])  # fmt: skip
    async with KubeApiDouble(bookmark_interval=0.2) as api, kubelet:
        for p in range(PODS):
            namespace, name = f"team-{p % 4}", f"train-{p}"
            uid = f"{p:08x}-0000-4000-8000-{p:012x}"
            pod = api.add_pod(
                namespace, name, node_name=NODE, labels={"app": "train", "team": f"t{p % 4}"},
                containers=("main", "sidecar"), uid=uid,
            )  # fmt: skip
            ids = {
                s["name"]: s["containerID"].split("://", 1)[1]
                for s in pod["status"]["containerStatuses"]
            }
            containers[(namespace, name)] = (uid, ids)
        # A pod on another node must not be in this exporter's index.
        api.add_pod("team-0", "elsewhere", node_name="gpu-node-2", labels={})
        for i in range(PROCESSES):
            pid, p = FIRST_PID + i, i // 4
            namespace, name = f"team-{p % 4}", f"train-{p}"
            container = "main" if i % 2 == 0 else "sidecar"
            uid, ids = containers[(namespace, name)]
            nvml.add_process(i % 8, pid, used_memory_bytes=(i + 1) * 2**20, sm_util_percent=i % 50)
            proc.add(pid, cgroup=containerd_cgroup_v2(uid, ids[container]), start_time=5000 + i)
            owners[pid] = Expected(name, namespace, container)
        for pid in HOST_PIDS:
            nvml.add_process(0, pid, used_memory_bytes=7 * 2**20)
            proc.add(pid, cmdline=["Xorg"], comm="Xorg")

        settings = load_settings(
            ExporterSettings, node_name=NODE, bind_address="127.0.0.1", port=0, interval=0.25,
            host_proc=proc.root, docker_root=tmp_path / "no-docker", process_info=True,
            podresources_socket=kubelet.socket_path,
        )  # fmt: skip
        kube_settings = KubeSettings(qps=1000, burst=1000)
        kube: Kube = await connect(kube_settings, configuration=api.client_configuration())
        stop = asyncio.Event()
        try:
            async with exporter(
                settings, source=NvmlSource(nvml), kube=kube, registry=CollectorRegistry(),
                podresources=True, stop=stop,
            ) as running:  # fmt: skip
                assert running.informer is not None
                async with asyncio.timeout(10):
                    await running.informer.synced.wait()
                w = World(api, nvml, proc, running, running.server.port, owners, containers)
                await w.next_snapshot()
                yield w
        finally:
            await kube.close()
    sockets.cleanup()


async def test_every_process_series_carries_its_pod_namespace_and_container(world: World) -> None:
    samples = process_samples(await world.scrape())
    seen = {
        int(s.labels["pid"]): Expected(
            s.labels["pod_name"], s.labels["pod_namespace"], s.labels["container_name"]
        )
        for s in samples
        if int(s.labels["pid"]) >= FIRST_PID
    }
    assert seen == world.owners


async def test_gpu_series_carry_the_pod_the_kubelet_allocated_the_gpu_to(world: World) -> None:
    samples = [s for s in await world.scrape() if s.name == "gpu_memory_used"]
    owners = {s.labels["index"]: (s.labels["pod"], s.labels["namespace"]) for s in samples}
    assert owners.pop("6") == ("train-6", "team-2")
    assert set(owners.values()) == {("", "")}


async def test_process_memory_is_reported_in_bytes_per_process(world: World) -> None:
    samples = process_samples(await world.scrape())
    memory = {int(s.labels["pid"]): s.value for s in samples}
    assert memory[FIRST_PID + 9] == 10 * 2**20
    assert len(memory) == PROCESSES + len(HOST_PIDS)


async def test_host_processes_have_empty_pod_labels(world: World) -> None:
    samples = await world.scrape()
    # PromQL: process_gpu_memory{pod_name=""}
    unowned = [s for s in process_samples(samples) if s.labels["pod_name"] == ""]
    assert sorted(int(s.labels["pid"]) for s in unowned) == list(HOST_PIDS)
    info = [s for s in samples if s.name == "process_info" and s.labels["pid"] == "900"]
    assert [s.labels["command"] for s in info] == ["Xorg"]


async def test_seed_promql_aggregations_hold_over_the_parsed_samples(world: World) -> None:
    samples = process_samples(await world.scrape())
    expected: dict[tuple[str, str], float] = defaultdict(float)
    for pid, owner in world.owners.items():
        expected[(owner.pod, owner.namespace)] += (pid - FIRST_PID + 1) * 2**20

    # sum by (pod_name, pod_namespace) (process_gpu_memory{pod_name!=""})
    by_pod = sum_by(samples, ("pod_name", "pod_namespace"), lambda s: s.labels["pod_name"] != "")
    assert by_pod == dict(expected)
    # topk(10, sum by (pod_name, pod_namespace) (process_gpu_memory{pod_name!=""}))
    top = heapq.nlargest(10, by_pod.items(), key=lambda item: item[1])
    assert [key for key, _ in top] == [
        key for key, _ in sorted(expected.items(), key=lambda kv: -kv[1])[:10]
    ]
    # sum by (pod_namespace) (process_gpu_memory)
    by_namespace = sum_by(samples, ("pod_namespace",), lambda s: True)
    namespaces: dict[tuple[str, ...], float] = defaultdict(float)
    for (_, namespace), value in expected.items():
        namespaces[(namespace,)] += value
    namespaces[("",)] = 7 * 2**20 * len(HOST_PIDS)
    assert by_namespace == dict(namespaces)


def sum_by(
    samples: list[Sample], labels: tuple[str, ...], keep: Callable[[Sample], bool]
) -> dict[tuple[str, ...], float]:
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for s in samples:
        if keep(s):
            sums[tuple(s.labels[label] for label in labels)] += s.value
    return dict(sums)


async def test_a_process_that_exits_is_gone_from_the_next_scrape(world: World) -> None:
    pid = FIRST_PID + 17
    world.nvml.remove_process(17 % 8, pid)
    world.proc.remove(pid)
    await world.next_snapshot()
    pids = {int(s.labels["pid"]) for s in process_samples(await world.scrape())}
    assert pid not in pids
    assert FIRST_PID + 18 in pids


async def test_a_reused_pid_gets_the_new_pod(world: World) -> None:
    pid = FIRST_PID + 5  # train-1, sidecar
    world.nvml.remove_process(5 % 8, pid)
    await world.next_snapshot()
    uid, ids = world.containers[("team-2", "train-42")]
    world.nvml.add_process(2, pid, used_memory_bytes=2**30)
    world.proc.add(pid, cgroup=containerd_cgroup_v2(uid, ids["main"]), start_time=999_999)
    await world.next_snapshot()
    mine = [s for s in process_samples(await world.scrape()) if s.labels["pid"] == str(pid)]
    assert [(s.labels["pod_name"], s.labels["container_name"]) for s in mine] == [
        ("train-42", "main")
    ]


async def test_a_pod_created_after_its_process_is_attributed_once_the_informer_sees_it(
    world: World,
) -> None:
    pid, uid = 20_000, "feedbeef-0000-4000-8000-000000000001"
    world.nvml.add_process(1, pid, used_memory_bytes=2**20)
    world.proc.add(pid, cgroup=containerd_cgroup_v2(uid, "ab" * 32))
    await world.next_snapshot()
    first = [s for s in process_samples(await world.scrape()) if s.labels["pid"] == str(pid)]
    assert [s.labels["pod_name"] for s in first] == [""]
    pod = world.api.add_pod("late", "late-pod", node_name=NODE, labels={}, uid=uid)
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    world.proc.add(pid, cgroup=containerd_cgroup_v2(uid, container_id))  # same start time
    async with asyncio.timeout(15):  # the negative cache entry expires after 5 s
        while True:
            await world.next_snapshot()
            mine = [s for s in process_samples(await world.scrape()) if s.labels["pid"] == str(pid)]
            if mine and mine[0].labels["pod_name"] == "late-pod":
                break


async def test_a_static_pod_process_is_attributed_through_its_mirror_pod(world: World) -> None:
    # The kubelet names a static pod's cgroup after its own 32-hex UID; the API
    # only has the mirror pod, with another UID and that one in an annotation.
    static_uid, name = "5c1a9f1e0b7d4e3a9c2f8e6d4b2a1908", f"gpu-probe-{NODE}"
    world.api.add_pod("kube-system", name, node_name=NODE, labels={}, containers=("probe",))

    def make_mirror(pod: dict[str, Any]) -> None:
        pod["metadata"]["annotations"] = {
            "kubernetes.io/config.hash": static_uid,
            "kubernetes.io/config.mirror": static_uid,
            "kubernetes.io/config.source": "file",
        }

    pod = world.api.update_pod("kube-system", name, make_mirror)
    assert pod["metadata"]["uid"] != static_uid
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    pid = 30_000
    world.nvml.add_process(3, pid, used_memory_bytes=2**20)
    world.proc.add(pid, cgroup=containerd_cgroup_v2(static_uid, container_id))
    async with asyncio.timeout(15):
        while True:
            await world.next_snapshot()
            mine = [s for s in process_samples(await world.scrape()) if s.labels["pid"] == str(pid)]
            labels = mine[0].labels if mine else {}
            if labels.get("pod_name") == name:
                break
    assert (labels["pod_namespace"], labels["container_name"]) == ("kube-system", "probe")


async def test_a_lost_gpu_reports_gpu_up_0_while_the_others_keep_reporting(world: World) -> None:
    lost = world.nvml.fleet.gpus[3].uuid
    world.nvml.set_lost(3)
    await world.next_snapshot()
    samples = await world.scrape()
    up = {s.labels["uuid"]: s.value for s in samples if s.name == "gpufleet_exporter_gpu_up"}
    assert up[lost] == 0.0
    assert sorted(v for uuid, v in up.items() if uuid != lost) == [1.0] * 7
    utilization = {s.labels["uuid"] for s in samples if s.name == "gpu_utilization"}
    assert lost not in utilization
    assert len(utilization) == 7
    gpus_with_processes = {s.labels["uuid"] for s in process_samples(samples)}
    assert lost not in gpus_with_processes
    assert len(gpus_with_processes) == 7

    world.nvml.set_lost(3, False)
    await world.next_snapshot()
    up = {
        s.labels["uuid"]: s.value
        for s in await world.scrape()
        if s.name == "gpufleet_exporter_gpu_up"
    }
    assert up[lost] == 1.0
