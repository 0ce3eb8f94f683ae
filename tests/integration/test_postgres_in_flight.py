"""Overlapping PostgreSQL writes against a real server: they commit, or fail, in call order.

Each test writes tables of its own (dropped afterwards). A write is held at a
known point with a lock taken from another connection (a placement row, or
an advisory lock a deferred trigger waits on), and pg_stat_activity says when
it got there, so no test depends on how long anything takes.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg import sql

from gpufleet.core.retry import Backoff
from gpufleet.inventory.delivery import DeliveryConfig, DeliveryPipeline
from gpufleet.inventory.errors import EarlierWriteFailed, ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.postgres import PostgresExporter, PostgresSettings
from gpufleet.inventory.exporters.postgres.exporter import split_batch
from gpufleet.inventory.exporters.postgres.ordering import WriteTurn
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool
from tests.integration.postgres_support import (
    T0,
    Server,
    count,
    drop_tables,
    fleet_batches,
    make_settings,
    new_tables,
    placements,
    reading,
    server,
)
from tests.polling import eventually

__all__ = ["server"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.integration

APP = "gpufleet-inventory"  # the exporter's application_name
LIMIT = 30.0  # seconds before a wait is a hang, not a slow machine
T1 = T0 + timedelta(hours=1)
FAST = Backoff(initial=0.001, factor=2.0, cap=0.01, jitter=0.0)


def split_settings(server: Server, tables: tuple[str, str], **overrides: Any) -> PostgresSettings:
    """Batches of 256 readings or more in two parts, three in flight: parts and batches overlap.

    Not the defaults (one part, four in flight), but the harder case: one
    batch's parts wait on each other's ahead, and a batch commits in two.
    """
    values: dict[str, Any] = {
        "postgres_write_parallelism": 2,
        "postgres_batches_in_flight": 3,
        "postgres_pool_max": 8,
    }
    return make_settings(server, tables, **(values | overrides))


@pytest.fixture
def tables(server: Server) -> Iterator[tuple[str, str]]:
    """Fresh table names (and anything named after them: functions, sequences), dropped after."""
    names = new_tables()
    yield names
    with server.connect() as conn:
        for kind in ("FUNCTION", "SEQUENCE"):
            for suffix in ("hold", "fail_once"):
                name = sql.Identifier(f"{names[0]}_{suffix}")
                conn.execute(sql.SQL(f"DROP {kind} IF EXISTS {{}} CASCADE").format(name))
    drop_tables(server, names)


# --- helpers -------------------------------------------------------------------------------


async def aconnect(server: Server, *, autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        host=server.host, port=server.port, user=server.user, dbname=server.db,
        autocommit=autocommit,
    )  # fmt: skip


def gpu_batch(name: str, size: int = 5, at: datetime = T1) -> list[Reading]:
    """``size`` readings of GPUs of their own, on a machine of their own."""
    return [reading(f"SN-{name}{i}", f"i-{name}", f"node-{name}", at, index=i) for i in range(size)]


def keys(batches: Sequence[Sequence[Reading]]) -> list[tuple[str, datetime]]:
    return sorted((r.gpu, r.read_time) for batch in batches for r in batch)


async def stored(conn: psycopg.AsyncConnection[Any], table: str) -> list[tuple[str, datetime]]:
    """(gpu, read_time) of every row of the readings table, as another session sees them."""
    cur = await conn.execute(
        sql.SQL("SELECT gpu, read_time FROM {} ORDER BY gpu, read_time").format(
            sql.Identifier(table)
        )
    )
    return [(gpu, at.astimezone(UTC)) for gpu, at in await cur.fetchall()]


async def stored_gpus(conn: psycopg.AsyncConnection[Any], table: str) -> set[str]:
    cur = await conn.execute(sql.SQL("SELECT DISTINCT gpu FROM {}").format(sql.Identifier(table)))
    return {gpu for (gpu,) in await cur.fetchall()}


async def until(fetch: Callable[[], Awaitable[list[int]]], want: int = 1) -> list[int]:
    """Poll ``fetch`` until it returns ``want`` rows; fails as a hang after LIMIT seconds."""
    try:
        async with asyncio.timeout(LIMIT):
            while len(rows := await fetch()) != want:  # noqa: ASYNC110 (server state)
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"waited {LIMIT}s for {want} sessions, last saw {rows}")
    return rows


def exporter_sessions(
    observer: psycopg.AsyncConnection[Any], where: str, param: object
) -> Callable[[], Awaitable[list[int]]]:
    """The pids of the exporter's sessions that also match ``where`` (one ``%s``)."""

    async def fetch() -> list[int]:
        cur = await observer.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            f"AND application_name = %s AND {where} ORDER BY pid",
            [APP, param],
        )
        return [pid for (pid,) in await cur.fetchall()]

    return fetch


