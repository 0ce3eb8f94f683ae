"""WatchGpuBatches over real gRPC: the same events as WatchGpus, batched within caps."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.metrics import DeviceApiMetrics
from gpufleet.deviceapi.service import BATCH_MAX_BYTES, BATCH_MAX_EVENTS, SERVICE_NAME, GpuService
from gpufleet.deviceapi.store import GpuStore
from gpufleet.deviceapi.v1alpha1 import gpu_pb2
from tests.integration.deviceapi_harness import (
    Running,
    make_gpu,
    running_server,
    short_tmp,
    with_condition,
)

pytestmark = pytest.mark.integration

ONE = f"/{SERVICE_NAME}/WatchGpus"
BATCHES = f"/{SERVICE_NAME}/WatchGpuBatches"


def _raw(channel: grpc.aio.Channel, method: str, parse: Callable[[bytes], Any]) -> Any:
    return channel.unary_stream(method, request_serializer=lambda b: b, response_deserializer=parse)


def _request(rv: str = "", selector: str = "") -> bytes:
    return gpu_pb2.WatchGpusRequest(
        resource_version=rv, label_selector=selector, allow_bookmarks=False
    ).SerializeToString()


async def _read_until(call: Any, final_rv: str, batched: bool) -> list[Any]:
    """Messages until one carries `final_rv`."""
    messages: list[Any] = []
    async with asyncio.timeout(10):
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF
            messages.append(message)
            last = message.events[-1] if batched else message
            if last.object.metadata.resource_version == final_rv:
                call.cancel()
                return messages


async def _mixed_writes(api: DeviceApiClient) -> None:
    for i in range(6):
        await api.create(make_gpu(f"gpu-{i}", i, zone="a" if i % 2 else "b"))
    for round_ in range(3):
        for i in range(6):
            gpu = await api.get(f"gpu-{i}")
            await api.update_status(with_condition(gpu, "False" if round_ % 2 else "True"))
    gpu = await api.get("gpu-1")
    gpu.metadata.labels["zone"] = "b"
    await api.update(gpu)
    await api.delete("gpu-4")
    await api.create(make_gpu("gpu-9", 9, zone="a"))


@pytest.mark.parametrize("selector", ["", "zone=a"])
async def test_batched_watch_delivers_exactly_the_events_of_the_one_event_watch(
    selector: str,
) -> None:
    with short_tmp() as directory:
        async with running_server(directory) as running, running.client() as api:
            await api.create(make_gpu("gpu-seed", 99, zone="a"))
            since = str(running.store.resource_version)
            await _mixed_writes(api)
            final = str(running.store.resource_version)
            async with grpc.aio.insecure_channel(f"unix:{running.socket}") as channel:
                one = _raw(channel, ONE, gpu_pb2.WatchEvent.FromString)(_request(since, selector))
                singles = await _read_until(one, final, batched=False)
                batched = _raw(channel, BATCHES, gpu_pb2.WatchEventBatch.FromString)(
                    _request(since, selector)
                )
                batches = await _read_until(batched, final, batched=True)
    flattened = [event for batch in batches for event in batch.events]
    assert len(singles) > 10
    assert len(batches) < len(singles)  # the replay really was batched
    assert flattened == singles


async def test_a_batch_never_exceeds_the_cap() -> None:
    gpus = BATCH_MAX_EVENTS * 2 + 88
    with short_tmp() as directory:
        async with running_server(directory, max_gpus=gpus) as running, running.client() as api:
            for i in range(gpus):
                await api.create(make_gpu(f"gpu-{i:04d}", i))
            final = str(running.store.resource_version)
            async with grpc.aio.insecure_channel(f"unix:{running.socket}") as channel:
                call = _raw(channel, BATCHES, bytes)(_request(""))
                raw = await _read_until_raw(call, gpus)
    sizes = [len(gpu_pb2.WatchEventBatch.FromString(b).events) for b in raw]
    assert sum(sizes) == gpus
    assert max(sizes) == BATCH_MAX_EVENTS  # the initial burst is batched to the cap
    assert all(len(b) <= BATCH_MAX_BYTES for b in raw)
    assert gpu_pb2.WatchEventBatch.FromString(raw[-1]).events[-1].object.metadata.name
    assert final


async def _read_until_raw(call: Any, count: int) -> list[bytes]:
    out: list[bytes] = []
    seen = 0
    async with asyncio.timeout(10):
        while seen < count:
            message = await call.read()
            assert message is not grpc.aio.EOF
            out.append(message)
            seen += len(gpu_pb2.WatchEventBatch.FromString(message).events)
    call.cancel()
    return out


@contextlib.asynccontextmanager
async def bare_service(**options: Any) -> AsyncIterator[tuple[GpuStore, grpc.aio.Channel]]:
    """A GpuService with non-default `options` on a unix socket, and a channel to it."""
    store = GpuStore()
    service = GpuService(store, metrics=DeviceApiMetrics(CollectorRegistry(), store), **options)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    with short_tmp() as directory:
        server.add_insecure_port(f"unix:{directory}/s.sock")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{directory}/s.sock") as channel:
                yield store, channel
        finally:
            service.close()
            await server.stop(0)
            store.close()


async def test_a_batch_keeps_to_a_small_byte_cap() -> None:
    async with bare_service(batch_max_bytes=2000) as (store, channel):
        for i in range(40):
            store.create(make_gpu(f"gpu-{i:02d}", i))
        call = _raw(channel, BATCHES, bytes)(_request(""))
        raw = await _read_until_raw(call, 40)
    assert len(raw) > 1
    assert all(len(b) <= 2000 for b in raw)


@pytest.mark.parametrize("method", [ONE, BATCHES])
@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (_request("-1"), grpc.StatusCode.INVALID_ARGUMENT),
        (_request("", "a in ("), grpc.StatusCode.INVALID_ARGUMENT),
        (b"\xff\xff\xff", grpc.StatusCode.UNKNOWN),
        (
            gpu_pb2.WatchGpusRequest(label_selector="a" * (5 << 20)).SerializeToString(),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
    ids=["bad-rv", "bad-selector", "garbage", "over-4-mib"],
)
async def test_a_malformed_or_oversized_watch_request_fails_alike_on_both_rpcs(
    method: str, request_bytes: bytes, code: grpc.StatusCode
) -> None:
    with short_tmp() as directory:
        async with (
            running_server(directory) as running,
            grpc.aio.insecure_channel(
                f"unix:{running.socket}", options=[("grpc.max_send_message_length", 8 << 20)]
            ) as channel,
        ):
            call = _raw(channel, method, bytes)(request_bytes)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(call.read(), 10)
    assert caught.value.code() == code


async def _events_sent(running: Running) -> tuple[dict[str, float], float]:
    """Watch events sent by type, and watch messages sent."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.metrics_url + "/metrics") as response,
    ):
        text = await response.text()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    events = {
        s.labels["type"]: s.value
        for s in samples
        if s.name == "gpufleet_deviceapi_watch_events_total"
    }
    messages = sum(s.value for s in samples if s.name == "gpufleet_deviceapi_watch_messages_total")
    return events, messages


