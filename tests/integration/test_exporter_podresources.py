"""The kubelet PodResources client against a fake kubelet speaking the real v1 proto."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gpufleet.exporter.errors import PodResourcesError
from gpufleet.exporter.podmap.kubelet_v1 import api_pb2, api_pb2_grpc
from gpufleet.exporter.podmap.podresources import (
    ContainerRef,
    PodResourcesClient,
    is_gpu_resource,
)
from gpufleet.gpu import sim
from gpufleet.gpu.model import GpuDevice
from gpufleet.gpu.nvml import NvmlSource
from tests.doubles.podresources import FakeContainer, FakeKubelet, FakePod

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulated_gpus(preset: str) -> tuple[GpuDevice, ...]:
    with NvmlSource(sim.open(preset)) as source:
        return source.devices().devices


def one_gpu_pod(namespace: str, name: str, device_id: str) -> FakePod:
    return FakePod(namespace, name, [FakeContainer("main", {"nvidia.com/gpu": [device_id]})])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(socket_path: Path, clock: FakeClock) -> AsyncIterator[PodResourcesClient]:
    api = PodResourcesClient(socket_path, ttl=10.0, clock=clock)
    try:
        yield api
    finally:
        await api.close()


# --- what the map holds ----------------------------------------------------------


async def test_simulated_gpu_uuids_map_to_the_containers_they_are_allocated_to(
    kubelet: FakeKubelet, client: PodResourcesClient
) -> None:
    gpus = [gpu.uuid for gpu in simulated_gpus("dgx-h100")]
    kubelet.set_pods(
        [
            FakePod("ml", "train-0", [FakeContainer("trainer", {"nvidia.com/gpu": gpus[0:4]})]),
            FakePod(
                "ml",
                "serve-1",
                [
                    FakeContainer("sidecar"),
                    FakeContainer("model", {"nvidia.com/gpu": [gpus[6]]}),
                ],
            ),
        ]
    )

    devices = await client.devices()

    assert dict(devices) == {
        **{uuid: ContainerRef("ml", "train-0", "trainer") for uuid in gpus[0:4]},
        gpus[6]: ContainerRef("ml", "serve-1", "model"),
    }


async def test_mig_uuids_under_their_profile_resource_names_map_to_their_containers(
    kubelet: FakeKubelet, client: PodResourcesClient
) -> None:
    (a100,) = simulated_gpus("mig-a100")
    migs = a100.mig_devices
    assert len(migs) == 3  # the preset: 3g.40gb, 2g.20gb and 1g.10gb
    kubelet.set_pods(
        [
            FakePod(
                "research",
                f"notebook-{mig.profile}",
                [FakeContainer("jupyter", {f"nvidia.com/mig-{mig.profile}": [mig.uuid]})],
            )
            for mig in migs
        ]
    )

    devices = await client.devices()

    assert dict(devices) == {
        mig.uuid: ContainerRef("research", f"notebook-{mig.profile}", "jupyter") for mig in migs
    }


async def test_cpus_memory_and_other_devices_are_left_out(
    kubelet: FakeKubelet, client: PodResourcesClient
) -> None:
    (gpu,) = simulated_gpus("l4")
    kubelet.set_pods(
        [
            FakePod(
                "default",
                "mixed",
                [
                    FakeContainer(
                        "app",
                        {
                            "nvidia.com/gpu": [gpu.uuid],
                            "example.com/sriov-vf": ["0000:3b:02.1"],
                            "amd.com/gpu": ["card1"],
                            "nvidia.com/gpu-renamed": ["GPU-elsewhere"],
                        },
                        cpu_ids=[4, 5, 6, 7],
                    )
                ],
            ),
            FakePod("default", "cpu-only", [FakeContainer("app", cpu_ids=[8, 9])]),
        ]
    )

    devices = await client.devices()

    assert list(devices) == [gpu.uuid]


async def test_time_sliced_replicas_keep_their_replica_ids(
    kubelet: FakeKubelet, client: PodResourcesClient
) -> None:
    (gpu,) = simulated_gpus("l4")
    kubelet.set_pods(
        [
            FakePod("a", "p", [FakeContainer("c", {"nvidia.com/gpu.shared": [f"{gpu.uuid}::0"]})]),
            FakePod("b", "q", [FakeContainer("c", {"nvidia.com/gpu.shared": [f"{gpu.uuid}::1"]})]),
        ]
    )

    devices = await client.devices()

    # No single owner is claimed for the shared GPU itself.
    assert dict(devices) == {
        f"{gpu.uuid}::0": ContainerRef("a", "p", "c"),
        f"{gpu.uuid}::1": ContainerRef("b", "q", "c"),
    }


@pytest.mark.parametrize(
    ("resource_name", "expected"),
    [
        ("nvidia.com/gpu", True),
        ("nvidia.com/gpu.shared", True),
        ("nvidia.com/mig-1g.10gb", True),
        ("nvidia.com/mig-3g.40gb", True),
        ("nvidia.com/mig-1g.10gb.shared", True),
        ("nvidia.com/mig-", False),
        ("nvidia.com/gpus", False),
        ("nvidia.com/gpu-h100", False),
        ("amd.com/gpu", False),
        ("cpu", False),
        ("example.com/nvidia.com/gpu", False),
    ],
)
def test_which_resource_names_are_gpus(resource_name: str, expected: bool) -> None:
    assert is_gpu_resource(resource_name) is expected


async def test_a_device_claimed_twice_keeps_the_first_owner_and_warns_once(
    kubelet: FakeKubelet,
    client: PodResourcesClient,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (gpu,) = simulated_gpus("l4")
    kubelet.set_pods([one_gpu_pod("a", "first", gpu.uuid), one_gpu_pod("b", "second", gpu.uuid)])

    with caplog.at_level(logging.WARNING, logger="gpufleet.exporter.podmap.podresources"):
        devices = await client.devices()
        clock.now += 60
        await client.devices()

    assert devices[gpu.uuid] == ContainerRef("a", "first", "main")
    assert kubelet.list_calls == 2
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# --- big replies ---------------------------------------------------------------------


async def test_a_reply_over_5_mib_is_read_with_the_default_limit(
    kubelet: FakeKubelet, socket_path: Path
) -> None:
    (gpu,) = simulated_gpus("l4")
    kubelet.set_pods([one_gpu_pod("ml", "train", gpu.uuid)])
    kubelet.pad_to(5 * MIB + 1)
    assert len(kubelet.list_response().SerializeToString()) > 5 * MIB

    api = PodResourcesClient(socket_path)
    try:
        devices = await api.devices()
    finally:
        await api.close()

    assert dict(devices) == {gpu.uuid: ContainerRef("ml", "train", "main")}


async def test_a_reply_over_the_receive_limit_is_an_error_that_names_the_limit(
    kubelet: FakeKubelet, socket_path: Path
) -> None:
    kubelet.pad_to(5 * MIB)
    api = PodResourcesClient(socket_path, max_message_bytes=4 * MIB)
    try:
        with pytest.raises(PodResourcesError, match=r"larger than the 4 MiB") as raised:
            await api.devices()
    finally:
        await api.close()

    assert str(socket_path) in str(raised.value)
    assert "\n" not in str(raised.value)


# --- caching ---------------------------------------------------------------------------


async def test_two_calls_within_the_ttl_make_one_list_call(
    kubelet: FakeKubelet, client: PodResourcesClient, clock: FakeClock
) -> None:
    kubelet.set_pods([one_gpu_pod("a", "p", "GPU-0")])

    await client.devices()
    clock.now += 9.9
    await client.devices()

    assert (client.list_calls, kubelet.list_calls) == (1, 1)


async def test_a_call_after_the_ttl_lists_again_and_sees_changes(
    kubelet: FakeKubelet, client: PodResourcesClient, clock: FakeClock
) -> None:
    kubelet.set_pods([one_gpu_pod("a", "p", "GPU-0")])
    await client.devices()
    kubelet.set_pods([one_gpu_pod("b", "q", "GPU-0")])

    clock.now += 10.0
    devices = await client.devices()

    assert client.list_calls == 2
    assert devices["GPU-0"] == ContainerRef("b", "q", "main")


async def test_concurrent_callers_share_one_list_call(
    kubelet: FakeKubelet, client: PodResourcesClient
) -> None:
    kubelet.set_pods([one_gpu_pod("a", "p", "GPU-0")])
    kubelet.delay = 0.2

    results = await asyncio.gather(*(client.devices() for _ in range(5)))

    assert kubelet.list_calls == 1
    assert all(result["GPU-0"] == ContainerRef("a", "p", "main") for result in results)


async def test_the_map_handed_out_cannot_change_the_cache(
    kubelet: FakeKubelet, client: PodResourcesClient
) -> None:
    kubelet.set_pods([one_gpu_pod("a", "p", "GPU-0")])
    devices = await client.devices()

    with pytest.raises(TypeError):
        devices["GPU-9"] = ContainerRef("x", "y", "z")  # type: ignore[index]


# --- failures ----------------------------------------------------------------------------


async def test_a_missing_socket_is_an_error_naming_the_path(
    socket_path: Path, client: PodResourcesClient
) -> None:
    with pytest.raises(PodResourcesError, match="does not exist") as raised:
        await client.devices()

    assert str(socket_path) in str(raised.value)
    assert client.list_calls == 0


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (grpc.StatusCode.UNAVAILABLE, "kubelet unavailable"),
        (grpc.StatusCode.UNIMPLEMENTED, "does not serve v1.PodResourcesLister/List"),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    ],
)
async def test_a_failed_list_is_an_error_and_the_next_call_tries_once_more(
    kubelet: FakeKubelet,
    client: PodResourcesClient,
    socket_path: Path,
    code: grpc.StatusCode,
    says: str,
) -> None:
    kubelet.set_pods([one_gpu_pod("a", "p", "GPU-0")])
    kubelet.fail_with(code)

    with pytest.raises(PodResourcesError, match=says) as raised:
        await client.devices()
    assert str(socket_path) in str(raised.value)
    assert kubelet.list_calls == 1  # no retries inside one call

    kubelet.fail_with(None)
    devices = await client.devices()

    assert (kubelet.list_calls, dict(devices)) == (2, {"GPU-0": ContainerRef("a", "p", "main")})


async def test_a_failure_after_the_ttl_keeps_no_stale_answer_and_recovers(
    kubelet: FakeKubelet, client: PodResourcesClient, clock: FakeClock
) -> None:
    kubelet.set_pods([one_gpu_pod("a", "p", "GPU-0")])
    await client.devices()
    clock.now += 10.0
    kubelet.fail_with(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(PodResourcesError):
        await client.devices()
    kubelet.fail_with(None)
    kubelet.set_pods([one_gpu_pod("b", "q", "GPU-0")])
    devices = await client.devices()

    assert devices["GPU-0"] == ContainerRef("b", "q", "main")
    assert kubelet.list_calls == 3


async def test_a_kubelet_that_does_not_answer_in_time_is_a_deadline_error(
    kubelet: FakeKubelet, socket_path: Path
) -> None:
    kubelet.delay = 2.0
    api = PodResourcesClient(socket_path, timeout=0.2)
    try:
        with pytest.raises(PodResourcesError, match=r"no answer within 0\.2 s"):
            await api.devices()
    finally:
        await api.close()


async def test_a_restarted_kubelet_is_read_again_at_once(
    kubelet: FakeKubelet, client: PodResourcesClient, clock: FakeClock
) -> None:
    kubelet.set_pods([one_gpu_pod("a", "p", "GPU-0")])
    await client.devices()
    await kubelet.stop(leave_socket=True)
    clock.now += 10.0

    with pytest.raises(PodResourcesError, match="kubelet unavailable"):
        await client.devices()  # connection refused
    await kubelet.start()
    clock.now += 10.0
    devices = await client.devices()

    # Without a fresh channel gRPC would still be in its reconnect backoff here.
    assert devices["GPU-0"] == ContainerRef("a", "p", "main")


# --- lifecycle -----------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_close_leaves_no_open_sockets_and_no_warnings(
    kubelet: FakeKubelet, socket_path: Path
) -> None:
    kubelet.set_pods([one_gpu_pod("a", "p", "GPU-0")])
    warm = PodResourcesClient(socket_path)
    await warm.devices()  # gRPC's process-wide pollers and threads start here
    await warm.close()
    before = _open_fds()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Kept referenced, so that garbage collection cannot close for them.
        clients = [PodResourcesClient(socket_path) for _ in range(3)]
        for api in clients:
            await api.devices()
        for api in clients:
            await api.close()
        await asyncio.sleep(0.1)  # let the transports finish closing
        after = _open_fds()
        del clients
        gc.collect()

    assert after <= before
    assert [str(w.message) for w in caught] == []


# --- the fake itself --------------------------------------------------------------------


async def test_the_fake_serves_get_and_get_allocatable_resources(
    kubelet: FakeKubelet, socket_path: Path
) -> None:
    gpus = [gpu.uuid for gpu in simulated_gpus("dgx-h100")]
    kubelet.set_pods([one_gpu_pod("ml", "train", gpus[0])])
    kubelet.set_allocatable({"nvidia.com/gpu": gpus}, cpu_ids=range(8))

    async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
        stub = api_pb2_grpc.PodResourcesListerStub(channel)  # type: ignore[no-untyped-call]
        got = await stub.Get(api_pb2.GetPodResourcesRequest(pod_name="train", pod_namespace="ml"))
        allocatable = await stub.GetAllocatableResources(api_pb2.AllocatableResourcesRequest())
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Get(api_pb2.GetPodResourcesRequest(pod_name="gone", pod_namespace="ml"))

    assert list(got.pod_resources.containers[0].devices[0].device_ids) == [gpus[0]]
    assert list(allocatable.devices[0].device_ids) == gpus
    assert list(allocatable.cpu_ids) == list(range(8))
    assert missing.value.code() == grpc.StatusCode.UNKNOWN
    assert (kubelet.get_calls, kubelet.allocatable_calls) == (2, 1)