def blocked_by(
    observer: psycopg.AsyncConnection[Any], holder: int
) -> Callable[[], Awaitable[list[int]]]:
    """The exporter's sessions waiting on a lock that session ``holder`` holds."""
    where = "wait_event_type = 'Lock' AND %s = ANY(pg_blocking_pids(pid))"
    return exporter_sessions(observer, where, holder)


def idle_after_upsert(
    observer: psycopg.AsyncConnection[Any], placements_table: str
) -> Callable[[], Awaitable[list[int]]]:
    """The exporter's sessions whose statements ran and that wait to commit."""
    where = "state = 'idle in transaction' AND backend_xid IS NOT NULL AND query LIKE %s"
    return exporter_sessions(observer, where, f'%INSERT INTO "{placements_table}"%')


async def hold_placement(locker: psycopg.AsyncConnection[Any], table: str, *gpus: str) -> int:
    """Lock the placement rows of ``gpus`` in ``locker``'s open transaction; returns its pid."""
    cur = await locker.execute(
        sql.SQL("SELECT gpu FROM {} WHERE gpu = ANY(%s) ORDER BY gpu FOR UPDATE").format(
            sql.Identifier(table)
        ),
        [list(gpus)],
    )
    assert await cur.fetchall() == [(gpu,) for gpu in sorted(gpus)]
    return locker.info.backend_pid


