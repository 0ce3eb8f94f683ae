"""The token bucket, on simulated time."""

from __future__ import annotations

import asyncio

import pytest

from gpufleet.kube.ratelimit import TokenBucket


class FakeTime:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def bucket(qps: float, burst: int, fake: FakeTime) -> TokenBucket:
    return TokenBucket(qps, burst, clock=fake.clock, sleep=fake.sleep)


async def test_a_full_bucket_lets_a_burst_through_without_waiting() -> None:
    fake = FakeTime()
    limiter = bucket(10, 20, fake)
    for _ in range(20):
        await limiter.acquire()
    assert fake.sleeps == []


async def test_an_empty_bucket_waits_one_token_interval() -> None:
    fake = FakeTime()
    limiter = bucket(10, 10, fake)
    for _ in range(11):
        await limiter.acquire()
    assert sum(fake.sleeps) == pytest.approx(0.1)


async def test_calls_never_exceed_burst_plus_qps_times_elapsed() -> None:
    fake = FakeTime()
    qps, burst = 50.0, 100
    limiter = bucket(qps, burst, fake)
    start = fake.now
    granted: list[float] = []

    async def caller() -> None:
        for _ in range(30):
            await limiter.acquire()
            granted.append(fake.now)

    await asyncio.gather(*(caller() for _ in range(20)))

    assert len(granted) == 600
    for index, at in enumerate(granted):
        assert index + 1 <= burst + qps * (at - start) + 1e-6


async def test_a_refilled_bucket_never_holds_more_than_burst() -> None:
    fake = FakeTime()
    limiter = bucket(100, 100, fake)
    fake.now += 3600
    assert limiter.tokens == 100


async def test_waiters_are_served_first_come_first_served() -> None:
    fake = FakeTime()
    limiter = bucket(1, 1, fake)
    await limiter.acquire()
    order: list[int] = []

    async def caller(number: int) -> None:
        await limiter.acquire()
        order.append(number)

    tasks = []
    for number in range(10):
        tasks.append(asyncio.create_task(caller(number)))
        await asyncio.sleep(0)  # let each caller queue up before the next starts
    await asyncio.gather(*tasks)

    assert order == list(range(10))


async def test_a_cancelled_waiter_does_not_take_a_token() -> None:
    fake = FakeTime()
    blocked = asyncio.Event()

    async def never(seconds: float) -> None:
        blocked.set()
        await asyncio.Event().wait()

    limiter = TokenBucket(1, 1, clock=fake.clock, sleep=never)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await blocked.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    fake.now += 1
    assert limiter.tokens == pytest.approx(1)


@pytest.mark.parametrize(
    ("qps", "burst", "message"),
    [
        (0, 1, "qps must be"),
        (-1, 1, "qps must be"),
        (float("nan"), 1, "qps must be"),
        (float("inf"), 1, "qps must be"),
        (1, 0, "burst must be"),
        (1, 1.5, "burst must be"),
        (50, 10, r"burst \(10\) must be >= qps \(50\)"),
    ],
)
def test_invalid_rates_are_refused(qps: float, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBucket(qps, burst)
