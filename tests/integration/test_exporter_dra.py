"""GPUs allocated through Dynamic Resource Allocation, attributed to their pods.

The kubelet (a `FakeKubelet` speaking the real v1 proto) reports a claim's
devices as (driver, pool, device); the Kubernetes API double publishes the
DRA driver's ResourceSlices, which say each device's GPU or MIG UUID. The
first tests drive `PodResourcesClient` with a real `ResourceSliceIndex`; the
rest run the whole exporter (simulated NVML, host /proc double, API double)
and read the GPU-level series from /metrics with `prometheus_client.parser`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.core.config import load_settings
from gpufleet.exporter.podmap.podresources import (
    ContainerAllocation,
    ContainerRef,
    PodResourcesClient,
)
from gpufleet.exporter.podmap.resourceslices import DraDevice, ResourceSliceIndex
from gpufleet.exporter.service import Exporter, exporter
from gpufleet.exporter.settings import ExporterSettings
from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.sim import SimulatedNvml
from gpufleet.kube.client import KubeSettings, connect
from tests.doubles.hostproc import HostProc
from tests.doubles.kubeapi import (
    NVIDIA_GPU_DRIVER,
    RESOURCE_SLICE_VERSIONS,
    KubeApiDouble,
    gpu_slice_devices,
    slice_device,
)
from tests.doubles.podresources import (
    FakeClaim,
    FakeClaimDevice,
    FakeContainer,
    FakeKubelet,
    FakePod,
)
from tests.polling import next_snapshot

pytestmark = pytest.mark.integration

NODE = "gpu-node-1"
GPU = [gpu.uuid for gpu in sim.preset("dgx-h100").gpus]
Owner = tuple[str, str, str]
"""(pod, namespace, container) as the GPU-level series label them; ("", "", "") for none."""
UNOWNED: Owner = ("", "", "")


def gpu(index: int, pool: str = NODE) -> FakeClaimDevice:
    """A whole GPU as NVIDIA's DRA driver names it in an allocation."""
    return FakeClaimDevice(
        NVIDIA_GPU_DRIVER, pool, f"gpu-{index}", [f"k8s.gpu.nvidia.com/device=gpu-{index}"]
    )


def claimed(namespace: str, pod: str, container: str, *devices: FakeClaimDevice) -> FakePod:
    claim = FakeClaim(f"{pod}-gpus", namespace, devices)
    return FakePod(namespace, pod, [FakeContainer(container, claims=[claim])])


def node_slice(
    devices: Sequence[dict[str, Any]], *, driver: str = NVIDIA_GPU_DRIVER
) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{NODE}-{driver}"},
        "spec": {
            "driver": driver,
            "nodeName": NODE,
            "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1},
            "devices": list(devices),
        },
    }


def dgx_slice() -> dict[str, Any]:
    return node_slice(gpu_slice_devices(sim.preset("dgx-h100")))


# --- PodResourcesClient with the ResourceSlice index ----------------------------------------


@pytest.fixture
def index() -> ResourceSliceIndex:
    return ResourceSliceIndex()


@pytest.fixture
async def client(socket_path: Path, index: ResourceSliceIndex) -> AsyncIterator[PodResourcesClient]:
    api = PodResourcesClient(socket_path, ttl=3600.0, dra=index)
    try:
        yield api
    finally:
        await api.close()


async def test_allocations_expose_each_containers_claimed_devices_of_every_driver(
    kubelet: FakeKubelet, client: PodResourcesClient
) -> None:
    nic = FakeClaimDevice("dra.net", NODE, "eth1")
    kubelet.set_pods(
        [
            FakePod(
                "ml",
                "train-0",
                [
                    FakeContainer(
                        "main",
                        {"nvidia.com/gpu": [GPU[6]]},
                        claims=[
                            FakeClaim("gpus", "ml", [gpu(0), gpu(1)]),
                            FakeClaim("net", "ml", [nic]),
                        ],
                    ),
                    FakeContainer("sidecar", cpu_ids=[2, 3]),
                ],
            )
        ]
    )

    allocations = await client.allocations()

    assert allocations == (
        ContainerAllocation(
            ContainerRef("ml", "train-0", "main"),
            (GPU[6],),
            (
                DraDevice(NVIDIA_GPU_DRIVER, NODE, "gpu-0"),
                DraDevice(NVIDIA_GPU_DRIVER, NODE, "gpu-1"),
                DraDevice("dra.net", NODE, "eth1"),
            ),
        ),
    )


