"""The PostgreSQL sink: gpuid's readings table, plus where each GPU has been.

A batch is split into ``POSTGRES_WRITE_PARALLELISM`` parts (one per GPU
group), each one transaction on its own connection: ``COPY`` into a temporary
table, then one ``INSERT … SELECT`` into the readings and one upsert of the
placements from the same rows. A part that meets readings stored already goes
again with ``ON CONFLICT DO NOTHING``, so a replayed batch adds nothing, and a
failed part adds nothing either. The tables are made ready first
(``migration.py``); overlapping writes keep their order through a
``WriteLine`` (``ordering.py``). Design notes: docs/postgres-exporter.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
import psycopg.errors as pgerr
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gpufleet.inventory.errors import EarlierWriteFailed, ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.postgres.errors import error_type, first_line, is_permanent
from gpufleet.inventory.exporters.postgres.migration import Migration
from gpufleet.inventory.exporters.postgres.ordering import WriteLine, WriteTurn
from gpufleet.inventory.exporters.postgres.schema import (
    COPY_TYPES,
    KeyDumper,
    WriteStatements,
    batch_row,
)
from gpufleet.inventory.exporters.postgres.settings import PostgresSettings
from gpufleet.inventory.reading import Reading

__all__ = ["PostgresExporter"]

log = logging.getLogger(__name__)

_Work = Callable[[psycopg.AsyncConnection[Any]], Awaitable[object]]


MIN_PART = 128
"""The fewest readings worth a transaction of their own when a batch is split."""


def split_batch(batch: Sequence[Reading], parallelism: int) -> list[list[Reading]]:
    """The batch as up to ``parallelism`` parts, each written as its own transaction.

    One batch's rows keep the server busy while the client waits, and the
    client busy while the server waits; parts on two connections overlap the
    two. There are at most ``len(batch) // MIN_PART`` parts (about equal, being
    a hash split), since each commit costs a WAL flush. Every reading of one
    GPU goes to the same part (by the hash of its serial), so two parts never
    upsert the same placement and never wait on each other's row locks.
    ``hash`` differs between processes; that is fine, the parts only have to
    be disjoint within one call.
    """
    count = max(1, min(parallelism, len(batch) // MIN_PART))
    if count == 1:
        return [list(batch)]
    parts: list[list[Reading]] = [[] for _ in range(count)]
    for reading in batch:
        parts[hash(reading.gpu) % count].append(reading)
    return [part for part in parts if part]


def distinct_placements(batch: Sequence[Reading]) -> bool:
    """Whether no two readings of the batch share a placement (the usual case)."""
    keys = {(r.cluster, r.gpu, r.uuid, r.machine, r.node) for r in batch}
    return len(keys) == len(batch)


def raise_worst(errors: list[BaseException]) -> None:
    """Re-raise the failure of a split batch that keeps the most readings safe.

    A part that committed is harmless when the whole batch is sent again (its
    rows conflict, its placements do not move), so a retryable error wins over
    a permanent one: the batch is retried, not dead-lettered, while any part
    may still succeed. Anything that is not an exporter error (a bug, a
    cancellation) is raised as it is.
    """
    if not errors:
        return
    for exc in errors:
        if not isinstance(exc, ExporterError):
            raise exc
    retryable = [exc for exc in errors if not isinstance(exc, PermanentExporterError)]
    raise (retryable or errors)[0]


class PostgresExporter:
    """Writes readings and placements to PostgreSQL, a batch in one or a few transactions.

    The pool opens lazily on first use (or on ``open()``), so a sink that is
    down at start-up delays nothing and recovers by itself. Every wait for a
    connection is bounded by ``POSTGRES_CONNECT_TIMEOUT``.
    """

    name = "postgres"

    def __init__(self, settings: PostgresSettings) -> None:
        self.settings = settings
        self.max_in_flight = settings.batches_in_flight
        """Writes a ``WriteLine`` may have in flight at once (the delivery pipeline's window)."""
        self._pool: AsyncConnectionPool | None = None
        self._schema_ready = False
        self._closed = False
        # _lock guards the pool slot; _schema_lock makes concurrent first
        # writes prepare the tables once.
        self._lock = asyncio.Lock()
        self._schema_lock = asyncio.Lock()
        self._copy_lock = asyncio.Lock()
        self._sql = WriteStatements(settings.postgres_table, settings.postgres_placements_table)
        self._migration = Migration(settings, self.name)
        self.conflicting_parts = 0
        """Parts (transactions) that met readings already stored and took the ON CONFLICT path."""

    def _where(self) -> str:
        return self._migration.where

    async def open(self) -> None:
        """Start the pool and create, migrate or check the tables; idempotent."""
        await self._ready_pool()

    async def _ready_pool(self) -> AsyncConnectionPool:
        pool = await self._get_pool()
        if not self._schema_ready:
            async with self._schema_lock:
                if not self._schema_ready:
                    await self._run(pool, self._migration.prepare, "prepare the tables")
                    self._schema_ready = True
        return pool

    async def _get_pool(self) -> AsyncConnectionPool:
        async with self._lock:
            if self._closed:
                raise ExporterError(self.name, f"{self._where()}: exporter is closed")
            if self._pool is None:
                self._pool = AsyncConnectionPool(
                    kwargs=self.settings.connection_kwargs(),
                    min_size=self.settings.write_parts,
                    max_size=self.settings.postgres_pool_max,
                    open=False,
                    timeout=self.settings.postgres_connect_timeout,
                    # Give up on a dead server soon; the next use starts afresh.
                    reconnect_timeout=max(self.settings.postgres_connect_timeout, 5.0),
                    configure=self._configure,
                    # One empty round trip per checkout finds connections a
                    # server restart killed before a batch is lost on them.
                    check=AsyncConnectionPool.check_connection,
                    name=f"gpufleet-postgres-{self.settings.postgres_table}",
                )
                await self._pool.open(wait=False)
            return self._pool

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Set up a new connection: the key's dumper and the session's batch table.

        Creating the temporary table here rather than in every batch saves a
        round trip and a catalog lookup per batch.
        """
        conn.adapters.register_dumper(None, KeyDumper)
        try:
            await conn.execute(self._sql.create_batch)
            await conn.commit()
        except psycopg.DatabaseError:
            # No TEMPORARY privilege, say. The first batch creates the table
            # itself (see _write) and reports the failure as its own error.
            # A broken connection fails this rollback too, and is discarded.
            await conn.rollback()

    async def write(self, batch: Sequence[Reading]) -> None:
        """Insert the batch, one transaction per part; readings already present are ignored.

        Returns once every part has committed. When a part fails the others
        may have committed: sending the whole batch again is harmless.
        """
        await self.write_in_turn(batch, WriteTurn(None))

    def line(self) -> WriteLine:
        """A new line of writes that may overlap and commit in order (see ``WriteLine``)."""
        return WriteLine(self)

    async def write_in_turn(self, batch: Sequence[Reading], turn: WriteTurn) -> None:
        """``write()``, with the statements and the commit after those of ``turn.ahead``."""
        errors: list[BaseException] = []
        committed = False
        try:
            if turn.ahead_known_failed():
                raise self._behind_failed()
            if not batch:
                # Nothing to store, but a line must not run past a failure.
                if not await turn.ahead_ok():
                    raise self._behind_failed()
                committed = True
                return
            for r in batch:
                if r.read_time.tzinfo is None:
                    raise PermanentExporterError(
                        self.name, f"reading of GPU {r.gpu} on {r.node}: read_time has no timezone"
                    )
            pool = await self._ready_pool()
            parts = split_batch(batch, self.settings.write_parts)
            results = await asyncio.gather(
                *(
                    self._run(pool, self._writer(part, turn), f"write {len(part)} readings")
                    for part in parts
                ),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            committed = not errors
        finally:
            turn.finish(committed)
        raise_worst(errors)

    def _writer(self, part: Sequence[Reading], turn: WriteTurn) -> _Work:
        ready = turn.part()
        return lambda conn: self._write(conn, part, turn, ready)

    async def _write(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: Sequence[Reading],
        turn: WriteTurn,
        ready: Callable[[], None],
    ) -> None:
        """One part in three round trips: BEGIN, COPY, then INSERT, upsert and COMMIT together.

        The readings go in with a plain INSERT first: ``ON CONFLICT`` makes
        every row a speculative insertion, which costs about a quarter of the
        insert, for the rare batch that meets rows already stored. Such a batch
        (one sent again after a failure) fails on the unique key, is rolled
        back, and goes again through ``INSERT … ON CONFLICT DO NOTHING``.
        Behind a batch still in flight, the statements wait for that batch's,
        and COMMIT for its commit, in a fourth round trip.
        """
        upsert = self._sql.upsert_distinct if distinct_placements(batch) else self._sql.upsert
        try:
            await self._fill(conn, batch)
            if turn.ahead is not None:
                await turn.ahead.statements_done.wait()
            try:
                await self._commit(conn, self._sql.insert_new, upsert, turn, ready)
            except pgerr.UniqueViolation:
                self.conflicting_parts += 1
                await conn.rollback()
                await self._fill(conn, batch)
                await self._commit(conn, self._sql.insert, upsert, turn, ready)
        except BaseException:
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    await conn.rollback()
            raise
        finally:
            ready()

    async def _fill(self, conn: psycopg.AsyncConnection[Any], batch: Sequence[Reading]) -> None:
        """COPY the batch into the session's batch table, in a new transaction."""
        try:
            await self._copy(conn, batch)
        except pgerr.UndefinedTable:
            # This session has no batch table: a transaction-mode pooler
            # (PgBouncer) put us on a server session _configure never saw.
            # Create it in the batch's own transaction, hence its session.
            await conn.rollback()
            await conn.execute(self._sql.create_batch)
            await self._copy(conn, batch)

    async def _commit(
        self,
        conn: psycopg.AsyncConnection[Any],
        insert: bytes,
        upsert: bytes,
        turn: WriteTurn,
        ready: Callable[[], None],
    ) -> None:
        if turn.ahead_known_failed():
            raise self._behind_failed()
        commit_now = turn.ahead_known_ok()
        async with conn.pipeline():
            await conn.execute(insert, prepare=True)
            await conn.execute(upsert, prepare=True)
            if commit_now:
                await conn.commit()
        ready()
        if commit_now:
            return
        if not await turn.ahead_ok():
            raise self._behind_failed()
        await conn.commit()

    def _behind_failed(self) -> EarlierWriteFailed:
        return EarlierWriteFailed(
            self.name, f"{self._where()}: not committed, because the batch written before it failed"
        )

    async def _copy(self, conn: psycopg.AsyncConnection[Any], batch: Sequence[Reading]) -> None:
        async with conn.cursor().copy(self._sql.copy) as copy:
            copy.set_types(COPY_TYPES)
            # One part's rows built at a time: the client builds the next
            # part while the server inserts this one, rather than all at once.
            async with self._copy_lock:
                for r in batch:
                    await copy.write_row(batch_row(r))

    async def health(self) -> None:
        """Run a real query against the readings table."""
        pool = await self._ready_pool()
        await self._run(pool, lambda conn: conn.execute(self._sql.probe), "query")

    async def close(self) -> None:
        """Close the pool; later calls fail with ``ExporterError``."""
        async with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=self.settings.postgres_connect_timeout)

    async def _run(self, pool: AsyncConnectionPool, work: _Work, doing: str) -> None:
        """Run ``work(conn)`` on a pooled connection, turning failures into ExporterError."""
        try:
            async with pool.connection() as conn:
                await work(conn)
        except ExporterError:
            raise
        except PoolTimeout as exc:
            # The pool only says it waited; one direct attempt says why.
            kind, reason, reachable = await self._diagnose()
            if not reachable:
                # A pool whose connections are busy (writes held up by a lock,
                # say) is kept: closing it would fail them too.
                await self._discard(pool)
            if kind in {"config", "auth"}:
                # The server answered and refused us: say why, not that we waited.
                message = f"cannot {doing} at {self._where()}: {reason}{self._ssl_hint(reason)}"
            else:
                message = (
                    f"cannot {doing} at {self._where()}: no connection within "
                    f"{self.settings.postgres_connect_timeout:g}s: {reason}"
                )
            raise ExporterError(self.name, message, error_type=kind) from exc
        except (psycopg.Error, OSError) as exc:
            reason = first_line(exc)
            message = f"cannot {doing} at {self._where()}: {reason}{self._ssl_hint(reason)}"
            if is_permanent(exc):
                raise PermanentExporterError(self.name, message) from exc
            kind = error_type(exc)
            if kind in {"connection", "timeout"}:
                await self._discard(pool)
            raise ExporterError(self.name, message, error_type=kind) from exc

    def _ssl_hint(self, reason: str) -> str:
        """Name the setting to change when libpq refused the SSL mode."""
        if "ssl" not in reason.lower():
            return ""
        return f" (POSTGRES_SSLMODE={self.settings.postgres_sslmode})"

    async def _diagnose(self) -> tuple[str, str, bool]:
        """(error_type, reason, server reachable) from one direct connection attempt."""
        kwargs = self.settings.connection_kwargs()
        try:
            async with asyncio.timeout(self.settings.postgres_connect_timeout + 1):
                conn = await psycopg.AsyncConnection.connect(**kwargs)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            return error_type(exc), first_line(exc) or "timed out", False
        await conn.close()
        pool_max = self.settings.postgres_pool_max
        return "connection", f"pool of {pool_max} exhausted or reconnecting", True

    async def _discard(self, pool: AsyncConnectionPool) -> None:
        """Drop a pool that lost its server, so the next call connects at once.

        psycopg_pool retries a dead server with exponential backoff; a fresh
        pool after an outage serves the first batch without waiting that out.
        """
        async with self._lock:
            if self._pool is not pool:
                return
            self._pool = None
        await pool.close(timeout=1.0)
