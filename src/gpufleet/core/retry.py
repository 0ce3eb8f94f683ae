"""Exponential backoff with full jitter, and retry loops (async and sync) built on it.

The clock is always a parameter (`sleep`, `rand`), so callers' tests can run a
retry loop instantly and deterministically.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import TypeVar

__all__ = ["Backoff", "retry_async", "retry_sync"]

T = TypeVar("T")

# Retrying these would make a task or process impossible to stop, even when a
# caller asks to retry on BaseException.
_NEVER_RETRIED: tuple[type[BaseException], ...] = (
    asyncio.CancelledError,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: `initial * factor**attempt`, capped at `cap`, with jitter.

    `jitter` scales "full jitter": with 1.0 each delay is drawn uniformly from
    (0, base], which spreads a fleet of retrying clients apart; with 0.0 the
    delay is exactly the base, which is what tests and single clients want.
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValueError(f"Backoff initial must be > 0, got {self.initial!r}")
        if not self.factor >= 1:
            raise ValueError(f"Backoff factor must be >= 1, got {self.factor!r}")
        if not self.cap >= self.initial:
            raise ValueError(f"Backoff cap must be >= initial ({self.initial!r}), got {self.cap!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff jitter must be between 0 and 1, got {self.jitter!r}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The delay in seconds before retry number `attempt` (0 for the first retry).

        `rand` returns a float in [0, 1); the result lies in
        `(base * (1 - jitter), base]` where `base = min(cap, initial * factor**attempt)`.
        """
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt!r}")
        try:
            base = min(self.cap, self.initial * self.factor**attempt)
        except OverflowError:
            # A long outage reaches attempts where the power no longer fits a float.
            base = self.cap
        return base * (1.0 - self.jitter * rand())

    def delays(self, rand: Callable[[], float] = random.random) -> Iterator[float]:
        """An endless sequence of delays: attempt 0, 1, 2, ..."""
        for attempt in count():
            yield self.delay(attempt, rand)


@dataclass(frozen=True)
class _Plan:
    """The decision shared by the async and sync loops: give up, or wait how long."""

    backoff: Backoff
    attempts: int | None
    retry_on: tuple[type[BaseException], ...]
    rand: Callable[[], float]
    on_retry: Callable[[int, BaseException, float], None] | None

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be >= 1 or None, got {self.attempts!r}")
        if not self.retry_on:
            raise ValueError("retry_on must name at least one exception type")

    def delay_after(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait after failed call number `attempt` (1-based), or None to give up."""
        if isinstance(error, _NEVER_RETRIED) or not isinstance(error, self.retry_on):
            return None
        if self.attempts is not None and attempt >= self.attempts:
            return None
        wait = self.backoff.delay(attempt - 1, self.rand)
        if self.on_retry is not None:
            self.on_retry(attempt, error, wait)
        return wait


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    attempts: int | None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    rand: Callable[[], float] = random.random,
) -> T:
    """Await `fn()` until it succeeds, waiting `backoff` between failed calls.

    `attempts` is the total number of calls (None: retry forever). Only
    exceptions in `retry_on` are retried; others, cancellation, and the last
    failure once attempts run out propagate unchanged. `on_retry(attempt, error,
    delay)` runs before each wait, which is where callers log the failure.
    """
    plan = _Plan(backoff, attempts, retry_on, rand, on_retry)
    for attempt in count(1):
        try:
            return await fn()
        except BaseException as error:
            wait = plan.delay_after(attempt, error)
            if wait is None:
                raise
        await sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - count() never ends


def retry_sync(
    fn: Callable[[], T],
    *,
    backoff: Backoff,
    attempts: int | None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    rand: Callable[[], float] = random.random,
) -> T:
    """Call `fn()` until it succeeds; the blocking twin of `retry_async`, same rules."""
    plan = _Plan(backoff, attempts, retry_on, rand, on_retry)
    for attempt in count(1):
        try:
            return fn()
        except BaseException as error:
            wait = plan.delay_after(attempt, error)
            if wait is None:
                raise
        sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - count() never ends
