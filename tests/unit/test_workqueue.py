"""The work queue holds each key once and looks again at keys that changed mid-work."""

from __future__ import annotations

from gpufleet.inventory.workqueue import WorkQueue


async def test_a_key_added_twice_while_waiting_is_handed_out_once() -> None:
    queue = WorkQueue()
    await queue.add("a")
    await queue.add("a")
    await queue.add("b")
    assert [await queue.get(), await queue.get(), len(queue)] == ["a", "b", 0]


async def test_a_key_added_while_processing_comes_back_after_done() -> None:
    queue = WorkQueue()
    await queue.add("a")
    assert await queue.get() == "a"
    await queue.add("a")
    assert len(queue) == 0
    await queue.done("a")
    assert await queue.get() == "a"


async def test_forget_drops_a_waiting_key() -> None:
    queue = WorkQueue()
    await queue.add("a")
    await queue.add("b")
    await queue.forget("a")
    assert await queue.get() == "b"


async def test_depth_is_reported_on_every_change() -> None:
    depths: list[int] = []
    queue = WorkQueue(on_depth=depths.append)
    await queue.add("a")
    await queue.add("b")
    await queue.get()
    assert depths == [1, 2, 1]


async def test_close_releases_waiting_workers_with_none() -> None:
    queue = WorkQueue()
    await queue.close()
    assert await queue.get() is None
