"""The on-disk spool: accepted readings wait here until their exporter has them.

Readings are written here *before* they are accepted (write-ahead), in SQLite
with ``synchronous=FULL``, so a reading the pipeline accepted survives a crash
or a SIGKILL. Two tables:

- ``pending``: accepted readings not yet in a batch, in arrival order.
- ``batches``: sealed batches, each a fixed list of readings in order. A batch
  is sealed once and replayed as the same readings in the same order, so its
  ``batch_hash`` (S3 key, HTTP Idempotency-Key) is the same on every attempt.

Sealing moves readings from ``pending`` into one ``batches`` row in a single
transaction, so a crash at any moment leaves every reading in exactly one place.
A process holds an exclusive lock on the spool, so two processes never deliver
the same batch.

Dead-lettering is idempotent: the batch's row is marked with its dead-letter
record (committed) before the record is appended to the dead-letter file, and
the row is deleted only after the file is fsync'd. A process that finds a marked
row at start (the last one was killed in between) finishes the move, appending
the record only if the file does not hold it yet; a marked batch is never sent.
The file itself (its records, durable appends) is ``deadletter.py``'s.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gpufleet.core.lock import LockHeldError, ProcessLock
from gpufleet.inventory.deadletter import DeadLetterFile, dead_letter_record, record_key
from gpufleet.inventory.errors import InventoryError
from gpufleet.inventory.reading import Reading, batch_hash

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    body  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    hash      TEXT NOT NULL,
    readings  INTEGER NOT NULL,
    body      TEXT NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
"""

# Added after the first release; an older spool file gets them on open.
_ADDED_BATCH_COLUMNS = {
    # Wall-clock time (Unix seconds) of the first failed attempt: the age limit
    # must survive restarts, so it cannot be a monotonic clock.
    "first_failed": "REAL",
    # The dead-letter record of a batch being moved to the dead-letter file.
    "dead_record": "TEXT",
}


class SpoolError(InventoryError):
    """The spool cannot be opened or written."""


class SpoolFullError(SpoolError):
    """The spool is at SPOOL_MAX_BYTES and the policy refuses new readings."""


class FullPolicy(StrEnum):
    """What to do when accepting readings would take the spool past its bound."""

    REJECT_NEW = "reject-new"
    """Refuse the new readings: nothing accepted is ever dropped (the default)."""
    DROP_OLDEST = "drop-oldest"
    """Drop the oldest sealed batches to make room: the newest facts win."""


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """A sealed batch waiting for delivery."""

    seq: int
    hash: str
    readings: tuple[Reading, ...]
    attempts: int
    """Failed attempts so far, in this process and the earlier ones."""
    first_failed: float | None = None
    """Unix time of the first failed attempt; ``None`` if it never failed."""
    last_error: str | None = None
    """Why the last attempt failed."""


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """How much is waiting, for metrics and for the one-shot exit message."""

    pending_readings: int
    batched_readings: int
    retried_readings: int
    """Readings in batches that failed at least once: held back by an outage."""
    batches: int
    bytes: int

    @property
    def readings(self) -> int:
        """Every reading accepted and not yet delivered."""
        return self.pending_readings + self.batched_readings


def _encode(reading: Reading) -> str:
    return json.dumps(reading.to_dict(), separators=(",", ":"))


def _decode(body: str) -> tuple[Reading, ...]:
    return tuple(Reading.from_dict(json.loads(line)) for line in body.splitlines() if line)


