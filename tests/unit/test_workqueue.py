"""The work queue holds each key once, looks again at keys that changed mid-work, and
sends failed keys to wait out a per-key backoff without holding a worker."""

from __future__ import annotations

import asyncio

from gpufleet.core.retry import Backoff
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


async def test_a_failed_key_comes_back_after_its_own_backoff_and_frees_the_worker() -> None:
    queue = WorkQueue(backoff=Backoff(initial=0.05, factor=2.0, cap=1.0, jitter=0.0))
    await queue.add("hung")
    await queue.add("ok")
    assert await queue.get() == "hung"
    assert await queue.retry_later("hung") == 0.05
    await queue.done("hung")
    # The worker takes the next key at once; the failed one waits out its backoff.
    assert (await queue.get(), queue.delayed) == ("ok", 1)
    await queue.done("ok")
    got = await asyncio.wait_for(queue.get(), 5)  # a hang guard, not a timing
    assert (got, queue.failures("hung"), queue.delayed) == ("hung", 1, 0)


async def test_the_backoff_grows_per_key_up_to_its_cap_and_reset_starts_over() -> None:
    queue = WorkQueue(backoff=Backoff(initial=1.0, factor=2.0, cap=5.0, jitter=0.0))
    delays = [await queue.retry_later("a") for _ in range(5)]
    other = await queue.retry_later("b")
    await queue.reset("a")
    after_reset = await queue.retry_later("a")
    await queue.close()
    assert (delays, other, after_reset) == ([1.0, 2.0, 4.0, 5.0, 5.0], 1.0, 1.0)


async def test_an_update_during_the_backoff_does_not_cut_it_short() -> None:
    queue = WorkQueue(backoff=Backoff(initial=60.0, cap=60.0, jitter=0.0))
    await queue.add("a")
    assert await queue.get() == "a"
    await queue.add("a")  # the pod changed while its worker held it
    await queue.retry_later("a")
    await queue.done("a")
    await queue.add("a")  # and again while it waits
    assert (len(queue), queue.delayed) == (0, 1)
    await queue.close()


async def test_forget_and_clear_drop_delayed_keys() -> None:
    queue = WorkQueue(backoff=Backoff(initial=0.01, cap=0.01, jitter=0.0))
    await queue.retry_later("gone")
    await queue.retry_later("lost")
    await queue.forget("gone")
    await queue.clear()
    await asyncio.sleep(0.05)  # past the backoff: nothing may show up
    assert (len(queue), queue.delayed, queue.failures("lost")) == (0, 0, 0)


async def test_a_cancelled_waiter_passes_its_wake_up_on() -> None:
    queue = WorkQueue()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    await queue.add("a")  # wakes the first waiter...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 5) == "a"
