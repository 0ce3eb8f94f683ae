"""A token bucket that paces calls to the Kubernetes API (`QPS` / `BURST`)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

__all__ = ["TokenBucket"]

_EPSILON = 1e-9


class TokenBucket:
    """Allow bursts of up to `burst` calls, then `qps` calls per second on average.

    The bucket starts full. Every `acquire()` takes one token, waiting for the
    bucket to refill when it is empty. Waiters are served first come, first
    served, so a flood of new callers cannot starve one that has waited longer.
    Over any stretch of `elapsed` seconds at most `burst + qps * elapsed` calls
    get through.

    `clock` and `sleep` are parameters so tests can run it on simulated time.
    """

    def __init__(
        self,
        qps: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if isinstance(qps, bool) or not (math.isfinite(qps) and qps > 0):
            raise ValueError(f"qps must be a finite number > 0, got {qps!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        if burst < qps:
            # gpuid's rule: a bucket smaller than one second of traffic could
            # never let `qps` calls through in a second, so QPS would be a lie.
            raise ValueError(f"burst ({burst}) must be >= qps ({qps:g})")
        self.qps = float(qps)
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated = clock()
        # asyncio.Lock hands itself to waiters in FIFO order; the holder sleeps
        # while holding it, which is what queues later callers behind it.
        self._lock = asyncio.Lock()

    @property
    def tokens(self) -> float:
        """Tokens available right now (after refilling for the time passed)."""
        self._refill()
        return self._tokens

    async def acquire(self) -> None:
        """Take one token, waiting first-come-first-served until one is available."""
        async with self._lock:
            self._refill()
            # The tolerance stops float rounding from adding a second, tiny sleep.
            while self._tokens < 1.0 - _EPSILON:
                await self._sleep((1.0 - self._tokens) / self.qps)
                self._refill()
            self._tokens = max(0.0, self._tokens - 1.0)

    def _refill(self) -> None:
        now = self._clock()
        # max() guards against a clock that steps backwards (a bad fake, or
        # a caller passing time.time): never take tokens away.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.qps)
        self._updated = now
