"""Watch batching: the store's `take` caps and linger, and the client's batch splitting."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.deviceapi.client import split_batch
from gpufleet.deviceapi.config import DeviceApiSettings
from gpufleet.deviceapi.errors import WatcherEvictedError
from gpufleet.deviceapi.events import watch_item
from gpufleet.deviceapi.store import GpuStore
from gpufleet.deviceapi.v1alpha1 import gpu_pb2 as pb
from gpufleet.deviceapi.watcher import WatcherClosedError


def _store() -> GpuStore:
    return GpuStore(clock=lambda: datetime(2026, 1, 2, tzinfo=UTC))


def _gpu(name: str, note: str = "") -> pb.Gpu:
    gpu = pb.Gpu(
        metadata=pb.ObjectMeta(name=name),
        spec=pb.GpuSpec(uuid=f"GPU-{name}", product="NVIDIA H100 80GB HBM3"),
    )
    if note:
        gpu.metadata.annotations["example.com/note"] = note
    return gpu


async def test_take_returns_what_is_queued_in_order_up_to_the_event_cap() -> None:
    store = _store()
    watcher = store.watch()
    for i in range(7):
        store.create(_gpu(f"gpu-{i}"))
    batches = [await watcher.take(3, 1 << 20, timeout=0) for _ in range(4)]
    names = [[item.event.object.metadata.name for item in batch] for batch in batches]
    assert names == [["gpu-0", "gpu-1", "gpu-2"], ["gpu-3", "gpu-4", "gpu-5"], ["gpu-6"], []]


async def test_take_keeps_to_the_byte_cap_but_always_takes_one_event() -> None:
    store = _store()
    watcher = store.watch()
    store.create(_gpu("gpu-big", "x" * 5000))
    for i in range(10):
        store.create(_gpu(f"gpu-{i}"))
    cap = 1000
    first = await watcher.take(256, cap, timeout=0)
    rest = []
    while batch := await watcher.take(256, cap, timeout=0):
        rest.append(batch)
    assert [item.event.object.metadata.name for item in first] == ["gpu-big"]
    assert all(sum(len(i.head) + len(i.wire) for i in batch) <= cap for batch in rest)
    assert sum(len(batch) for batch in rest) == 10


def _names(items: list[object]) -> list[str]:
    return [item.event.object.metadata.name for item in items]  # type: ignore[attr-defined]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_without_linger_take_returns_as_soon_as_one_event_is_queued() -> None:
    store = _store()
    watcher = store.watch()
    task = asyncio.create_task(watcher.take(256, 1 << 20, None, 0.0))
    await _settle()
    store.create(_gpu("gpu-0"))
    await _settle()
    assert task.done()
    store.create(_gpu("gpu-1"))
    assert _names(task.result()) == ["gpu-0"]
    assert _names(await watcher.take(256, 1 << 20, timeout=0)) == ["gpu-1"]


async def test_linger_coalesces_a_burst_into_one_batch() -> None:
    store = _store()
    watcher = store.watch()
    task = asyncio.create_task(watcher.take(256, 1 << 20, None, 0.05))
    await _settle()
    store.create(_gpu("gpu-0"))
    await _settle()
    assert not task.done()  # lingering for more
    for i in range(1, 5):
        store.create(_gpu(f"gpu-{i}"))
        await _settle()
    assert _names(await asyncio.wait_for(task, 5)) == [f"gpu-{i}" for i in range(5)]


async def test_a_full_batch_ends_the_linger_early() -> None:
    store = _store()
    watcher = store.watch()
    task = asyncio.create_task(watcher.take(3, 1 << 20, None, 30.0))
    await _settle()
    store.create(_gpu("gpu-0"))
    store.create(_gpu("gpu-1"))
    await _settle()
    assert not task.done()
    store.create(_gpu("gpu-2"))
    store.create(_gpu("gpu-3"))
    await _settle()
    assert task.done()
    assert _names(task.result()) == ["gpu-0", "gpu-1", "gpu-2"]


async def test_linger_counts_from_when_the_event_was_recorded() -> None:
    store = _store()
    watcher = store.watch()
    store.create(_gpu("gpu-0"))
    await asyncio.sleep(0.06)
    # Recorded longer ago than the linger: taken at once, no further wait.
    task = asyncio.create_task(watcher.take(256, 1 << 20, None, 0.05))
    await _settle()
    assert task.done()
    assert _names(task.result()) == ["gpu-0"]


async def test_an_idle_event_is_held_for_the_linger_then_sent() -> None:
    store = _store()
    watcher = store.watch()
    task = asyncio.create_task(watcher.take(256, 1 << 20, None, 0.2))
    await _settle()
    store.create(_gpu("gpu-0"))
    await asyncio.sleep(0.02)  # well inside the linger: still held
    assert not task.done()
    items = await asyncio.wait_for(task, 5)
    assert _names(items) == ["gpu-0"]


async def test_a_watcher_that_overflows_while_lingering_is_evicted() -> None:
    store = GpuStore(watch_queue=3)
    watcher = store.watch()
    task = asyncio.create_task(watcher.take(256, 1 << 20, None, 30.0))
    await _settle()
    for i in range(5):
        store.create(_gpu(f"gpu-{i}"))
    with pytest.raises(WatcherEvictedError):
        await asyncio.wait_for(task, 5)
    assert store.evicted_total == 1


async def test_closing_a_lingering_watcher_ends_its_take() -> None:
    store = _store()
    watcher = store.watch()
    task = asyncio.create_task(watcher.take(256, 1 << 20, None, 30.0))
    await _settle()
    store.create(_gpu("gpu-0"))
    await _settle()
    watcher.close()
    with pytest.raises(WatcherClosedError):
        await asyncio.wait_for(task, 5)


def test_watch_linger_is_a_duration_of_at_most_50ms() -> None:
    assert load_settings(DeviceApiSettings).watch_linger == 0.0
    assert load_settings(DeviceApiSettings, watch_linger="5ms").watch_linger == 0.005
    with pytest.raises(ConfigError, match="WATCH_LINGER"):
        load_settings(DeviceApiSettings, watch_linger="60ms")
    with pytest.raises(ConfigError, match="WATCH_LINGER"):
        load_settings(DeviceApiSettings, watch_linger="-1ms")


def test_a_joined_batch_is_a_valid_watch_event_batch_and_splits_into_its_events() -> None:
    events = [
        pb.WatchEvent(type=pb.WatchEvent.ADDED, object=_gpu(f"gpu-{i}", "y" * 200 * i))
        for i in range(5)
    ]
    items = [watch_item(i + 1, event) for i, event in enumerate(events)]
    joined = b"".join(item.head + item.wire for item in items)
    assert list(pb.WatchEventBatch.FromString(joined).events) == events
    assert split_batch(joined) == events


def test_split_batch_skips_fields_it_does_not_know() -> None:
    event = pb.WatchEvent(type=pb.WatchEvent.BOOKMARK)
    event.object.metadata.resource_version = "42"
    item = watch_item(42, event)
    # field 2 varint 7, field 3 bytes "ab", field 4 fixed32, field 5 fixed64
    unknown = b"\x10\x07" + b"\x1a\x02ab" + b"\x25\x00\x00\x00\x00" + b"\x29" + bytes(8)
    assert split_batch(unknown + item.head + item.wire) == [event]


@pytest.mark.parametrize("data", [b"\x0a", b"\x0a\x05abc", b"\x0b"])
def test_split_batch_refuses_a_truncated_or_malformed_batch(data: bytes) -> None:
    with pytest.raises(ValueError, match="WatchEventBatch"):
        split_batch(data)
