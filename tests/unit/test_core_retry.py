"""Backoff delays and retry loops, run with an injected clock and random source."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest

from gpufleet.core.retry import Backoff, retry_async, retry_sync

EXACT = Backoff(initial=1.0, factor=2.0, cap=10.0, jitter=0.0)


class Flaky:
    """Fails `failures` times with `error`, then returns "done"; counts calls."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures = failures
        self.error = error if error is not None else ConnectionError("refused")
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"

    async def call_async(self) -> str:
        return self()


class RecordingSleep:
    """Records requested delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)

    async def call_async(self, seconds: float) -> None:
        self.delays.append(seconds)


def constant(value: float) -> Callable[[], float]:
    return lambda: value


def test_delay_grows_exponentially_without_jitter() -> None:
    assert [EXACT.delay(attempt) for attempt in range(4)] == [1.0, 2.0, 4.0, 8.0]


def test_delay_is_capped() -> None:
    assert EXACT.delay(10) == 10.0


def test_delay_survives_attempts_beyond_float_range() -> None:
    assert EXACT.delay(100_000) == 10.0


def test_full_jitter_scales_the_base_by_one_minus_rand() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=10.0, jitter=1.0)
    assert backoff.delay(2, rand=constant(0.25)) == 3.0


def test_partial_jitter_only_takes_its_share_off_the_base() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=10.0, jitter=0.5)
    assert backoff.delay(2, rand=constant(0.5)) == 3.0


def test_full_jitter_never_reaches_zero_delay() -> None:
    backoff = Backoff(initial=1.0, jitter=1.0)
    assert backoff.delay(0, rand=constant(0.0)) == 1.0


def test_delays_iterates_attempts_in_order() -> None:
    assert list(itertools.islice(EXACT.delays(), 5)) == [1.0, 2.0, 4.0, 8.0, 10.0]


def test_negative_attempt_is_rejected() -> None:
    with pytest.raises(ValueError, match="attempt"):
        EXACT.delay(-1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial": 0.0}, "initial"),
        ({"factor": 0.5}, "factor"),
        ({"initial": 5.0, "cap": 1.0}, "cap"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"initial": float("nan")}, "initial"),
    ],
)
def test_backoff_rejects_invalid_parameters(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Backoff(**kwargs)


def test_retry_sync_returns_the_first_success() -> None:
    assert retry_sync(Flaky(2), backoff=EXACT, attempts=5, sleep=RecordingSleep()) == "done"


def test_retry_sync_waits_the_backoff_between_failures() -> None:
    sleep = RecordingSleep()
    retry_sync(Flaky(3), backoff=EXACT, attempts=5, sleep=sleep)
    assert sleep.delays == [1.0, 2.0, 4.0]


def test_retry_sync_reraises_the_last_error_when_attempts_run_out() -> None:
    error = ConnectionError("still refused")
    with pytest.raises(ConnectionError) as caught:
        retry_sync(Flaky(10, error), backoff=EXACT, attempts=3, sleep=RecordingSleep())
    assert caught.value is error


def test_retry_sync_makes_exactly_attempts_calls() -> None:
    flaky = Flaky(10)
    with pytest.raises(ConnectionError):
        retry_sync(flaky, backoff=EXACT, attempts=3, sleep=RecordingSleep())
    assert flaky.calls == 3


def test_retry_sync_does_not_sleep_after_the_final_failure() -> None:
    sleep = RecordingSleep()
    with pytest.raises(ConnectionError):
        retry_sync(Flaky(10), backoff=EXACT, attempts=3, sleep=sleep)
    assert len(sleep.delays) == 2


def test_retry_sync_without_attempt_limit_keeps_going() -> None:
    flaky = Flaky(50)
    retry_sync(flaky, backoff=EXACT, attempts=None, sleep=RecordingSleep())
    assert flaky.calls == 51


def test_error_outside_retry_on_propagates_at_once() -> None:
    flaky = Flaky(3, ValueError("bad record"))
    with pytest.raises(ValueError, match="bad record"):
        retry_sync(
            flaky,
            backoff=EXACT,
            attempts=5,
            retry_on=(ConnectionError,),
            sleep=RecordingSleep(),
        )
    assert flaky.calls == 1


def test_on_retry_hears_attempt_error_and_delay() -> None:
    error = ConnectionError("refused")
    heard: list[tuple[int, BaseException, float]] = []
    retry_sync(
        Flaky(2, error),
        backoff=EXACT,
        attempts=5,
        sleep=RecordingSleep(),
        on_retry=lambda attempt, exc, delay: heard.append((attempt, exc, delay)),
    )
    assert heard == [(1, error, 1.0), (2, error, 2.0)]


def test_injected_rand_drives_the_jitter_of_each_wait() -> None:
    sleep = RecordingSleep()
    jittered = Backoff(initial=1.0, factor=2.0, cap=10.0, jitter=1.0)
    retry_sync(Flaky(2), backoff=jittered, attempts=5, sleep=sleep, rand=constant(0.5))
    assert sleep.delays == [0.5, 1.0]


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_below_one_are_rejected(attempts: int) -> None:
    with pytest.raises(ValueError, match="attempts"):
        retry_sync(Flaky(0), backoff=EXACT, attempts=attempts, sleep=RecordingSleep())


def test_empty_retry_on_is_rejected() -> None:
    with pytest.raises(ValueError, match="retry_on"):
        retry_sync(Flaky(0), backoff=EXACT, attempts=3, retry_on=(), sleep=RecordingSleep())


async def test_retry_async_waits_the_backoff_between_failures() -> None:
    sleep = RecordingSleep()
    result = await retry_async(
        Flaky(2).call_async, backoff=EXACT, attempts=5, sleep=sleep.call_async
    )
    assert (result, sleep.delays) == ("done", [1.0, 2.0])


async def test_retry_async_reraises_the_last_error_when_attempts_run_out() -> None:
    flaky = Flaky(10)
    with pytest.raises(ConnectionError):
        await retry_async(
            flaky.call_async, backoff=EXACT, attempts=2, sleep=RecordingSleep().call_async
        )
    assert flaky.calls == 2


async def test_retry_async_never_retries_cancellation() -> None:
    flaky = Flaky(3, asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await retry_async(
            flaky.call_async,
            backoff=EXACT,
            attempts=5,
            retry_on=(BaseException,),
            sleep=RecordingSleep().call_async,
        )
    assert flaky.calls == 1
