"""Watch batching: the store's `take` caps and the client's batch splitting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpufleet.deviceapi.client import split_batch
from gpufleet.deviceapi.store import GpuStore, watch_item
from gpufleet.deviceapi.v1alpha1 import gpu_pb2 as pb


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