async def test_a_dra_gpu_is_owned_under_the_uuid_its_slice_publishes(
    kubelet: FakeKubelet, client: PodResourcesClient, index: ResourceSliceIndex
) -> None:
    index.upsert(dgx_slice())
    kubelet.set_pods(
        [
            claimed("ml", "train-0", "main", gpu(2), gpu(3)),
            FakePod("ml", "serve-1", [FakeContainer("model", {"nvidia.com/gpu": [GPU[6]]})]),
        ]
    )

    devices = await client.devices()

    assert dict(devices) == {
        GPU[2]: ContainerRef("ml", "train-0", "main"),
        GPU[3]: ContainerRef("ml", "train-0", "main"),
        GPU[6]: ContainerRef("ml", "serve-1", "model"),
    }


async def test_a_device_without_a_known_slice_is_owned_once_the_slice_arrives_without_a_new_list(
    kubelet: FakeKubelet, client: PodResourcesClient, index: ResourceSliceIndex
) -> None:
    kubelet.set_pods([claimed("ml", "train-0", "main", gpu(2))])

    before = dict(await client.devices())
    index.upsert(dgx_slice())
    after = dict(await client.devices())

    assert before == {}
    assert after == {GPU[2]: ContainerRef("ml", "train-0", "main")}
    assert kubelet.list_calls == 1


async def test_a_claim_shared_by_two_containers_of_one_pod_is_owned_by_the_pod(
    kubelet: FakeKubelet, client: PodResourcesClient, index: ResourceSliceIndex
) -> None:
    index.upsert(dgx_slice())
    shared = FakeClaim("shared-gpu", "ml", [gpu(4)])
    kubelet.set_pods(
        [
            FakePod(
                "ml",
                "pair-0",
                [FakeContainer("a", claims=[shared]), FakeContainer("b", claims=[shared])],
            )
        ]
    )

    devices = await client.devices()

    assert dict(devices) == {GPU[4]: ContainerRef("ml", "pair-0", "")}


async def test_a_claim_shared_by_two_pods_has_no_single_owner(
    kubelet: FakeKubelet,
    client: PodResourcesClient,
    index: ResourceSliceIndex,
    caplog: pytest.LogCaptureFixture,
) -> None:
    index.upsert(dgx_slice())
    kubelet.set_pods(
        [
            claimed("ml", "worker-0", "main", gpu(5)),
            claimed("monitoring", "probe", "dcgm", gpu(5)),
            claimed("ml", "train-0", "main", gpu(1)),
        ]
    )

    with caplog.at_level(logging.INFO, logger="gpufleet.exporter.podmap.podresources"):
        devices = await client.devices()

    assert dict(devices) == {GPU[1]: ContainerRef("ml", "train-0", "main")}
    assert [r.getMessage() for r in caplog.records if getattr(r, "gpu_uuid", "") == GPU[5]] == [
        "GPU claimed through DRA by several pods; it has no single owner"
    ]


async def test_a_uuid_that_is_not_an_nvml_uuid_never_becomes_a_device_key(
    kubelet: FakeKubelet, client: PodResourcesClient, index: ResourceSliceIndex
) -> None:
    index.upsert(node_slice([slice_device("card0", {"uuid": "0"})], driver="gpu.example.com"))
    kubelet.set_pods(
        [claimed("ml", "other", "main", FakeClaimDevice("gpu.example.com", NODE, "card0"))]
    )

    devices = await client.devices()

    # "0" would otherwise be matched as GPU index 0 by the collector.
    assert dict(devices) == {}


