"""A deduplicating, rate-limited work queue, like client-go's: a key waits at most once.

Events about a pod can arrive faster than workers drain them (an update storm,
a relist). The queue holds each key once; a key added again while it waits is
not added twice, and a key added while a worker holds it is queued again after
the worker is done, so the latest state is always looked at once more.

A key whose work failed is not retried by the worker that holds it: the worker
calls ``retry_later`` and is free at once, and the key comes back after its own
exponential backoff (client-go's ``AddRateLimited``). One hung kubelet then
costs its pods' retries, never a worker for the whole backoff. While a key waits
for its backoff, adding it again (an update of the pod) does not cut the wait
short; ``reset`` (success, or giving up) clears its failure count.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable

from gpufleet.core.retry import Backoff

DEFAULT_BACKOFF = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.5)
"""1 s, 2 s, 4 s, ... up to 30 s, each drawn from the upper half of its step."""


class WorkQueue:
    """FIFO of unique keys with "processing" tracking, per-key backoff and a depth callback.

    Every method runs on the event loop without awaiting anything but a free
    key, so each is atomic; they are ``async`` for the callers' symmetry.
    """

    def __init__(
        self,
        on_depth: Callable[[int], None] = lambda depth: None,
        *,
        backoff: Backoff = DEFAULT_BACKOFF,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._delayed: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._on_depth = on_depth
        self._backoff = backoff
        self._rand = rand
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def delayed(self) -> int:
        """Keys waiting out their backoff (not counted in ``len``)."""
        return len(self._delayed)

    def failures(self, key: str) -> int:
        """How often ``key`` was sent back with ``retry_later`` since its last ``reset``."""
        return self._failures.get(key, 0)

    async def add(self, key: str) -> None:
        """Queue ``key`` unless it is already waiting (or waiting out its backoff)."""
        self._add(key)

    def _add(self, key: str) -> None:
        if self._closed or key in self._queued or key in self._delayed:
            return
        if key in self._processing:
            self._dirty.add(key)  # look again once the current worker is done
            return
        self._push(key)

    def _push(self, key: str) -> None:
        self._queue.append(key)
        self._queued.add(key)
        self._on_depth(len(self._queue))
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def add_after(self, key: str, delay: float) -> None:
        """Queue ``key`` in ``delay`` seconds; a key already waiting keeps its place."""
        if self._closed or key in self._queued or key in self._delayed:
            return
        if delay <= 0:
            self._add(key)
            return
        loop = asyncio.get_running_loop()
        self._delayed[key] = loop.call_later(delay, self._due, key)

    def _due(self, key: str) -> None:
        self._delayed.pop(key, None)
        self._add(key)

    async def retry_later(self, key: str) -> float:
        """Queue ``key`` again after its next backoff step; returns the delay in seconds."""
        delay = self._backoff.delay(self._failures.get(key, 0), self._rand)
        self._failures[key] = self._failures.get(key, 0) + 1
        await self.add_after(key, delay)
        return delay

    async def reset(self, key: str) -> None:
        """Forget the failures of ``key``: its next retry starts at the first step."""
        self._failures.pop(key, None)

    async def get(self) -> str | None:
        """The next key, marked as processing; ``None`` once the queue is closed."""
        while not self._queue and not self._closed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the wake-up on: a key is waiting for someone
                raise
        if not self._queue:
            return None
        key = self._queue.popleft()
        self._queued.discard(key)
        self._processing.add(key)
        self._on_depth(len(self._queue))
        return key

    async def done(self, key: str) -> None:
        """The worker has finished ``key``; re-queue it if it changed meanwhile."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self._add(key)  # unless retry_later just sent it to wait out its backoff

    async def forget(self, key: str) -> None:
        """Drop ``key`` entirely (the object is gone): waiting, delayed and its failures."""
        self._dirty.discard(key)
        self._failures.pop(key, None)
        timer = self._delayed.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._queued:
            self._queued.discard(key)
            self._queue.remove(key)
            self._on_depth(len(self._queue))

    async def clear(self) -> None:
        """Drop every waiting key (leadership lost: the new leader starts over)."""
        self._queue.clear()
        self._queued.clear()
        self._dirty.clear()
        self._failures.clear()
        for timer in self._delayed.values():
            timer.cancel()
        self._delayed.clear()
        self._on_depth(0)

    async def close(self) -> None:
        """Wake every waiting worker with ``None``; delayed keys never come."""
        self._closed = True
        for timer in self._delayed.values():
            timer.cancel()
        self._delayed.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
