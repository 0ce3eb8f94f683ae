"""``WriteTurn`` and ``WriteLine``: how overlapping PostgreSQL writes wait for each other.

No server: every write here ends before the exporter opens its pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from gpufleet.inventory.errors import EarlierWriteFailed, PermanentExporterError
from gpufleet.inventory.exporters.postgres.exporter import PostgresExporter
from gpufleet.inventory.exporters.postgres.ordering import WriteLine, WriteTurn
from gpufleet.inventory.exporters.postgres.settings import PostgresSettings
from gpufleet.inventory.reading import Reading


def reading() -> Reading:
    return Reading(
        cluster="c1", node="node-a", machine="i-a", source="nvml", chassis="", gpu="SN-1",
        read_time=datetime(2026, 11, 24, tzinfo=UTC), uuid="GPU-1",
        model="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:18:00.0", index=0,
    )  # fmt: skip


def settings(**overrides: Any) -> PostgresSettings:
    values: dict[str, Any] = {
        "postgres_host": "db.example",
        "postgres_db": "inventory",
        "postgres_user": "gpufleet",
    }
    values.update(overrides)
    return PostgresSettings(**values)


async def finished(committed: bool) -> WriteTurn:
    turn = WriteTurn(None)
    turn.finish(committed)
    return turn


# --- statements_done -----------------------------------------------------------------------


async def test_statements_are_done_only_once_every_part_is_ready() -> None:
    turn = WriteTurn(None)
    parts = [turn.part() for _ in range(3)]
    assert not turn.statements_done.is_set()
    parts[0]()
    parts[2]()
    assert not turn.statements_done.is_set()
    parts[1]()
    assert turn.statements_done.is_set()


async def test_ready_called_twice_counts_once() -> None:
    turn = WriteTurn(None)
    first, second = turn.part(), turn.part()
    first()
    first()  # a part that failed after its statements calls ready again from finally
    assert not turn.statements_done.is_set()
    second()
    assert turn.statements_done.is_set()
    second()
    first()
    assert turn.statements_done.is_set()


async def test_a_single_part_is_done_when_it_is_ready() -> None:
    turn = WriteTurn(None)
    ready = turn.part()
    assert not turn.statements_done.is_set()
    ready()
    assert turn.statements_done.is_set()


async def test_a_waiter_on_statements_done_wakes_when_the_last_part_is_ready() -> None:
    ahead = WriteTurn(None)
    first, second = ahead.part(), ahead.part()
    waiter = asyncio.create_task(ahead.statements_done.wait())
    first()
    await asyncio.sleep(0)
    assert not waiter.done()
    second()
    await asyncio.wait_for(waiter, 5)


async def test_finish_sets_statements_done_even_when_parts_never_reported() -> None:
    # A part that failed before it got a connection never calls ready().
    turn = WriteTurn(None)
    turn.part()
    turn.finish(False)
    assert turn.statements_done.is_set()


# --- ahead_ok ------------------------------------------------------------------------------


async def test_ahead_ok_without_a_turn_ahead_is_true_at_once() -> None:
    assert await WriteTurn(None).ahead_ok() is True


@pytest.mark.parametrize("committed", [True, False])
async def test_ahead_ok_waits_for_the_turn_ahead_and_returns_its_outcome(committed: bool) -> None:
    ahead = WriteTurn(None)
    turn = WriteTurn(ahead)
    assert turn.ahead is ahead
    waiting = asyncio.create_task(turn.ahead_ok())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiting.done()
    ahead.finish(committed)
    assert await asyncio.wait_for(waiting, 5) is committed


async def test_cancelling_one_waiter_leaves_the_turn_ahead_pending_for_the_others() -> None:
    ahead = WriteTurn(None)
    turn = WriteTurn(ahead)
    cancelled = asyncio.create_task(turn.ahead_ok())
    other = asyncio.create_task(turn.ahead_ok())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not ahead.outcome.done()
    ahead.finish(True)
    assert await asyncio.wait_for(other, 5) is True


# --- finish --------------------------------------------------------------------------------


@pytest.mark.parametrize("committed", [True, False])
async def test_finish_records_the_outcome(committed: bool) -> None:
    turn = WriteTurn(None)
    turn.finish(committed)
    assert turn.outcome.done()
    assert turn.outcome.result() is committed
    assert turn.statements_done.is_set()


@pytest.mark.parametrize("committed", [True, False])
async def test_the_first_finish_wins(committed: bool) -> None:
    turn = WriteTurn(None)
    turn.finish(committed)
    turn.finish(not committed)
    turn.finish(not committed)
    assert turn.outcome.result() is committed


async def test_finish_drops_the_turn_ahead() -> None:
    ahead = WriteTurn(None)
    turn = WriteTurn(ahead)
    assert turn.ahead is ahead
    turn.finish(False)
    assert turn.ahead is None
    assert not ahead.outcome.done()  # finishing a turn says nothing about the one ahead


async def test_a_chain_of_turns_each_points_at_the_one_before() -> None:
    first = WriteTurn(None)
    second = WriteTurn(first)
    third = WriteTurn(second)
    assert (first.ahead, second.ahead, third.ahead) == (None, first, second)
    first.finish(True)
    # second is still in flight: a turn created now still queues behind it.
    fourth = WriteTurn(third)
    assert fourth.ahead is third


@pytest.mark.parametrize("committed", [True, False])
async def test_a_turn_behind_a_finished_turn_knows_its_outcome_at_once(committed: bool) -> None:
    # In a line, a write called after the one ahead ended still stands behind
    # it: behind a failure it must not commit, however late it was called.
    ahead = await finished(committed)
    turn = WriteTurn(ahead)
    assert turn.ahead is ahead
    assert turn.ahead_known_ok() is committed
    assert turn.ahead_known_failed() is not committed
    assert await turn.ahead_ok() is committed


async def test_a_turn_behind_one_that_finishes_later_stays_in_line() -> None:
    ahead = WriteTurn(None)
    turn = WriteTurn(ahead)
    ahead.finish(False)
    assert turn.ahead is ahead  # chained when it was created, so its outcome counts
    assert turn.ahead_known_failed()
    assert await turn.ahead_ok() is False


# --- ahead_known_ok / ahead_known_failed -----------------------------------------------------


async def test_what_is_known_of_the_turn_ahead() -> None:
    # (state of the turn ahead) -> (ahead_known_ok, ahead_known_failed)
    none = WriteTurn(None)
    assert (none.ahead_known_ok(), none.ahead_known_failed()) == (True, False)

    pending = WriteTurn(WriteTurn(None))
    assert (pending.ahead_known_ok(), pending.ahead_known_failed()) == (False, False)

    ok_ahead, failed_ahead = WriteTurn(None), WriteTurn(None)
    behind_ok, behind_failed = WriteTurn(ok_ahead), WriteTurn(failed_ahead)
    ok_ahead.finish(True)
    failed_ahead.finish(False)
    assert (behind_ok.ahead_known_ok(), behind_ok.ahead_known_failed()) == (True, False)
    assert (behind_failed.ahead_known_ok(), behind_failed.ahead_known_failed()) == (False, True)


async def test_the_answers_are_plain_booleans() -> None:
    ahead = WriteTurn(None)
    turn = WriteTurn(ahead)
    assert turn.ahead_known_ok() is False
    assert turn.ahead_known_failed() is False
    ahead.finish(True)
    assert turn.ahead_known_ok() is True
    assert turn.ahead_known_failed() is False


# --- lines ----------------------------------------------------------------------------------


class TurnRecorder:
    """Stands in for the exporter: records the turn each write of a line was given."""

    def __init__(self) -> None:
        self.turns: list[tuple[list[int], WriteTurn]] = []

    def write_in_turn(self, batch: list[int], turn: WriteTurn) -> Coroutine[Any, Any, None]:
        self.turns.append((batch, turn))
        return asyncio.sleep(0)


async def test_a_line_takes_each_place_when_write_is_called_not_when_it_runs() -> None:
    recorder = TurnRecorder()
    line = WriteLine(recorder)  # type: ignore[arg-type]
    writes = [line.write([n]) for n in range(3)]  # none has run yet
    (b0, t0), (b1, t1), (b2, t2) = recorder.turns
    assert (b0, b1, b2) == ([0], [1], [2])
    assert (t0.ahead, t1.ahead, t2.ahead) == (None, t0, t1)
    for write in reversed(writes):  # the order they run in changes nothing
        await write


async def test_each_line_starts_behind_nothing() -> None:
    recorder = TurnRecorder()
    first, second = WriteLine(recorder), WriteLine(recorder)  # type: ignore[arg-type]
    await first.write([1])
    await second.write([2])
    assert [turn.ahead for _, turn in recorder.turns] == [None, None]


def naive() -> Reading:
    return replace(reading(), read_time=reading().read_time.replace(tzinfo=None))


async def test_a_line_stops_at_its_first_failure_without_touching_the_server() -> None:
    # db.example is never reached: every write here fails, or ends, before the pool.
    exporter = PostgresExporter(settings())
    line = exporter.line()
    with pytest.raises(PermanentExporterError):
        await line.write([naive()])
    for batch in ([reading()], []):
        with pytest.raises(EarlierWriteFailed):
            await line.write(batch)
    assert exporter._pool is None
    await exporter.line().write([])  # a new line is not held back by the old one


async def test_a_plain_write_is_in_no_line() -> None:
    exporter = PostgresExporter(settings())
    line = exporter.line()
    with pytest.raises(PermanentExporterError):
        await line.write([naive()])
    with pytest.raises(PermanentExporterError):
        await exporter.write([naive()])  # its own error, not EarlierWriteFailed
    await exporter.write([])


async def test_write_in_turn_fails_at_once_behind_a_failed_turn() -> None:
    exporter = PostgresExporter(settings())
    turn = WriteTurn(await finished(False))
    with pytest.raises(EarlierWriteFailed) as caught:
        await exporter.write_in_turn([reading()], turn)
    assert caught.value.error_type == "aborted"
    assert turn.outcome.result() is False
    assert turn.statements_done.is_set()


async def test_an_empty_write_takes_the_outcome_of_the_turn_ahead() -> None:
    exporter = PostgresExporter(settings())
    ahead = WriteTurn(None)
    empty = WriteTurn(ahead)
    behind = WriteTurn(empty)
    task = asyncio.create_task(exporter.write_in_turn([], empty))
    await asyncio.sleep(0)
    ahead.finish(False)
    with pytest.raises(EarlierWriteFailed):
        await task
    assert behind.ahead_known_failed()


# --- batches_in_flight ---------------------------------------------------------------------


def in_flight(pool_max: int | None, parallelism: int | None, wanted: int | None) -> int:
    names = ("postgres_pool_max", "postgres_write_parallelism", "postgres_batches_in_flight")
    given = dict(zip(names, (pool_max, parallelism, wanted), strict=True))
    return settings(**{k: v for k, v in given.items() if v is not None}).batches_in_flight


@pytest.mark.parametrize(
    ("pool_max", "parallelism", "wanted", "expected"),
    [
        (None, None, None, 4),  # the defaults: pool of 6, one kept free, one part, 4 wanted
        (None, 2, None, 2),  # (6 - 1) // 2
        (5, 2, None, 2),  # (5 - 1) // 2
        (4, 2, 3, 1),  # (4 - 1) // 2
        (1, None, None, 1),  # one connection: one part, one batch
        (1, None, 16, 1),
        (3, 2, None, 1),
        (5, 8, None, 1),  # parts capped at the pool's 5; (5 - 1) // 5 is 0, but one at least
        (None, None, 1, 1),
        (100, None, 16, 16),
        (100, 1, None, 4),
        (100, 2, None, 4),
        (13, 2, 8, 6),
        (5, None, 8, 4),  # (5 - 1) // 1
    ],
)
def test_batches_in_flight_fits_the_pool(
    pool_max: int | None, parallelism: int | None, wanted: int | None, expected: int
) -> None:
    assert in_flight(pool_max, parallelism, wanted) == expected


def test_the_exporter_takes_its_max_in_flight_from_the_settings() -> None:
    assert PostgresExporter(settings()).max_in_flight == 4
    capped = settings(postgres_pool_max=5, postgres_write_parallelism=2)
    assert PostgresExporter(capped).max_in_flight == 2


@pytest.mark.parametrize("value", [0, 17])
def test_batches_in_flight_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="postgres_batches_in_flight"):
        settings(postgres_batches_in_flight=value)
