"""``inventory history --from postgres`` against the real server: the SQLite answers, exactly.

The same readings go to a SQLite inventory and to PostgreSQL tables, and the
command, run as a subprocess, must print the same stdout from both for every
question, as a table and as JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from gpufleet.inventory.exporters.postgres import PostgresExporter
from gpufleet.inventory.exporters.postgres.history import PostgresHistory
from gpufleet.inventory.exporters.sqlite import SqliteExporter
from gpufleet.inventory.reading import Reading
from tests.integration.cli_support import gpufleet
from tests.integration.postgres_support import (
    T0,
    Server,
    create_gpuid_table,
    drop_tables,
    make_settings,
    new_tables,
    reading,
    server,
    write_all,
)

__all__ = ["server"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.integration

_US = timedelta(microseconds=1)


def fleet_readings() -> list[Reading]:
    """Moves, a GB200 board (two dies, one serial), and read times that differ below 1 ms."""
    gb200 = reading("SN-GB", "i-a", "node-a", T0)
    return [
        reading("SN-1", "i-a", "node-a", T0 + 700 * _US),
        reading("SN-2", "i-a", "node-a", T0 + 300 * _US, index=1),
        reading("SN-1", "i-a", "node-a", T0 + timedelta(hours=1)),
        replace(gb200, uuid="GPU-die-0", index=2),
        replace(gb200, uuid="GPU-die-1", index=3),
        # SN-1 and the GB200 board move to i-b, on another node; SN-1 comes back.
        reading("SN-1", "i-b", "node-b", T0 + timedelta(hours=2)),
        replace(gb200, machine="i-b", node="node-b", read_time=T0 + timedelta(hours=2),
                uuid="GPU-die-0"),
        replace(gb200, machine="i-b", node="node-b", read_time=T0 + timedelta(hours=2),
                uuid="GPU-die-1"),
        reading("SN-1", "i-a", "node-a", T0 + timedelta(hours=3)),
        # The same serial in another cluster is another GPU: not moved.
        replace(reading("SN-2", "i-z", "node-z", T0), cluster="c2"),
    ]  # fmt: skip


@pytest.fixture
def both(server: Server, tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """The environments that point ``history`` at each store, holding the same readings."""
    tables = new_tables()
    db = tmp_path / "inv.db"
    sqlite = SqliteExporter(db)

    async def fill() -> None:
        await sqlite.write(fleet_readings())
        await sqlite.close()
        await write_all(make_settings(server, tables), [fleet_readings()])

    asyncio.run(fill())
    yield {"SQLITE_PATH": str(db)}, postgres_env(server, tables)
    drop_tables(server, tables)


def postgres_env(server: Server, tables: tuple[str, str]) -> dict[str, str]:
    return {
        "POSTGRES_HOST": server.host,
        "POSTGRES_PORT": str(server.port),
        "POSTGRES_DB": server.db,
        "POSTGRES_USER": server.user,
        "POSTGRES_SSLMODE": "disable",
        "POSTGRES_TABLE": tables[0],
        "POSTGRES_PLACEMENTS_TABLE": tables[1],
    }


def history(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    store = ["--from", "postgres"] if "POSTGRES_HOST" in env else []
    result = gpufleet("inventory", "history", *store, *args, env=env)
    assert result.returncode == 0, result.stderr
    return result


QUESTIONS = [
    ("--gpu", "SN-1"),
    ("--gpu", "GPU-die-1"),
    ("--gpu", "SN-2"),
    ("--machine", "i-a"),
    ("--node", "node-b"),
    ("--moved",),
    ("--gpu", "SN-none"),
]


@pytest.mark.parametrize("question", QUESTIONS, ids=" ".join)
@pytest.mark.parametrize("form", [(), ("--json",)], ids=["table", "json"])
def test_postgres_answers_exactly_as_sqlite_does(
    both: tuple[dict[str, str], dict[str, str]], question: tuple[str, ...], form: tuple[str, ...]
) -> None:
    from_sqlite, from_postgres = both
    assert history(from_postgres, *question, *form).stdout == (
        history(from_sqlite, *question, *form).stdout
    )


def test_the_answers_compared_are_not_empty(both: tuple[dict[str, str], dict[str, str]]) -> None:
    moved = json.loads(history(both[1], "--moved", "--json").stdout)
    assert {(p["gpu"], p["machine"]) for p in moved} == {
        ("SN-1", "i-a"), ("SN-1", "i-b"), ("SN-GB", "i-a"), ("SN-GB", "i-b"),
    }  # fmt: skip
    by_node = json.loads(history(both[1], "--node", "node-a", "--json").stdout)
    # Read 400 µs apart within one millisecond: ordered by serial, as in SQLite.
    assert [p["gpu"] for p in by_node][:2] == ["SN-1", "SN-2"]


def test_from_postgres_with_db_is_one_line_naming_both_flags(
    server: Server, tmp_path: Path
) -> None:
    result = gpufleet("inventory", "history", "--from", "postgres", "--db", str(tmp_path / "x"),
                      "--moved", env=postgres_env(server, new_tables()))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--db" in result.stderr
    assert "--from postgres" in result.stderr


def test_from_postgres_without_the_tables_is_one_line_naming_the_table(server: Server) -> None:
    tables = new_tables()
    result = gpufleet("inventory", "history", "--from", "postgres", "--moved",
                      env=postgres_env(server, tables))  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"table {tables[1]}: no placements table" in result.stderr


def test_from_postgres_with_sslmode_require_on_a_server_without_ssl_is_a_config_error(
    server: Server,
) -> None:
    env = {**postgres_env(server, new_tables()), "POSTGRES_SSLMODE": "require"}
    result = gpufleet("inventory", "history", "--from", "postgres", "--moved", env=env)
    assert result.returncode == 2
    assert "server does not support SSL" in result.stderr
    assert "Traceback" not in result.stderr


def test_history_from_postgres_shows_the_readings_gpuid_wrote(server: Server) -> None:
    tables = new_tables()
    try:
        create_gpuid_table(server, tables[0])
        new = reading("SN-1", "i-c", "node-c", T0 + timedelta(hours=2))
        asyncio.run(write_all(make_settings(server, tables), [[new]]))
        trail = json.loads(history(postgres_env(server, tables), "--gpu", "SN-1", "--json").stdout)
    finally:
        drop_tables(server, tables)
    assert [(p["machine"], p["first_seen"], p["last_seen"]) for p in trail] == [
        ("i-a", "2026-11-24T00:16:10.123Z", "2026-11-24T01:16:10.123Z"),  # gpuid's
        ("i-c", "2026-11-24T02:16:10.123Z", "2026-11-24T02:16:10.123Z"),  # gpufleet's
    ]


@pytest.fixture
def big_placements(server: Server) -> Iterator[tuple[str, str]]:
    """Placements for 20,000 GPUs, analysed, so the planner weighs indexes as in a fleet."""
    tables = new_tables()

    async def open_only() -> None:
        exporter = PostgresExporter(make_settings(server, tables))
        await exporter.open()
        await exporter.close()

    asyncio.run(open_only())
    with server.connect() as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (cluster, gpu, uuid, machine, node, first_seen, last_seen) "
                "SELECT 'c1', 'SN-' || i, 'GPU-' || i, 'i-' || (i / 8), 'node-' || (i / 8), "
                "now(), now() FROM generate_series(1, 20000) AS i"
            ).format(sql.Identifier(tables[1]))
        )
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(tables[1])))
    yield tables
    drop_tables(server, tables)


@pytest.mark.parametrize(
    ("question", "value", "indexes"),
    [
        ("gpu", "SN-77", ("gpu", "uuid")),
        ("machine", "i-9", ("machine",)),
        ("node", "node-9", ("node",)),
    ],
)
def test_each_question_is_answered_through_the_placements_indexes(
    server: Server, big_placements: tuple[str, str], question: str, value: str,
    indexes: tuple[str, ...],
) -> None:  # fmt: skip
    store = PostgresHistory(make_settings(server, big_placements))
    try:
        plan = store.explain(question, value)  # type: ignore[arg-type]
    finally:
        store.close()
    assert "Seq Scan" not in plan
    for suffix in indexes:
        assert f"idx_{big_placements[1]}_{suffix}" in plan


def test_history_queries_run_read_only(server: Server, big_placements: tuple[str, str]) -> None:
    store = PostgresHistory(make_settings(server, big_placements))
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            store._conn.execute(  # the session itself refuses writes
                sql.SQL("DELETE FROM {}").format(sql.Identifier(big_placements[1]))
            )
    finally:
        store.close()