async def test_the_events_metric_counts_events_not_messages() -> None:
    with short_tmp() as directory:
        async with running_server(directory) as running, running.client() as api:
            for i in range(50):
                await api.create(make_gpu(f"gpu-{i:02d}", i))
            async with grpc.aio.insecure_channel(f"unix:{running.socket}") as channel:
                call = _raw(channel, BATCHES, bytes)(_request(""))
                raw = await _read_until_raw(call, 50)
            await asyncio.sleep(0.05)
            sent, messages = await _events_sent(running)
    assert len(raw) < 50
    assert sent == {"ADDED": 50, "MODIFIED": 0, "DELETED": 0, "BOOKMARK": 0, "ERROR": 0}
    assert messages == len(raw)


class _OldServer(grpc.GenericRpcHandler):
    """A server from before WatchGpuBatches: every method but that one."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method == BATCHES:
            return None
        return self._inner.service(handler_call_details)


async def test_the_client_falls_back_to_one_event_messages_on_an_older_server() -> None:
    store = GpuStore()
    service = GpuService(store, metrics=DeviceApiMetrics(CollectorRegistry(), store))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_OldServer(service.handler()),))
    with short_tmp() as directory:
        server.add_insecure_port(f"unix:{directory}/s.sock")
        await server.start()
        try:
            store.create(make_gpu("gpu-0"))
            async with DeviceApiClient(f"{directory}/s.sock") as api:
                stream = api.watch("", allow_bookmarks=False)
                first = await asyncio.wait_for(anext(stream), 5)
                await stream.aclose()
                batched = api._batched
        finally:
            service.close()
            await server.stop(0)
            store.close()
    assert first.object.metadata.name == "gpu-0"
    assert batched is False


async def test_with_watch_linger_a_burst_of_writes_arrives_in_one_message() -> None:
    with short_tmp() as directory:
        # The longest linger allowed, so that five round trips fit in it easily.
        async with (
            running_server(directory, watch_linger="50ms") as running,
            running.client() as api,
        ):
            gpu = await api.create(make_gpu("gpu-0"))
            since = gpu.metadata.resource_version
            async with grpc.aio.insecure_channel(f"unix:{running.socket}") as channel:
                call = _raw(channel, BATCHES, gpu_pb2.WatchEventBatch.FromString)(_request(since))
                await asyncio.sleep(0.1)  # the watch is open and idle
                for k in range(5):
                    gpu = await api.update_status(with_condition(gpu, "True", f"R{k}"))
                async with asyncio.timeout(10):  # it lingers, but not indefinitely
                    batches = await _read_until(call, gpu.metadata.resource_version, batched=True)
    assert [len(batch.events) for batch in batches] == [5]
    assert [e.object.status.conditions[0].reason for e in batches[0].events] == [
        f"R{k}" for k in range(5)
    ]


async def test_the_one_event_watch_never_lingers() -> None:
    # A linger far beyond what the settings allow, so a lingering send would show.
    async with bare_service(watch_linger=3.0) as (store, channel):
        since = _request(str(store.resource_version))
        one = _raw(channel, ONE, gpu_pb2.WatchEvent.FromString)(since)
        batches = _raw(channel, BATCHES, gpu_pb2.WatchEventBatch.FromString)(since)
        await asyncio.sleep(0.1)  # both watches are open and idle
        store.create(make_gpu("gpu-0"))
        batched = asyncio.ensure_future(batches.read())
        async with asyncio.timeout(10):
            single = await one.read()
        # The one-event watch has its event while the batch still lingers.
        lingering = not batched.done()
        async with asyncio.timeout(10):
            batch = await batched
        one.cancel()
        batches.cancel()
    assert single.object.metadata.name == "gpu-0"
    assert lingering
    assert [e.object.metadata.name for e in batch.events] == ["gpu-0"]