@asynccontextmanager
async def writing(*writes: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """A task for each write (already called, in order); none left running after."""
    tasks = [asyncio.create_task(write) for write in writes]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def copied(exporter: PostgresExporter) -> list[str]:
    """The first GPU of each part whose COPY has ended (so it holds its connection)."""
    parts: list[str] = []
    real = exporter._fill

    async def fill(conn: psycopg.AsyncConnection[Any], batch: Sequence[Reading]) -> None:
        await real(conn, batch)
        parts.append(batch[0].gpu)

    exporter._fill = fill  # type: ignore[method-assign]
    return parts


def in_turns(
    exporter: PostgresExporter, ahead: WriteTurn, *batches: Sequence[Reading]
) -> list[Coroutine[Any, Any, None]]:
    """The batches' writes, each behind the one before, the first behind ``ahead``."""
    writes = []
    for batch in batches:
        ahead = WriteTurn(ahead)
        writes.append(exporter.write_in_turn(batch, ahead))
    return writes


async def outcomes(tasks: list[asyncio.Task[None]]) -> list[BaseException | None]:
    async with asyncio.timeout(LIMIT):
        return list(await asyncio.gather(*tasks, return_exceptions=True))


# --- commit order ---------------------------------------------------------------------------

WARM = [reading("SN-A", at=T0)]  # makes the placement row that the test then locks
A = [reading("SN-A", at=T1)]


async def test_batches_behind_a_blocked_batch_are_not_visible_until_it_commits(
    server: Server, tables: tuple[str, str]
) -> None:
    b, c = gpu_batch("B"), gpu_batch("C")
    exporter = PostgresExporter(split_settings(server, tables))
    try:
        await exporter.write(WARM)
        async with (
            await aconnect(server, autocommit=False) as locker,
            await aconnect(server) as observer,
        ):
            holder = await hold_placement(locker, tables[1], "SN-A")
            line = exporter.line()
            async with writing(line.write(A), line.write(b), line.write(c)) as tasks:
                try:
                    # A's one part waits on the row lock, in its upsert.
                    await until(blocked_by(observer, holder))
                    assert await stored(observer, tables[0]) == keys([WARM])
                    assert await stored_gpus(observer, tables[1]) == {"SN-A"}
                    assert not any(task.done() for task in tasks)
                    # Only A is waiting on the server: B and C wait their turn in the client.
                    assert len(await blocked_by(observer, holder)()) == 1
                finally:
                    await locker.rollback()
                assert await outcomes(tasks) == [None, None, None]
            assert await stored(observer, tables[0]) == keys([WARM, A, b, c])
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 2 + 5 + 5
    assert placements(server, tables[1])[0] == ("SN-A", "i-a", T0, T1)
    assert count(server, tables[1]) == 11


async def make_commit_wait(conn: psycopg.AsyncConnection[Any], table: str, gpu: str) -> int:
    """A deferred trigger: a transaction that inserted a reading of ``gpu`` commits only
    once it gets the advisory lock whose key this returns."""
    key = random.getrandbits(62)
    function = sql.Identifier(f"{table}_hold")
    await conn.execute(
        sql.SQL(
            "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_advisory_xact_lock({key}); RETURN NULL; END $$"
        ).format(f=function, key=sql.Literal(key))
    )
    await conn.execute(
        sql.SQL(
            "CREATE CONSTRAINT TRIGGER {t} AFTER INSERT ON {r} DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW WHEN (NEW.gpu = {gpu}) EXECUTE FUNCTION {f}()"
        ).format(
            t=sql.Identifier(f"{table}_hold"),
            r=sql.Identifier(table),
            gpu=sql.Literal(gpu),
            f=function,
        )
    )
    return key


async def test_a_batch_whose_statements_ran_commits_only_after_the_batch_ahead(
    server: Server, tables: tuple[str, str]
) -> None:
    # A write still in flight ahead of A (its statements done, its outcome not
    # yet known: the test plays it) lets A, B and C all run their statements
    # and wait to commit.
    # A's own COMMIT is then held by a deferred trigger: B and C, ready to
    # commit, must not.
    b, c = gpu_batch("B"), gpu_batch("C")
    exporter = PostgresExporter(split_settings(server, tables))
    try:
        await exporter.open()
        async with (
            await aconnect(server) as locker,
            await aconnect(server) as observer,
        ):
            key = await make_commit_wait(observer, tables[0], "SN-A")
            await locker.execute("SELECT pg_advisory_lock(%s)", [key])
            ahead = WriteTurn(None)
            async with writing(*in_turns(exporter, ahead, A, b, c)) as tasks:
                try:
                    ahead.statements_done.set()
                    waiting = await until(idle_after_upsert(observer, tables[1]), want=3)
                    assert await stored(observer, tables[0]) == []
                    ahead.finish(True)
                    (a_pid,) = await until(blocked_by(observer, locker.info.backend_pid))
                    assert a_pid in waiting
                    # A is in COMMIT; B and C have run everything but theirs.
                    assert sorted(await idle_after_upsert(observer, tables[1])()) == sorted(
                        set(waiting) - {a_pid}
                    )
                    assert await stored(observer, tables[0]) == []
                    assert await stored_gpus(observer, tables[1]) == set()
                    assert not any(task.done() for task in tasks)
                finally:
                    await locker.execute("SELECT pg_advisory_unlock(%s)", [key])
                assert await outcomes(tasks) == [None, None, None]
            assert await stored(observer, tables[0]) == keys([A, b, c])
    finally:
        await exporter.close()


async def test_when_the_write_ahead_fails_batches_that_ran_their_statements_store_nothing(
    server: Server, tables: tuple[str, str]
) -> None:
    b, c = gpu_batch("B"), gpu_batch("C")
    exporter = PostgresExporter(split_settings(server, tables))
    try:
        await exporter.open()
        async with await aconnect(server) as observer:
            ahead = WriteTurn(None)
            async with writing(*in_turns(exporter, ahead, A, b, c)) as tasks:
                ahead.statements_done.set()
                await until(idle_after_upsert(observer, tables[1]), want=3)
                ahead.finish(False)
                results = await outcomes(tasks)
        assert all(isinstance(r, EarlierWriteFailed) for r in results), results
        assert count(server, tables[0]) == 0
        assert count(server, tables[1]) == 0
        # Sent again on a new line, they all go through.
        line = exporter.line()
        await asyncio.gather(*(line.write(batch) for batch in (A, b, c)))
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 11


# --- failure propagation -------------------------------------------------------------------


async def test_a_batch_killed_in_flight_fails_the_batches_behind_it_and_they_store_nothing(
    server: Server, tables: tuple[str, str]
) -> None:
    b, c = gpu_batch("B"), gpu_batch("C")
    exporter = PostgresExporter(split_settings(server, tables))
    filled = copied(exporter)
    try:
        await exporter.write(WARM)
        async with (
            await aconnect(server, autocommit=False) as locker,
            await aconnect(server) as observer,
        ):
            holder = await hold_placement(locker, tables[1], "SN-A")
            line = exporter.line()
            try:
                async with writing(line.write(A), line.write(b), line.write(c)) as tasks:
                    (a_pid,) = await until(blocked_by(observer, holder))
                    # B and C hold their connections (A's failure closes the pool).
                    await eventually(lambda: {"SN-B0", "SN-C0"} <= set(filled), limit=LIMIT)
                    await observer.execute("SELECT pg_terminate_backend(%s)", [a_pid])
                    # The lock is still held: B and C must not wait for it.
                    first, *behind = await outcomes(tasks)
            finally:
                await locker.rollback()
        assert isinstance(first, ExporterError), first
        assert not isinstance(first, EarlierWriteFailed | PermanentExporterError), first
        assert first.error_type == "connection"
        assert len(behind) == 2
        for exc in behind:
            assert isinstance(exc, EarlierWriteFailed), exc
            assert not isinstance(exc, PermanentExporterError)
            assert exc.error_type == "aborted"
        assert count(server, tables[0]) == 1
        assert placements(server, tables[1]) == [("SN-A", "i-a", T0, T0)]
        # The line stops at its gap, even for a write called after the failure ended.
        with pytest.raises(EarlierWriteFailed):
            await line.write(gpu_batch("D"))

        # All three sent again on a new line, at once: each stored exactly once.
        again = exporter.line()
        await asyncio.gather(*(again.write(batch) for batch in (A, b, c)))
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 12
    with server.connect() as conn:
        rows = conn.execute(
            sql.SQL("SELECT gpu, count(*) FROM {} GROUP BY gpu").format(sql.Identifier(tables[0]))
        ).fetchall()
    assert dict(rows) == {"SN-A": 2, **{r.gpu: 1 for r in b + c}}
    assert sorted(placements(server, tables[1])) == sorted(
        [("SN-A", "i-a", T0, T1)] + [(r.gpu, r.machine, T1, T1) for r in b + c]
    )


async def test_a_permanent_failure_ahead_makes_the_batches_behind_it_retryable_not_dead(
    server: Server, tables: tuple[str, str]
) -> None:
    too_long = "".join(uuid.uuid4().hex for _ in range(500))  # too big for the node index
    bad = [reading("SN-X", node=too_long)]
    b, c = gpu_batch("B"), gpu_batch("C")
    exporter = PostgresExporter(split_settings(server, tables))
    try:
        await exporter.open()
        line = exporter.line()
        async with writing(line.write(bad), line.write(b), line.write(c)) as tasks:
            first, *behind = await outcomes(tasks)
        assert isinstance(first, PermanentExporterError), first
        for exc in behind:
            assert isinstance(exc, EarlierWriteFailed), exc
            assert not isinstance(exc, PermanentExporterError)
        assert count(server, tables[0]) == 0
        again = exporter.line()
        await asyncio.gather(again.write(b), again.write(c))
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 10


async def test_a_line_stops_at_a_failed_write_but_a_new_line_and_plain_writes_do_not(
    server: Server, tables: tuple[str, str]
) -> None:
    too_long = "".join(uuid.uuid4().hex for _ in range(500))
    exporter = PostgresExporter(split_settings(server, tables))
    try:
        line = exporter.line()
        with pytest.raises(PermanentExporterError):
            await line.write([reading("SN-X", node=too_long)])
        with pytest.raises(EarlierWriteFailed):
            await line.write(gpu_batch("B"))
        assert count(server, tables[0]) == 0
        await exporter.write(gpu_batch("B"))  # a plain write is in no line
        await exporter.line().write(gpu_batch("C"))
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 10


async def test_an_empty_write_in_a_line_does_not_let_the_next_commit_past_a_failure(
    server: Server, tables: tuple[str, str]
) -> None:
    c = gpu_batch("C")
    exporter = PostgresExporter(split_settings(server, tables))
    filled = copied(exporter)
    try:
        await exporter.write(WARM)
        async with (
            await aconnect(server, autocommit=False) as locker,
            await aconnect(server) as observer,
        ):
            holder = await hold_placement(locker, tables[1], "SN-A")
            line = exporter.line()
            try:
                async with writing(line.write(A), line.write([]), line.write(c)) as tasks:
                    (a_pid,) = await until(blocked_by(observer, holder))
                    await eventually(lambda: "SN-C0" in filled, limit=LIMIT)
                    await observer.execute("SELECT pg_terminate_backend(%s)", [a_pid])
                    failed, *behind = await outcomes(tasks)
            finally:
                await locker.rollback()
    finally:
        await exporter.close()
    assert isinstance(failed, ExporterError)
    assert count(server, tables[0]) == 1, "C was stored although A, ahead of it, failed"
    assert all(isinstance(exc, EarlierWriteFailed) for exc in behind), behind


# --- the pool ------------------------------------------------------------------------------


async def test_health_answers_while_the_writes_in_flight_are_held_up(
    server: Server, tables: tuple[str, str]
) -> None:
    # Batch A's two parts each wait on a placement row lock; B and C, two
    # parts each, wait behind A holding their connections: six of eight.
    a = [reading(f"SN-A{i}", "i-a", "node-a", T1, i) for i in range(300)]
    a_parts = split_batch(a, 2)
    assert len(a_parts) == 2
    locked = [a_parts[0][0], a_parts[1][0]]
    warm = [replace(r, read_time=T0) for r in locked]
    b, c = gpu_batch("B", 300), gpu_batch("C", 300)
    exporter = PostgresExporter(split_settings(server, tables, postgres_connect_timeout=1.0))
    assert exporter.max_in_flight * exporter.settings.write_parts == 6
    health: ExporterError | None = None
    try:
        await exporter.write(warm)
        async with (
            await aconnect(server, autocommit=False) as locker,
            await aconnect(server) as observer,
        ):
            await hold_placement(locker, tables[1], *(r.gpu for r in locked))
            line = exporter.line()
            async with writing(line.write(a), line.write(b), line.write(c)) as tasks:
                try:
                    await until(blocked_by(observer, locker.info.backend_pid), want=2)
                    assert exporter._pool is not None
                    pool = exporter._pool
                    await eventually(
                        lambda: (
                            pool.get_stats()["pool_size"] == 6
                            and not pool.get_stats().get("pool_available", 0)
                        ),
                        limit=LIMIT,
                    )
                    try:
                        await exporter.health()
                    except ExporterError as exc:
                        health = exc
                finally:
                    await locker.rollback()
                assert await outcomes(tasks) == [None, None, None]
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 2 + 900
    assert health is None, health


async def test_a_health_check_that_finds_the_pool_busy_fails_but_leaves_the_writes_alone(
    server: Server, tables: tuple[str, str]
) -> None:
    # A pool of two, both held by one batch's parts waiting on row locks: the
    # health check gets no connection. The server is reachable, so the pool
    # (and the writes on it) must survive the check's failure.
    a = [reading(f"SN-A{i}", "i-a", "node-a", T1, i) for i in range(300)]
    locked = [part[0] for part in split_batch(a, 2)]
    warm = [replace(r, read_time=T0) for r in locked]
    exporter = PostgresExporter(
        split_settings(server, tables, postgres_pool_max=2, postgres_connect_timeout=1.0)
    )
    health: ExporterError | None = None
    try:
        await exporter.write(warm)
        async with (
            await aconnect(server, autocommit=False) as locker,
            await aconnect(server) as observer,
        ):
            await hold_placement(locker, tables[1], *(r.gpu for r in locked))
            async with writing(exporter.write(a)) as tasks:
                try:
                    await until(blocked_by(observer, locker.info.backend_pid), want=2)
                    pool = exporter._pool
                    try:
                        await exporter.health()
                    except ExporterError as exc:
                        health = exc
                    kept = exporter._pool is pool
                finally:
                    await locker.rollback()
                assert await outcomes(tasks) == [None]
    finally:
        await exporter.close()
    assert health is not None
    assert "pool of 2 exhausted" in str(health)
    assert kept
    assert count(server, tables[0]) == 2 + 300


# --- replays -------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_a_replayed_batch_in_flight_with_new_ones_stores_each_reading_once(
    server: Server, tables: tuple[str, str], position: int
) -> None:
    replay, new1, new2 = fleet_batches(3, 300)  # 300 readings: two parts each
    exporter = PostgresExporter(split_settings(server, tables))
    try:
        await exporter.write(replay)
        before = exporter.conflicting_parts
        window = [new1, new2]
        window.insert(position, replay)
        line = exporter.line()
        async with writing(*(line.write(batch) for batch in window)) as tasks:
            assert await outcomes(tasks) == [None, None, None]
        parts = len(split_batch(replay, exporter.settings.write_parts))
        assert parts == 2
        assert exporter.conflicting_parts == before + parts
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 900
    assert count(server, tables[1]) == 900