async def test_without_a_resolver_dra_devices_are_not_owned_and_plugin_ids_are(
    kubelet: FakeKubelet, socket_path: Path
) -> None:
    kubelet.set_pods(
        [
            claimed("ml", "train-0", "main", gpu(2)),
            FakePod("ml", "serve-1", [FakeContainer("model", {"nvidia.com/gpu": [GPU[6]]})]),
        ]
    )
    plain = PodResourcesClient(socket_path)
    try:
        devices = await plain.devices()
    finally:
        await plain.close()

    assert dict(devices) == {GPU[6]: ContainerRef("ml", "serve-1", "model")}


# --- the exporter end to end ---------------------------------------------------------------


@dataclass
class World:
    api: KubeApiDouble
    kubelet: FakeKubelet
    nvml: SimulatedNvml
    exporter: Exporter
    port: int

    async def owners(self) -> dict[str, Owner]:
        """uuid -> the owner labels of its ``gpu_memory_total`` series, from /metrics."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            text = await response.text()
        return {
            s.labels["uuid"]: (s.labels["pod"], s.labels["namespace"], s.labels["container"])
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "gpu_memory_total"
        }

    async def next_snapshot(self) -> None:
        """Wait for a collection that started after this call."""
        await next_snapshot(self.exporter.collector)

    async def owners_once(self, done: Callable[[dict[str, Owner]], bool]) -> dict[str, Owner]:
        """The owners from the first collection that satisfies ``done`` (a hang guard of 15 s)."""
        async with asyncio.timeout(15):
            while True:
                await self.next_snapshot()
                owners = await self.owners()
                if done(owners):
                    return owners


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path,
    pods: Sequence[FakePod],
    *,
    preset: str = "dgx-h100",
    versions: Sequence[str] = RESOURCE_SLICE_VERSIONS,
    publish: bool = True,
) -> AsyncIterator[World]:
    """The exporter of NODE, its kubelet reporting ``pods``, and NODE's GPU slice if ``publish``."""
    nvml = sim.open(preset)
    proc = HostProc(tmp_path / "proc")
    sockets = tempfile.TemporaryDirectory(prefix="gf-dra-")
    kubelet = FakeKubelet(Path(sockets.name) / "kubelet.sock")
    kubelet.set_pods(pods)
    async with (
        KubeApiDouble(bookmark_interval=0.2, resource_slice_versions=versions) as api,
        kubelet,
    ):
        if publish:
            api.add_gpu_resource_slice(NODE, nvml.fleet)
        # Another node's GPUs, under the same device names: never this node's.
        api.add_gpu_resource_slice("gpu-node-2", sim.preset(preset, seed=1))
        settings = load_settings(
            ExporterSettings,
            node_name=NODE,
            bind_address="127.0.0.1",
            port=0,
            interval=0.25,
            host_proc=proc.root,
            docker_root=tmp_path / "no-docker",
            podresources_socket=kubelet.socket_path,
        )
        kube = await connect(
            KubeSettings(qps=1000, burst=1000), configuration=api.client_configuration()
        )
        stop = asyncio.Event()
        try:
            async with exporter(
                settings,
                source=NvmlSource(nvml),
                kube=kube,
                registry=CollectorRegistry(),
                podresources=True,
                stop=stop,
            ) as started:
                slices = started.slices
                assert slices is not None
                async with asyncio.timeout(10):
                    await slices.decided.wait()
                    if slices.informer is not None:
                        await slices.informer.synced.wait()
                world = World(api, kubelet, nvml, started, started.server.port)
                await world.next_snapshot()
                yield world
        finally:
            await kube.close()
    sockets.cleanup()


async def test_a_gpu_claimed_through_dra_carries_its_pod_on_gpu_series(tmp_path: Path) -> None:
    pods = [
        claimed("ml", "train-dra", "main", gpu(2)),
        FakePod("ml", "train-plugin", [FakeContainer("main", {"nvidia.com/gpu": [GPU[6]]})]),
    ]
    async with running(tmp_path, pods) as world:
        owners = await world.owners()
        slices = world.exporter.slices
        assert slices is not None
        assert slices.informer is not None
        watched = [obj["spec"]["nodeName"] for obj in slices.informer.items()]

    assert owners.pop(GPU[2]) == ("train-dra", "ml", "main")
    assert owners.pop(GPU[6]) == ("train-plugin", "ml", "main")
    assert set(owners.values()) == {UNOWNED}
    assert (slices.version, watched) == ("v1", [NODE])


