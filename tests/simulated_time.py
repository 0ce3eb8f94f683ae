"""Simulated time for the rate limiter: count its grants against a clock that nothing waits on.

A `TokenBucket` takes its clock and sleep as parameters. Given these, a
sleep moves the clock instead of waiting, and every grant is recorded at
its simulated moment, so a test can state "at most ``burst + qps * t``
requests by time ``t``" exactly, however slow the machine. The bucket
serves waiters one at a time under its lock, so concurrent sleepers never
move the clock twice for one wait.
"""

from __future__ import annotations

import asyncio

from gpufleet.kube.ratelimit import TokenBucket


class SimulatedTime:
    """A clock and a sleep for a `TokenBucket`: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        """Seconds of simulated time so far."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Pass `seconds` of simulated time at once, and let the loop run."""
        self.now += seconds
        await asyncio.sleep(0)


class GrantRecordingBucket(TokenBucket):
    """A bucket on simulated time that records the simulated moment of every grant."""

    def __init__(self, qps: float, burst: int, time: SimulatedTime | None = None) -> None:
        self.time = time if time is not None else SimulatedTime()
        super().__init__(qps, burst, clock=self.time.clock, sleep=self.time.sleep)
        self.grants: list[float] = []

    async def acquire(self) -> None:
        """Take a token as the real bucket does, and record when (in simulated time)."""
        await super().acquire()
        self.grants.append(self.time.now)


def beyond_bucket(grants: list[float], qps: float, burst: int) -> list[tuple[int, float]]:
    """The grants that broke ``count <= burst + qps * t`` (none, for a working bucket).

    The tolerance is for the float sum of the simulated sleeps.
    """
    return [
        (count, granted)
        for count, granted in enumerate(grants, start=1)
        if count > burst + qps * granted + 1e-6
    ]


def held_back(grants: list[float], qps: float, burst: int) -> bool:
    """Whether the bucket made the calls beyond ``burst`` wait (unlimited, all come at 0)."""
    return bool(grants) and grants[-1] + 1e-6 >= (len(grants) - burst) / qps