class Spool:
    """A durable FIFO of readings and sealed batches in one SQLite file.

    Methods block (SQLite, fsync); the pipeline calls them in a worker thread.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        full_policy: FullPolicy = FullPolicy.REJECT_NEW,
        dead_letter: Path | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.dead_letter_path = dead_letter or path.with_suffix(".dead-letter.jsonl")
        self._dead_letters = DeadLetterFile(self.dead_letter_path)
        self._lock = threading.Lock()
        self._lock_file = self._take_process_lock(path)
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before append() returns, even in WAL mode.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._add_columns()
            self._bytes = self._scalar(
                "SELECT COALESCE((SELECT SUM(LENGTH(body)) FROM pending), 0)"
                " + COALESCE((SELECT SUM(LENGTH(body)) FROM batches), 0)"
            )
            self._finish_dead_letters()
        except sqlite3.Error as exc:
            self._release_process_lock()
            raise SpoolError(f"cannot open spool {path}: {exc}") from exc
        except OSError as exc:
            self._release_process_lock()
            raise SpoolError(
                f"cannot finish moving a batch to the dead-letter file {self.dead_letter_path}: "
                f"{exc}"
            ) from exc

    def _add_columns(self) -> None:
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(batches)")}
        for name, kind in _ADDED_BATCH_COLUMNS.items():
            if name not in have:
                self._conn.execute(f"ALTER TABLE batches ADD COLUMN {name} {kind}")

    def _finish_dead_letters(self) -> None:
        """Complete the dead-letter moves an earlier process was killed in the middle of."""
        rows = self._conn.execute(
            "SELECT seq, dead_record FROM batches WHERE dead_record IS NOT NULL ORDER BY seq"
        ).fetchall()
        for seq, record in rows:
            if not self._dead_letters.holds(record_key(record)):
                self._dead_letters.append(record)
            log.warning(
                "finished moving a batch to the dead-letter file after a crash",
                extra={"spool": str(self.path), "dead_letter": str(self.dead_letter_path)},
            )
            self._delete(seq)

    @staticmethod
    def _take_process_lock(path: Path) -> ProcessLock:
        try:
            return ProcessLock(path.with_suffix(".lock"))
        except LockHeldError:
            raise SpoolError(
                f"spool {path} is in use by another gpufleet process; give each its own SPOOL_DIR"
            ) from None
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory for {path}: {exc}") from exc

    def _release_process_lock(self) -> None:
        self._lock_file.release()

    def _scalar(self, sql: str, params: Sequence[object] = ()) -> int:
        return int(self._conn.execute(sql, params).fetchone()[0])

    # --- accepting -------------------------------------------------------------

    def append(self, readings: Sequence[Reading]) -> int:
        """Durably accept ``readings``; returns how many older readings were dropped.

        Raises ``SpoolFullError`` when the spool is full and the policy is
        ``reject-new``; then none of ``readings`` is accepted.
        """
        rows = [(_encode(r),) for r in readings]
        size = sum(len(body) for (body,) in rows)
        with self._lock:
            # One transaction: the readings dropped to make room stay if the
            # insert that needed the room fails (a full disk, say).
            before = self._bytes
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    dropped = self._make_room(size)
                    self._conn.executemany("INSERT INTO pending (body) VALUES (?)", rows)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    self._bytes = before
                    raise
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot write to spool {self.path}: {exc}") from exc
            self._bytes += size
        return dropped

    def _make_room(self, size: int) -> int:
        if self._bytes + size <= self.max_bytes:
            return 0
        if self.full_policy is FullPolicy.REJECT_NEW or size > self.max_bytes:
            raise SpoolFullError(
                f"spool {self.path} holds {self._bytes} bytes; {size} more would pass "
                f"SPOOL_MAX_BYTES={self.max_bytes} (policy {self.full_policy})"
            )
        dropped = 0
        while self._bytes + size > self.max_bytes:
            row = self._conn.execute(
                "SELECT seq, readings, LENGTH(body) FROM batches ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                break
            self._conn.execute("DELETE FROM batches WHERE seq = ?", (row[0],))
            self._bytes -= int(row[2])
            dropped += int(row[1])
        while self._bytes + size > self.max_bytes:
            row = self._conn.execute(
                "SELECT seq, LENGTH(body) FROM pending ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                break
            self._conn.execute("DELETE FROM pending WHERE seq = ?", (row[0],))
            self._bytes -= int(row[1])
            dropped += 1
        return dropped

    # --- batching and delivery -------------------------------------------------

    def seal(self, batch_size: int) -> int:
        """Seal pending readings into batches of at most ``batch_size``; returns readings sealed."""
        sealed = 0
        with self._lock:
            while True:
                rows = self._conn.execute(
                    "SELECT seq, body FROM pending ORDER BY seq LIMIT ?", (batch_size,)
                ).fetchall()
                if not rows:
                    return sealed
                readings = [Reading.from_dict(json.loads(body)) for _, body in rows]
                body = "\n".join(b for _, b in rows)
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute(
                        "INSERT INTO batches (hash, readings, body) VALUES (?, ?, ?)",
                        (batch_hash(readings), len(rows), body),
                    )
                    self._conn.execute("DELETE FROM pending WHERE seq <= ?", (rows[-1][0],))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                # The batch body joins the pending bodies with newlines.
                self._bytes += len(rows) - 1
                sealed += len(rows)

    def pending_count(self) -> int:
        """Readings accepted but not yet sealed into a batch."""
        with self._lock:
            return self._scalar("SELECT COUNT(*) FROM pending")

    def oldest(self) -> SpooledBatch | None:
        """The next batch to deliver, or ``None`` when there is none."""
        return self.next_batch(after=None)

    def next_batch(self, after: int | None) -> SpooledBatch | None:
        """The oldest batch sealed after batch ``after`` (a ``seq``), or the oldest of all."""
        with self._lock:
            row = self._conn.execute(
                "SELECT seq, hash, body, attempts, first_failed, last_error FROM batches"
                " WHERE seq > ? AND dead_record IS NULL ORDER BY seq LIMIT 1",
                (-1 if after is None else after,),
            ).fetchone()
        if row is None:
            return None
        return SpooledBatch(
            seq=row[0], hash=row[1], readings=_decode(row[2]), attempts=row[3],
            first_failed=row[4], last_error=row[5],
        )  # fmt: skip

    def ack(self, batch: SpooledBatch) -> None:
        """The exporter has the batch: forget it."""
        self._delete(batch.seq)

    def failed(self, batch: SpooledBatch, error: str, at: float | None = None) -> None:
        """Record a failed attempt at Unix time ``at`` (now); the batch stays first in line."""
        when = time.time() if at is None else at
        with self._lock:
            self._conn.execute(
                "UPDATE batches SET attempts = attempts + 1, last_error = ?,"
                " first_failed = COALESCE(first_failed, ?) WHERE seq = ?",
                (error, when, batch.seq),
            )

    def dead_letter(
        self,
        batch: SpooledBatch,
        reason: str,
        exporter: str,
        readings: Sequence[Reading] | None = None,
    ) -> None:
        """Move a batch the sink refused for good to the dead-letter file, then forget it.

        ``readings`` are the ones refused when the sink took the rest of the
        batch (all of them by default); only they go to the file. Idempotent
        per batch, even across a SIGKILL at any point (see the module notes).
        """
        refused = batch.readings if readings is None else readings
        # The spool's sequence number never repeats within a spool file, and
        # with the hash it names this batch alone.
        line = dead_letter_record(
            f"{batch.seq}-{batch.hash}", batch.hash, reason, exporter, refused
        )
        with self._lock:
            # Marked first: a process killed after this never sends the batch
            # again, and the next one finishes the move.
            self._conn.execute(
                "UPDATE batches SET dead_record = ? WHERE seq = ?", (line, batch.seq)
            )
        # Appended and fsync'd before the batch leaves the spool: never in neither.
        self._dead_letters.append(line)
        self._delete(batch.seq)

    def _delete(self, seq: int) -> None:
        with self._lock:
            row = self._conn.execute(
                "SELECT LENGTH(body) FROM batches WHERE seq = ?", (seq,)
            ).fetchone()
            self._conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            if row is not None:
                self._bytes -= int(row[0])

    def stats(self) -> SpoolStats:
        """Counts of what is waiting."""
        with self._lock:
            pending = self._scalar("SELECT COUNT(*) FROM pending")
            batched, retried, batches = self._conn.execute(
                "SELECT COALESCE(SUM(readings), 0),"
                " COALESCE(SUM(CASE WHEN attempts > 0 THEN readings ELSE 0 END), 0),"
                " COUNT(*) FROM batches"
            ).fetchone()
            return SpoolStats(pending, int(batched), int(retried), int(batches), self._bytes)

    def close(self) -> None:
        """Close the file and release the process lock; everything stays on disk."""
        with self._lock:
            self._conn.close()
        self._release_process_lock()
