"""The embedded SQLite store: every reading, plus where each GPU has been.

``readings`` keeps every observation once (insert-or-ignore on the identifying
fields, so a replayed batch adds nothing). ``placements`` keeps one row per GPU
per machine and node with the first and last time it was seen there; it is what
the history queries read.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.reading import Reading, format_time

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id          TEXT NOT NULL,
    cluster     TEXT NOT NULL,
    node        TEXT NOT NULL,
    machine     TEXT NOT NULL,
    source      TEXT NOT NULL,
    chassis     TEXT NOT NULL,
    gpu         TEXT NOT NULL,
    uuid        TEXT NOT NULL,
    read_time   TEXT NOT NULL,
    model       TEXT NOT NULL,
    pci_bus_id  TEXT NOT NULL,
    gpu_index   INTEGER NOT NULL,
    UNIQUE (cluster, node, machine, source, chassis, gpu, uuid, read_time)
);
CREATE INDEX IF NOT EXISTS readings_gpu ON readings (gpu, read_time);
CREATE INDEX IF NOT EXISTS readings_machine ON readings (machine, read_time);
CREATE TABLE IF NOT EXISTS placements (
    gpu         TEXT NOT NULL,
    uuid        TEXT NOT NULL,
    machine     TEXT NOT NULL,
    node        TEXT NOT NULL,
    cluster     TEXT NOT NULL,
    first_seen  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    PRIMARY KEY (cluster, gpu, uuid, machine, node)
);
CREATE INDEX IF NOT EXISTS placements_machine ON placements (machine);
CREATE INDEX IF NOT EXISTS placements_node ON placements (node);
CREATE INDEX IF NOT EXISTS placements_uuid ON placements (uuid);
"""

_INSERT_READING = """
INSERT OR IGNORE INTO readings
    (id, cluster, node, machine, source, chassis, gpu, uuid, read_time,
     model, pci_bus_id, gpu_index)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# Text timestamps in one fixed RFC 3339 form sort chronologically, so MIN/MAX
# keep the earliest first_seen and latest last_seen even for replayed batches.
_UPSERT_PLACEMENT = """
INSERT INTO placements (gpu, uuid, machine, node, cluster, first_seen, last_seen)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (cluster, gpu, uuid, machine, node) DO UPDATE SET
    first_seen = MIN(first_seen, excluded.first_seen),
    last_seen = MAX(last_seen, excluded.last_seen)
"""


BUSY_TIMEOUT_S = 30.0
"""How long a write waits for another process's lock on the file before it fails."""


def connect(path: Path, *, busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open (creating if needed) the store in WAL mode with the schema in place."""
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, timeout=busy_timeout)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise ExporterError(
            "sqlite", f"{path} has schema version {version}, newer than {SCHEMA_VERSION}"
        )
    with conn:
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


class SqliteExporter:
    """Writes readings and placements to a local SQLite file in one transaction."""

    name = "sqlite"

    def __init__(self, path: Path, *, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._conn: sqlite3.Connection | None = connect(path, busy_timeout=busy_timeout)
        except (OSError, sqlite3.Error) as exc:
            raise ExporterError(self.name, f"cannot open {path}: {exc}") from exc

    def _write(self, batch: Sequence[Reading]) -> None:
        rows = []
        placements = []
        for r in batch:
            at = format_time(r.read_time)
            rows.append(
                (r.id, r.cluster, r.node, r.machine, r.source, r.chassis, r.gpu, r.uuid, at,
                 r.model, r.pci_bus_id, r.index)
            )  # fmt: skip
            placements.append((r.gpu, r.uuid, r.machine, r.node, r.cluster, at, at))
        with self._lock:
            conn = self._require_open()
            with conn:
                conn.executemany(_INSERT_READING, rows)
                conn.executemany(_UPSERT_PLACEMENT, placements)

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ExporterError(self.name, f"{self.path} is closed")
        return self._conn

    async def write(self, batch: Sequence[Reading]) -> None:
        """Insert the batch; readings already present are ignored."""
        try:
            await asyncio.to_thread(self._write, batch)
        except sqlite3.Error as exc:
            raise ExporterError(self.name, f"cannot write to {self.path}: {exc}") from exc

    def _health(self) -> None:
        with self._lock:
            self._require_open().execute("SELECT COUNT(*) FROM placements").fetchone()

    async def health(self) -> None:
        """Run a real query against the store."""
        try:
            await asyncio.to_thread(self._health)
        except sqlite3.Error as exc:
            raise ExporterError(self.name, f"{self.path} is not usable: {exc}") from exc

    async def close(self) -> None:
        """Close the connection; later writes fail with ``ExporterError``."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