async def test_the_same_new_batch_twice_in_flight_is_stored_once(
    server: Server, tables: tuple[str, str]
) -> None:
    batch, other = fleet_batches(2, 300)
    exporter = PostgresExporter(split_settings(server, tables))
    try:
        await exporter.open()
        line = exporter.line()
        async with writing(line.write(batch), line.write(batch), line.write(other)) as tasks:
            assert await outcomes(tasks) == [None, None, None]
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 600


# --- through the delivery pipeline -------------------------------------------------------------


class Concurrency:
    """Wraps the exporter's write_in_turn() (which its lines call) to count the writes
    in flight at once, and record how each ended, in the order they ended."""

    def __init__(self, exporter: PostgresExporter) -> None:
        self.now = 0
        self.peak = 0
        self.calls: list[tuple[str, BaseException | None]] = []
        self._write = exporter.write_in_turn
        exporter.write_in_turn = self.write  # type: ignore[method-assign]

    async def write(self, batch: Sequence[Reading], turn: WriteTurn) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await self._write(batch, turn)
        except BaseException as exc:
            self.calls.append((batch[0].gpu, exc))
            raise
        else:
            self.calls.append((batch[0].gpu, None))
        finally:
            self.now -= 1


def delivery(exporter: PostgresExporter, tmp_path: Path, batch_size: int) -> DeliveryPipeline:
    return DeliveryPipeline(
        exporter, Spool(tmp_path / "postgres.spool", max_bytes=100_000_000), cluster="c1",
        metrics=ExportMetrics(CollectorRegistry()),
        config=DeliveryConfig(batch_size=batch_size, flush_interval=0.01, backoff=FAST),
    )  # fmt: skip


