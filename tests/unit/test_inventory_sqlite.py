"""The SQLite store: readings written once, placements upserted, history answered."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpufleet.inventory.errors import ExporterError, HistoryError
from gpufleet.inventory.exporters.sqlite import SqliteExporter
from gpufleet.inventory.history import History
from gpufleet.inventory.reading import Reading

T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def reading(gpu: str = "S1", machine: str = "i-1", at: datetime = T0, **kw: object) -> Reading:
    base = Reading(
        cluster="c1", node=f"node-{machine}", machine=machine, source="nvml", chassis="",
        gpu=gpu, read_time=at, uuid=f"GPU-{gpu}", model="NVIDIA H100 80GB HBM3",
        pci_bus_id="00000000:18:00.0", index=0,
    )  # fmt: skip
    return replace(base, **kw)


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "inv.db"


async def test_replayed_batch_inserts_nothing_twice(db: Path) -> None:
    exp = SqliteExporter(db)
    batch = [reading("S1"), reading("S2")]
    await exp.write(batch)
    await exp.write(batch)
    await exp.close()
    assert count(db, "readings") == 2


async def test_new_scan_adds_readings_but_not_placements(db: Path) -> None:
    exp = SqliteExporter(db)
    await exp.write([reading("S1", at=T0)])
    await exp.write([reading("S1", at=T0 + timedelta(minutes=5))])
    await exp.close()
    assert (count(db, "readings"), count(db, "placements")) == (2, 1)


async def test_placement_spans_first_and_last_seen_even_out_of_order(db: Path) -> None:
    exp = SqliteExporter(db)
    await exp.write([reading(at=T0 + timedelta(hours=1))])
    await exp.write([reading(at=T0 + timedelta(hours=2))])
    await exp.write([reading(at=T0)])  # a late replay of an old batch
    await exp.close()
    (row,) = History(db).gpu("S1")
    assert (row.first_seen, row.last_seen) == (
        "2026-11-24T12:00:00.000Z",
        "2026-11-24T14:00:00.000Z",
    )


async def test_store_uses_wal_mode(db: Path) -> None:
    exp = SqliteExporter(db)
    await exp.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_health_runs_a_query_and_fails_once_closed(db: Path) -> None:
    exp = SqliteExporter(db)
    await exp.health()
    await exp.close()
    with pytest.raises(ExporterError, match="closed"):
        await exp.health()


async def test_unopenable_path_is_a_clear_exporter_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ExporterError, match="cannot open"):
        SqliteExporter(blocker / "inv.db")


async def test_history_finds_a_gpu_seen_in_two_machines(db: Path) -> None:
    exp = SqliteExporter(db)
    await exp.write([reading("S1", "i-1"), reading("S2", "i-1")])
    await exp.write([reading("S1", "i-2", at=T0 + timedelta(days=1))])
    await exp.close()
    moved = History(db).moved()
    assert [(p.gpu, p.machine) for p in moved] == [("S1", "i-1"), ("S1", "i-2")]


async def test_history_by_machine_and_node(db: Path) -> None:
    exp = SqliteExporter(db)
    await exp.write([reading("S1", "i-1"), reading("S2", "i-1"), reading("S3", "i-2")])
    await exp.close()
    history = History(db)
    assert [p.gpu for p in history.machine("i-1")] == ["S1", "S2"]
    assert [p.gpu for p in history.node("node-i-2")] == ["S3"]


async def test_history_looks_gpus_up_by_uuid_too(db: Path) -> None:
    exp = SqliteExporter(db)
    await exp.write([reading("S1")])
    await exp.close()
    assert [p.gpu for p in History(db).gpu("GPU-S1")] == ["S1"]


def test_history_of_a_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="no inventory database"):
        History(tmp_path / "absent.db")


def test_history_of_a_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(HistoryError, match="no placements table"):
        History(other)


async def test_moved_lists_each_gpus_trail_together_oldest_first(db: Path) -> None:
    exp = SqliteExporter(db)
    await exp.write([reading("S2", "i-1"), reading("S1", "i-1")])
    await exp.write([reading("S2", "i-2", at=T0 + timedelta(days=1))])
    await exp.write([reading("S1", "i-3", at=T0 + timedelta(days=2))])
    await exp.close()
    assert [(p.gpu, p.machine) for p in History(db).moved()] == [
        ("S1", "i-1"), ("S1", "i-3"), ("S2", "i-1"), ("S2", "i-2"),
    ]  # fmt: skip
