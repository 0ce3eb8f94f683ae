"""List/watch consistency, Expired recovery and optimistic concurrency, over real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from gpufleet.core.retry import Backoff
from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.errors import ConflictError, ExpiredError
from gpufleet.deviceapi.informer import GpuInformer
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

ADDED, MODIFIED, DELETED = (
    gpu_pb2.WatchEvent.ADDED,
    gpu_pb2.WatchEvent.MODIFIED,
    gpu_pb2.WatchEvent.DELETED,
)


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    with short_tmp() as directory:
        async with running_server(directory) as running:
            yield running


async def _take(stream: AsyncIterator[gpu_pb2.WatchEvent], count: int) -> list[gpu_pb2.WatchEvent]:
    return [await asyncio.wait_for(anext(stream), 5) for _ in range(count)]


async def _wait_until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        # Polls state another task owns; nothing to wait on but time.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_watch_from_the_list_version_receives_exactly_the_missed_events(
    server: Running,
) -> None:
    async with server.client() as reader, server.client() as writer:
        for i in range(3):
            await writer.create(make_gpu(f"gpu-{i}", i))
        listed = await reader.list()

        added = await writer.create(make_gpu("gpu-x", 7))
        current = await writer.get("gpu-0")
        modified = await writer.update_status(with_condition(current, "False", "XidCritical"))
        deleted = await writer.delete("gpu-1")

        stream = reader.watch(listed.resource_version, allow_bookmarks=False)
        events = await _take(stream, 3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), 0.3)  # nothing twice, nothing else
        await stream.aclose()

    assert [(e.type, e.object.metadata.name) for e in events] == [
        (ADDED, "gpu-x"),
        (MODIFIED, "gpu-0"),
        (DELETED, "gpu-1"),
    ]
    assert [e.object for e in events[:2]] == [added, modified]
    assert events[2].object.metadata.resource_version == deleted.metadata.resource_version
    versions = [int(e.object.metadata.resource_version) for e in events]
    assert versions == sorted(versions)
    assert versions[0] > int(listed.resource_version)


async def test_watch_from_empty_version_replays_the_state_then_goes_live(server: Running) -> None:
    async with server.client() as api:
        for i in range(3):
            await api.create(make_gpu(f"gpu-{i}", i))
        stream = api.watch("", allow_bookmarks=False)
        initial = await _take(stream, 3)
        await api.create(make_gpu("gpu-3", 3))
        live = await _take(stream, 1)
        await stream.aclose()
    assert {e.object.metadata.name for e in initial} == {"gpu-0", "gpu-1", "gpu-2"}
    assert all(e.type == ADDED for e in initial)
    assert live[0].object.metadata.name == "gpu-3"


async def test_bookmarks_carry_the_store_version_when_idle() -> None:
    with short_tmp() as directory:
        async with (
            running_server(directory, bookmark_interval=0.1) as running,
            running.client() as api,
        ):
            created = await api.create(make_gpu("gpu-0"))
            stream = api.watch(created.metadata.resource_version)
            event = await asyncio.wait_for(anext(stream), 5)
            await stream.aclose()
    assert event.type == gpu_pb2.WatchEvent.BOOKMARK
    assert event.object.metadata.resource_version == created.metadata.resource_version


async def test_a_version_older_than_the_history_window_is_expired() -> None:
    with short_tmp() as directory:
        async with running_server(directory, watch_history=4) as running, running.client() as api:
            gpu = await api.create(make_gpu("gpu-0"))
            old = gpu.metadata.resource_version
            for i in range(10):
                gpu = await api.update_status(with_condition(gpu, "True", f"R{i}"))
            with pytest.raises(ExpiredError):
                async for _ in api.watch(old):
                    pass


async def test_the_informer_relists_after_expired_and_reports_only_real_changes() -> None:
    store = GpuStore(history=4)
    fast = Backoff(initial=0.02, cap=0.1, jitter=0.0)
    changes: list[tuple[str, str]] = []
    with short_tmp() as directory:
        async with running_server(directory, store=store) as running, running.client() as api:
            for i in range(4):
                await api.create(make_gpu(f"gpu-{i}", i))
        # The server is down: the informer's client keeps retrying the same socket.
        async with DeviceApiClient(directory / "run" / "device.sock") as client:
            informer = GpuInformer(client, backoff=fast)
            informer.on_add(lambda g: changes.append(("add", g.metadata.name)))
            informer.on_update(lambda old, new: changes.append(("update", new.metadata.name)))
            informer.on_delete(lambda g: changes.append(("delete", g.metadata.name)))
            async with running_server(directory, store=store):
                task = asyncio.create_task(informer.run())
                await asyncio.wait_for(informer.wait_synced(), 5)
            changes.clear()
            # While the server is down, more writes than the history holds happen.
            gpu = store.get("gpu-0")
            for i in range(10):
                gpu = store.update_status(with_condition(gpu, "False", f"Xid{i}"))
            store.delete("gpu-3")
            async with running_server(directory, store=store):
                await _wait_until(lambda: informer.resource_version == str(store.resource_version))
                expected = {g.metadata.name: g for g in store.list().items}
            informer.stop()
            await task
    store.close()
    assert informer.expirations >= 1
    assert {g.metadata.name: g for g in informer.items()} == expected
    assert sorted(changes) == [("delete", "gpu-3"), ("update", "gpu-0")]


async def test_the_informer_cache_follows_writes(server: Running) -> None:
    async with server.client() as writer, server.client() as reader:
        await writer.create(make_gpu("gpu-0", 0))
        informer = GpuInformer(reader)
        task = asyncio.create_task(informer.run())
        await asyncio.wait_for(informer.wait_synced(), 5)
        gpu = await writer.create(make_gpu("gpu-1", 1))
        gpu = await writer.update_status(with_condition(gpu, "False", "GpuLost"))
        await writer.delete("gpu-0")
        await _wait_until(lambda: informer.resource_version == str(server.store.resource_version))
        informer.stop()
        await task
    assert informer.names() == ["gpu-1"]
    assert informer.get("gpu-1") == gpu


async def _increment(client: DeviceApiClient, name: str, times: int) -> int:
    conflicts = 0
    for _ in range(times):
        while True:
            gpu = await client.get(name)
            count = int(gpu.metadata.annotations.get("example.com/counter", "0"))
            gpu.metadata.annotations["example.com/counter"] = str(count + 1)
            try:
                await client.update(gpu)
                break
            except ConflictError:
                conflicts += 1
    return conflicts


async def test_concurrent_read_modify_write_loses_no_update(server: Running) -> None:
    writers, times = 10, 25
    clients = [server.client() for _ in range(writers)]
    try:
        await clients[0].create(make_gpu("gpu-0"))
        conflicts = await asyncio.gather(*(_increment(c, "gpu-0", times) for c in clients))
        final = await clients[0].get("gpu-0")
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
    assert int(final.metadata.annotations["example.com/counter"]) == writers * times
    assert sum(conflicts) > 0  # the writers really did race