def stored_ids(server: Server, table: str) -> list[uuid.UUID]:
    with server.connect() as conn:
        cur = conn.execute(sql.SQL("SELECT id FROM {}").format(sql.Identifier(table)))
        return [row[0] for row in cur.fetchall()]


def ids(batches: Sequence[Sequence[Reading]]) -> list[uuid.UUID]:
    return [uuid.UUID(hex=r.id[:32]) for batch in batches for r in batch]


@pytest.mark.parametrize(
    ("size", "overrides"),
    [
        (200, {}),  # one part per batch, three batches in flight
        (300, {"postgres_pool_max": 9, "postgres_batches_in_flight": 4}),  # two parts, four
        (500, None),  # the defaults: one part, four in flight
    ],
)
async def test_the_pipeline_keeps_several_batches_in_flight_and_stores_each_reading_once(
    server: Server,
    tables: tuple[str, str],
    tmp_path: Path,
    size: int,
    overrides: dict[str, Any] | None,
) -> None:
    batches = fleet_batches(20, size)
    if overrides is None:
        exporter = PostgresExporter(make_settings(server, tables))
    else:
        exporter = PostgresExporter(split_settings(server, tables, **overrides))
    counter = Concurrency(exporter)
    pipe = delivery(exporter, tmp_path, size)
    try:
        await exporter.open()
        await pipe.submit([r for batch in batches for r in batch])
        assert await pipe.drain(within=120)
    finally:
        await exporter.close()
    assert pipe.stats().readings == 0
    assert [exc for _, exc in counter.calls] == [None] * 20
    assert counter.peak == exporter.max_in_flight == (3 if size == 200 else 4)
    got = stored_ids(server, tables[0])
    assert len(got) == 20 * size
    assert sorted(got) == sorted(ids(batches))


