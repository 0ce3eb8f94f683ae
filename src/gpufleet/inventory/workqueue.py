"""A deduplicating work queue, like client-go's: a key waits at most once.

Events about a pod can arrive faster than workers drain them (an update storm,
a relist). The queue holds each key once; a key added again while it waits is
not added twice, and a key added while a worker holds it is queued again after
the worker is done, so the latest state is always looked at once more.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class WorkQueue:
    """FIFO of unique keys with "processing" tracking and a depth callback."""

    def __init__(self, on_depth: Callable[[int], None] = lambda depth: None) -> None:
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._ready = asyncio.Condition()
        self._on_depth = on_depth
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    async def add(self, key: str) -> None:
        """Queue ``key`` unless it is already waiting."""
        async with self._ready:
            if self._closed or key in self._queued:
                return
            if key in self._processing:
                self._dirty.add(key)  # look again once the current worker is done
                return
            self._queue.append(key)
            self._queued.add(key)
            self._on_depth(len(self._queue))
            self._ready.notify()

    async def get(self) -> str | None:
        """The next key, marked as processing; ``None`` once the queue is closed."""
        async with self._ready:
            while not self._queue and not self._closed:
                await self._ready.wait()
            if not self._queue:
                return None
            key = self._queue.popleft()
            self._queued.discard(key)
            self._processing.add(key)
            self._on_depth(len(self._queue))
            return key

    async def done(self, key: str) -> None:
        """The worker has finished ``key``; re-queue it if it changed meanwhile."""
        async with self._ready:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                if not self._closed and key not in self._queued:
                    self._queue.append(key)
                    self._queued.add(key)
                    self._on_depth(len(self._queue))
                    self._ready.notify()

    async def forget(self, key: str) -> None:
        """Drop a waiting ``key`` (the object is gone)."""
        async with self._ready:
            self._dirty.discard(key)
            if key in self._queued:
                self._queued.discard(key)
                self._queue.remove(key)
                self._on_depth(len(self._queue))

    async def clear(self) -> None:
        """Drop every waiting key (leadership lost: the new leader starts over)."""
        async with self._ready:
            self._queue.clear()
            self._queued.clear()
            self._dirty.clear()
            self._on_depth(0)

    async def close(self) -> None:
        """Wake every waiting worker with ``None``."""
        async with self._ready:
            self._closed = True
            self._ready.notify_all()
