"""The device API's optional durability: GPUs and the resourceVersion counter in SQLite.

One row per GPU holds its serialized ``Gpu`` message; one row holds the store's
resourceVersion counter. Each store write is one transaction that writes the
object (or deletes it) and the counter together, so the file never holds an
object newer than its counter.

Journal mode is WAL with ``synchronous=NORMAL``. In WAL mode NORMAL makes every
committed transaction durable against a crash of the process (SIGKILL, OOM), the
failure a node daemon actually meets, without an fsync per write: the store's
writes run on the event loop, and an fsync there would stall every watcher. After
an OS crash or power loss the last few transactions can be lost; the GPUs were
restarted too, the provider re-registers and re-derives health from NVML, and the
store's counter floor (see ``store.GpuStore``) still keeps resourceVersions from
going backwards.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from gpufleet.core.lock import LockHeldError, ProcessLock
from gpufleet.deviceapi.errors import DeviceApiError
from gpufleet.deviceapi.v1alpha1 import gpu_pb2 as pb

# "gpuF" in ASCII: marks the file as ours, so a foreign SQLite file is refused.
APPLICATION_ID = 0x67707546
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gpus (
    name TEXT PRIMARY KEY,
    resource_version INTEGER NOT NULL,
    object BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    resource_version INTEGER NOT NULL
);
INSERT OR IGNORE INTO counter (id, resource_version) VALUES (0, 0);
"""


class StateFileError(DeviceApiError):
    """The state file cannot be opened, read or written; the message names the file."""

    reason = "StateFile"


@dataclass(frozen=True, slots=True)
class LoadedState:
    """What a state file held: its counter and every GPU."""

    resource_version: int
    gpus: list[pb.Gpu]


class StateFile:
    """A SQLite file holding the store's objects and resourceVersion counter."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = _lock(path)
        try:
            self._conn = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            self._lock.release()
            raise StateFileError(f"cannot open device API state file {path}: {exc}") from exc
        try:
            self._init_schema()
        except sqlite3.Error as exc:
            self._close()
            raise StateFileError(
                f"{path} is not a usable device API state file (corrupt or not SQLite): {exc}"
            ) from exc
        except StateFileError:
            self._close()
            raise

    def _init_schema(self) -> None:
        conn = self._conn
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and tables:
            raise StateFileError(
                f"{self.path} is a SQLite database that gpufleet did not write; refusing to use it"
                " as the device API state file"
            )
        if app_id not in (0, APPLICATION_ID):
            raise StateFileError(
                f"{self.path} belongs to another application (application_id {app_id:#x});"
                " refusing to use it as the device API state file"
            )
        if version > SCHEMA_VERSION:
            raise StateFileError(
                f"{self.path} has state schema {version}, newer than this gpufleet's"
                f" {SCHEMA_VERSION}; refusing to downgrade it"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def load(self) -> LoadedState:
        """Every stored GPU and the counter; the counter is never below an object's RV."""
        try:
            row = self._conn.execute("SELECT resource_version FROM counter WHERE id = 0").fetchone()
            counter = int(row[0])
            rows = self._conn.execute(
                "SELECT name, resource_version, object FROM gpus ORDER BY resource_version"
            ).fetchall()
        except sqlite3.Error as exc:
            raise StateFileError(f"cannot read device API state file {self.path}: {exc}") from exc
        gpus: list[pb.Gpu] = []
        for name, rv, blob in rows:
            gpu = pb.Gpu()
            try:
                gpu.ParseFromString(blob)
            except (DecodeError, TypeError) as exc:
                raise StateFileError(
                    f"device API state file {self.path}: GPU row {name!r} is corrupt: {exc}"
                ) from exc
            if gpu.metadata.name != name or gpu.metadata.resource_version != str(rv):
                raise StateFileError(
                    f"device API state file {self.path}: GPU row {name!r} does not match its"
                    f" object (name {gpu.metadata.name!r}, RV {gpu.metadata.resource_version!r})"
                )
            gpus.append(gpu)
            counter = max(counter, int(rv))
        return LoadedState(counter, gpus)

    def put(self, gpu: pb.Gpu, counter: int) -> None:
        """Write one GPU and the counter in one transaction."""
        self._write(
            "INSERT INTO gpus (name, resource_version, object) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET"
            " resource_version = excluded.resource_version, object = excluded.object",
            (gpu.metadata.name, int(gpu.metadata.resource_version), gpu.SerializeToString()),
            counter,
        )

    def delete(self, name: str, counter: int) -> None:
        """Delete one GPU and write the counter in one transaction."""
        self._write("DELETE FROM gpus WHERE name = ?", (name,), counter)

    def _write(self, sql: str, params: tuple[object, ...], counter: int) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN")
            try:
                conn.execute(sql, params)
                conn.execute("UPDATE counter SET resource_version = ? WHERE id = 0", (counter,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateFileError(f"cannot write device API state file {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the connection and release the process lock (idempotent)."""
        self._close()

    def _close(self) -> None:
        self._conn.close()
        self._lock.release()


def lock_path(path: Path) -> Path:
    """The lock file beside state file ``path``: ``state.db`` -> ``state.db.lock``."""
    return path.with_name(path.name + ".lock")


def _lock(path: Path) -> ProcessLock:
    # Two servers on one file would each hand out resourceVersions from their own
    # counter and overwrite each other's objects: the second one is refused.
    try:
        return ProcessLock(lock_path(path))
    except LockHeldError:
        raise StateFileError(
            f"device API state file {path} is in use by another gpufleet process;"
            " give each server its own STATE_FILE"
        ) from None
    except OSError as exc:
        raise StateFileError(f"cannot open device API state file {path}: {exc}") from exc