def fail_first_insert_of(conn: psycopg.Connection[Any], table: str, gpu: str) -> None:
    """A trigger: the first transaction to insert a reading of ``gpu`` fails with a
    serialisation failure (SQLSTATE 40001, retryable); the sequence remembers it."""
    name = sql.Identifier(f"{table}_fail_once")
    conn.execute(sql.SQL("CREATE SEQUENCE {}").format(name))
    conn.execute(
        sql.SQL(
            "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF nextval({s}) = 1 THEN RAISE EXCEPTION 'injected' "
            "USING ERRCODE = 'serialization_failure'; END IF; RETURN NULL; END $$"
        ).format(f=name, s=sql.Literal(f"{table}_fail_once"))
    )
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER {t} AFTER INSERT ON {r} FOR EACH ROW "
            "WHEN (NEW.gpu = {gpu}) EXECUTE FUNCTION {f}()"
        ).format(t=name, r=sql.Identifier(table), gpu=sql.Literal(gpu), f=name)
    )


async def test_the_pipeline_sends_the_batches_behind_a_failed_one_again(
    server: Server, tables: tuple[str, str], tmp_path: Path
) -> None:
    # The first insert of GPU SN-1005 (in batch 5) fails with a retryable
    # error; the batches in flight behind it store nothing and are sent again
    # after it.
    batches = fleet_batches(20, 200)
    exporter = PostgresExporter(split_settings(server, tables))
    counter = Concurrency(exporter)
    pipe = delivery(exporter, tmp_path, 200)
    try:
        await exporter.open()
        with server.connect() as conn:
            fail_first_insert_of(conn, tables[0], "SN-1005")
        await pipe.submit([r for batch in batches for r in batch])
        assert await pipe.drain(within=120)
    finally:
        await exporter.close()
    failed = [(gpu, exc) for gpu, exc in counter.calls if exc is not None]
    injected = [
        (gpu, exc)
        for gpu, exc in failed
        if isinstance(exc.__cause__, psycopg.errors.SerializationFailure)
    ]
    assert [gpu for gpu, _ in injected] == ["SN-1000"]  # batch 5, once
    assert not isinstance(injected[0][1], EarlierWriteFailed | PermanentExporterError)
    for gpu, exc in failed:
        # Only batches behind batch 5 failed with it: with EarlierWriteFailed, or
        # with the pool that batch 5's failure closed (typed 'connection': see the
        # xfail below) when they were still taking a connection from it.
        assert int(gpu.removeprefix("SN-")) >= 1000, failed
        assert isinstance(exc, ExporterError)
        assert not isinstance(exc, PermanentExporterError)
    assert [gpu for gpu, _ in counter.calls].count("SN-1000") == 2
    assert pipe.stats().readings == 0
    got = stored_ids(server, tables[0])
    assert len(got) == 4000
    assert sorted(got) == sorted(ids(batches))