async def test_a_mig_device_claimed_through_dra_carries_its_pod(tmp_path: Path) -> None:
    a100 = sim.preset("mig-a100").gpus[0]
    mig = a100.mig_instances[1]
    device = f"gpu-0-mig-{mig.gpu_instance_id}-{mig.compute_instance_id}"
    pods = [
        claimed("research", "notebook", "jupyter", FakeClaimDevice(NVIDIA_GPU_DRIVER, NODE, device))
    ]
    async with running(tmp_path, pods, preset="mig-a100") as world:
        owners = await world.owners()

    assert owners.pop(mig.uuid) == ("notebook", "research", "jupyter")
    assert set(owners) == {a100.uuid, *(m.uuid for m in a100.mig_instances if m is not mig)}
    assert set(owners.values()) == {UNOWNED}


@pytest.mark.parametrize(
    ("versions", "chosen"),
    [(("v1beta2", "v1beta1"), "v1beta2"), (("v1beta1",), "v1beta1")],
    ids=["kubernetes-1.33", "kubernetes-1.32"],
)
async def test_an_older_server_is_watched_at_the_newest_version_it_serves(
    tmp_path: Path, versions: tuple[str, ...], chosen: str
) -> None:
    async with running(
        tmp_path, [claimed("ml", "train-dra", "main", gpu(2))], versions=versions
    ) as world:
        owners = await world.owners()
        slices = world.exporter.slices
        assert slices is not None
        requests = [r for r in world.api.requests if r.path.endswith("/resourceslices")]

    listed = [r.path for r in requests if r.params.get("watch") is None]
    watched = {r.path for r in requests if r.params.get("watch") is not None}
    path = "/apis/resource.k8s.io/{}/resourceslices".format
    tried = RESOURCE_SLICE_VERSIONS[: RESOURCE_SLICE_VERSIONS.index(chosen) + 1]
    assert slices.version == chosen
    assert list(dict.fromkeys(listed)) == [path(v) for v in tried]
    assert watched == {path(chosen)}
    assert owners[GPU[2]] == ("train-dra", "ml", "main")


async def test_without_any_served_version_dra_is_off_and_device_plugin_gpus_are_still_owned(
    tmp_path: Path,
) -> None:
    pods = [
        claimed("ml", "train-dra", "main", gpu(2)),
        FakePod("ml", "train-plugin", [FakeContainer("main", {"nvidia.com/gpu": [GPU[6]]})]),
    ]
    async with running(tmp_path, pods, versions=()) as world:
        await world.next_snapshot()
        owners = await world.owners()
        slices = world.exporter.slices

    assert slices is not None
    assert (slices.version, slices.informer) == (None, None)
    assert owners[GPU[2]] == UNOWNED
    assert owners[GPU[6]] == ("train-plugin", "ml", "main")


async def test_a_slice_published_after_the_claim_is_picked_up(tmp_path: Path) -> None:
    async with running(tmp_path, [claimed("ml", "early", "main", gpu(3))], publish=False) as world:
        before = await world.owners()
        world.api.add_gpu_resource_slice(NODE, world.nvml.fleet)
        after = await world.owners_once(lambda owners: owners[GPU[3]] != UNOWNED)

    assert before[GPU[3]] == UNOWNED
    assert after[GPU[3]] == ("early", "ml", "main")


async def test_a_deleted_slice_takes_the_owner_away(tmp_path: Path) -> None:
    async with running(tmp_path, [claimed("ml", "train-dra", "main", gpu(2))]) as world:
        before = await world.owners()
        world.api.delete_resource_slice(f"{NODE}-{NVIDIA_GPU_DRIVER}-gpus")
        after = await world.owners_once(lambda owners: owners[GPU[2]] == UNOWNED)

    assert before[GPU[2]] == ("train-dra", "ml", "main")
    assert set(after.values()) == {UNOWNED}
