"""One watch as its consumer sees it: a bounded queue the store fills, taken in order.

The store appends every write's event to each open ``Watcher`` (``offer``),
synchronously and without waiting on anyone; the consumer (the server's
stream) takes them with ``get`` or in batches with ``take``, optionally
lingering so that writes close together leave in one batch. A watcher whose
queue of live events reaches its bound is evicted: it raises
``WatcherEvictedError`` and the client resumes or relists. ``bookmark`` gives
the resourceVersion a resume from here misses nothing at. The store is
``store``; what an event is, ``events``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from gpufleet.deviceapi.errors import UnavailableError, WatcherEvictedError
from gpufleet.deviceapi.events import BOOKMARK, WatchItem
from gpufleet.deviceapi.selector import Selector
from gpufleet.deviceapi.v1alpha1 import gpu_pb2 as pb


class WatcherClosedError(UnavailableError):
    """``get`` on a watcher closed by its consumer or by ``GpuStore.close`` (shutdown)."""


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Watcher:
    """One watch: a bounded queue the store fills; closed (evicted) when it overflows.

    Events returned by ``get`` and items returned by ``take`` are shared with
    other watchers: do not mutate them.
    """

    def __init__(
        self,
        selector: Selector | None,
        backlog: list[WatchItem],
        limit: int,
        start_rv: int,
        *,
        position: Callable[[], int],
        on_close: Callable[[Watcher], None],
        initial: bool = False,
    ) -> None:
        """A watch from ``start_rv`` with ``backlog`` queued and room for ``limit`` live events.

        ``position`` is the store's current RV (a caught-up bookmark);
        ``on_close`` tells the store its consumer closed the watch.
        """
        self._position = position
        self._on_close = on_close
        self.selector = selector
        """The label selector; None watches everything."""
        # The replay/initial burst is allowed on top of the bound: only live events
        # that pile up beyond `limit` mean the consumer is too slow.
        self._queue: deque[WatchItem] = deque(backlog)
        self._backlog = len(backlog)
        self._limit = limit
        self._waiter: asyncio.Future[bool] | None = None
        # The store wakes the waiter once the queue holds this many items (a
        # lingering sender waits for a full batch, everyone else for one item).
        self._wake_len = 1
        self._last_rv = start_rv
        self._start_rv = start_rv
        # A watch from "" starts with the current state as ADDED, each at its own
        # object's RV: until the last of those is taken, no RV is a resume point.
        self._initial = initial and bool(backlog)
        self.closed = False
        self.evicted = False
        self._evicted_why = ""

    # The server polls with a timeout to send bookmarks; a parameter is cheaper than
    # wrapping every call in asyncio.timeout (a task-level cancel scope per event).
    async def get(self, timeout: float | None = None) -> pb.WatchEvent | None:  # noqa: ASYNC109
        """The next event; None after ``timeout`` seconds without one.

        Raises ``WatcherEvictedError`` once evicted (nothing more is delivered),
        ``WatcherClosedError`` once closed.
        """
        queue = self._queue
        if not queue and not await self._wait(timeout):
            return None
        item = queue.popleft()
        self._last_rv = item[0]
        if self._backlog:
            self._backlog -= 1
            self._passed_backlog()
        return item[1]

    async def take(
        self,
        max_events: int,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109
        linger: float = 0.0,
    ) -> list[WatchItem]:
        """Every queued item up to a cap, in order; [] after ``timeout`` seconds without one.

        At most ``max_events`` items whose batch entries (``head + wire``) add up
        to at most ``max_bytes``, except that the first item is always taken, so
        a single larger event goes alone. Raises like ``get``.

        With ``linger`` > 0, once an item is queued this waits until ``linger``
        seconds after that item was *recorded* by the store, or until
        ``max_events`` items are queued, whichever comes first, so that events
        written close together leave in one batch. An item recorded longer ago
        than that (a replay, or a sender running late) is taken at once.
        """
        queue = self._queue
        if not queue and not await self._wait(timeout):
            return []
        if linger > 0 and len(queue) < max_events:
            delay = queue[0][4] + linger - time.monotonic()
            if delay > 0:
                await self._linger(delay, max_events)
        first = queue.popleft()
        taken = [first]
        size = len(first[3]) + len(first[2])
        while queue and len(taken) < max_events:
            head, wire = queue[0][3], queue[0][2]
            size += len(head) + len(wire)
            if size > max_bytes:
                break
            taken.append(queue.popleft())
        self._last_rv = taken[-1][0]
        if self._backlog:
            self._backlog = max(0, self._backlog - len(taken))
            self._passed_backlog()
        return taken

    def _passed_backlog(self) -> None:
        """Once the initial state is all taken, the position is the watch's start RV."""
        if self._initial and not self._backlog:
            self._initial = False
            # The initial ADDED events carry their objects' RVs, all at or below the
            # start; resuming from the last of them would replay deletes from before it.
            self._last_rv = max(self._last_rv, self._start_rv)

    async def _wait(self, timeout: float | None) -> bool:  # noqa: ASYNC109
        """Wait until an item is queued: True then, False after ``timeout`` seconds."""
        queue = self._queue
        while not queue:
            if self.evicted:
                raise WatcherEvictedError(self._evicted_why)
            if self.closed:
                raise WatcherClosedError("the watch was closed")
            if timeout is not None and timeout <= 0:
                return False
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[bool] = loop.create_future()
            self._waiter = waiter
            handle = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                woken = await waiter
            finally:
                self._waiter = None
                if handle is not None:
                    handle.cancel()
            if not woken and not queue:
                return False
        return True

    async def _linger(self, delay: float, count: int) -> None:
        """Wait ``delay`` seconds, or until ``count`` items are queued; raises like ``get``."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        self._wake_len = count
        handle = loop.call_later(delay, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            self._wake_len = 1
            handle.cancel()
        if self.evicted:
            raise WatcherEvictedError(self._evicted_why)
        if self.closed:
            raise WatcherClosedError("the watch was closed")

    def bookmark(self) -> pb.WatchEvent:
        """A BOOKMARK at this watcher's position: resuming from it misses nothing.

        Caught up (empty queue), that is the store's current RV, because every
        write fans out synchronously; otherwise the RV of the last event returned
        (the watch's start RV once the initial state is all taken). While a watch
        from ``""`` still has initial ADDED events queued there is no such RV, as
        in Kubernetes (no bookmark before the initial events end): that raises
        ``RuntimeError``. The server asks only when the queue is empty.
        """
        if self._initial and self._queue:
            raise RuntimeError(
                "no bookmark while the initial state is still queued: no resourceVersion"
                " resumes from the middle of it"
            )
        rv = self._last_rv if self._queue else self._position()
        event = pb.WatchEvent(type=BOOKMARK)
        event.object.metadata.resource_version = str(rv)
        return event

    @property
    def pending(self) -> int:
        """Events queued and not yet taken."""
        return len(self._queue)

    def close(self) -> None:
        """Stop the watch; pending events are dropped (idempotent)."""
        if self.closed:
            return
        self.shut()
        self._on_close(self)

    def offer(self, item: WatchItem) -> bool:
        """Queue a live event and wake the consumer; False, queuing nothing, when it is full.

        Full means ``limit`` live events beyond the initial backlog: the store
        then evicts the watcher instead of waiting for it.
        """
        queue = self._queue
        if len(queue) - self._backlog >= self._limit:
            return False
        queue.append(item)
        waiter = self._waiter
        if waiter is not None and len(queue) >= self._wake_len and not waiter.done():
            waiter.set_result(True)
        return True

    def shut(self) -> None:
        """Close without telling the store (the store is closing, or evicting, this one)."""
        self.closed = True
        self._queue.clear()
        self._backlog = 0
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def evict(self) -> None:
        """Close because the queue overflowed: ``get`` and ``take`` raise Evicted from now on."""
        self._evicted_why = (
            f"the watcher fell behind: more than {self._limit} events queued; resume from the"
            f" last resourceVersion received ({self._last_rv}) or relist"
        )
        self.evicted = True
        self.shut()