async def test_no_batch_commits_before_an_earlier_batch_that_failed(
    server: Server, tables: tuple[str, str], tmp_path: Path
) -> None:
    # Batch 5 fails once. Batch 4 is held (in the test's wrapper, after it
    # committed) until 5 and 6 have ended, as a slow ack would: the pipeline
    # then settles 4 and starts 7, while the failure of 5 is not yet settled.
    batches = fleet_batches(20, 200)
    exporter = PostgresExporter(split_settings(server, tables))
    counter = Concurrency(exporter)
    real = counter.write

    async def write(batch: Sequence[Reading], turn: WriteTurn) -> None:
        await real(batch, turn)
        if batch[0].gpu == "SN-800" and not any(gpu == "SN-1000" for gpu, _ in counter.calls):
            # Until 5 and 6, behind it in the window, have ended.
            await eventually(
                lambda: counter.now == 0 and any(gpu == "SN-1000" for gpu, _ in counter.calls),
                limit=LIMIT,
            )

    exporter.write_in_turn = write  # type: ignore[method-assign]
    pipe = delivery(exporter, tmp_path, 200)
    try:
        await exporter.open()
        with server.connect() as conn:
            fail_first_insert_of(conn, tables[0], "SN-1005")
        await pipe.submit([r for batch in batches for r in batch])
        assert await pipe.drain(within=120)
    finally:
        await exporter.close()
    assert sorted(stored_ids(server, tables[0])) == sorted(ids(batches))
    # Batch 7 was started on the line after 5 had failed: it stored nothing then.
    assert ("SN-1400", EarlierWriteFailed) in [(gpu, type(exc)) for gpu, exc in counter.calls]
    committed: list[str] = []
    for gpu, exc in counter.calls:
        if exc is None and gpu not in committed:
            committed.append(gpu)
    assert committed == [batch[0].gpu for batch in batches]


async def test_a_serialisation_failure_is_a_server_error_and_keeps_the_pool(
    server: Server, tables: tuple[str, str]
) -> None:
    exporter = PostgresExporter(split_settings(server, tables))
    try:
        await exporter.open()
        with server.connect() as conn:
            fail_first_insert_of(conn, tables[0], "SN-A")
        pool = exporter._pool
        with pytest.raises(ExporterError) as caught:
            await exporter.write(A)
        assert exporter._pool is pool
        assert caught.value.error_type == "server"
    finally:
        await exporter.close()
