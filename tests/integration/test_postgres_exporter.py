"""The PostgreSQL exporter against a real server, started by scripts/servers/postgres.sh.

Each test writes its own tables (or its own database), so tests never see each
other's rows. The outage tests stop and restart the shared server as the
``postgres`` user, which is why the server facts include GPUFLEET_TEST_PG_BIN and
GPUFLEET_TEST_PG_DATA.
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.postgres import PostgresExporter, PostgresSettings
from gpufleet.inventory.reading import Reading
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
    write_all,
)

__all__ = ["server"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.integration


@pytest.fixture
def tables(server: Server) -> Iterator[tuple[str, str]]:
    """Fresh table names in the shared test database, dropped afterwards."""
    names = new_tables()
    yield names
    drop_tables(server, names)


@pytest.fixture
def empty_db(server: Server) -> Iterator[str]:
    """A database of its own, with no tables at all."""
    name = f"empty_{uuid.uuid4().hex[:10]}"
    with server.connect() as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    yield name
    with server.connect() as conn:
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)
            )
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- schema ------------------------------------------------------------------------------


async def test_first_open_creates_both_tables_in_an_empty_database(
    server: Server, empty_db: str
) -> None:
    exporter = PostgresExporter(make_settings(server, ("gpu", "placements"), postgres_db=empty_db))
    await exporter.open()
    await exporter.close()
    assert (count(server, "gpu", empty_db), count(server, "placements", empty_db)) == (0, 0)


def schema_snapshot(server: Server, db: str) -> list[tuple[str, str]]:
    with server.connect(db) as conn:
        cur = conn.execute(
            "SELECT c.relname, c.relkind::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' ORDER BY 1"
        )
        return [(name, kind) for name, kind in cur.fetchall()]


async def test_opening_again_on_a_migrated_database_changes_nothing(
    server: Server, empty_db: str
) -> None:
    settings = make_settings(server, ("gpu", "placements"), postgres_db=empty_db)
    await write_all(settings, [[reading()]])
    before = schema_snapshot(server, empty_db)
    await write_all(settings, [[reading()]])
    assert schema_snapshot(server, empty_db) == before


async def test_two_exporters_migrating_at_once_both_succeed(server: Server, empty_db: str) -> None:
    settings = make_settings(server, ("gpu", "placements"), postgres_db=empty_db)
    first, second = PostgresExporter(settings), PostgresExporter(settings)
    try:
        await asyncio.gather(first.open(), second.open())
    finally:
        await asyncio.gather(first.close(), second.close())
    assert count(server, "gpu", empty_db) == 0


async def test_the_schema_version_is_recorded_per_table(server: Server, empty_db: str) -> None:
    exporter = PostgresExporter(make_settings(server, ("gpu", "placements"), postgres_db=empty_db))
    await exporter.open()
    await exporter.close()
    with server.connect(empty_db) as conn:
        rows = conn.execute("SELECT table_name, version FROM gpufleet_schema_version").fetchall()
    assert sorted(rows) == [("gpu", 1), ("placements", 1)]


async def test_tables_migrated_by_a_newer_gpufleet_are_refused(
    server: Server, empty_db: str
) -> None:
    settings = make_settings(server, ("gpu", "placements"), postgres_db=empty_db)
    await write_all(settings, [[reading()]])
    with server.connect(empty_db) as conn:
        conn.execute("UPDATE gpufleet_schema_version SET version = 99 WHERE table_name = 'gpu'")
    exporter = PostgresExporter(settings)
    with pytest.raises(ExporterError, match="schema version 99 is newer") as caught:
        await exporter.open()
    await exporter.close()
    assert caught.value.error_type == "config"


async def test_without_auto_migrate_missing_tables_are_a_config_error(
    server: Server, tables: tuple[str, str]
) -> None:
    exporter = PostgresExporter(make_settings(server, tables, postgres_auto_migrate=False))
    with pytest.raises(ExporterError, match=f"table {tables[0]} does not exist") as caught:
        await exporter.write([reading()])
    await exporter.close()
    assert caught.value.error_type == "config"


async def test_a_foreign_table_with_a_bigserial_id_is_refused_not_written(
    server: Server, tables: tuple[str, str]
) -> None:
    with server.connect() as conn:
        conn.execute(
            psycopg.sql.SQL(
                "CREATE TABLE {} (id BIGSERIAL PRIMARY KEY, cluster text, node text, "
                "machine text, source text, gpu text, read_time timestamptz)"
            ).format(psycopg.sql.Identifier(tables[0]))
        )
    exporter = PostgresExporter(make_settings(server, tables))
    with pytest.raises(ExporterError, match="not a gpufleet table") as caught:
        await exporter.open()
    await exporter.close()
    assert caught.value.error_type == "config"


# --- readings ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hundred_thousand(server: Server) -> Iterator[tuple[PostgresSettings, list[list[Reading]]]]:
    """100,000 readings written in 200 batches of 500, to tables of their own."""
    names = new_tables()
    settings = make_settings(server, names)
    batches = fleet_batches(200, 500)
    asyncio.run(write_all(settings, batches))
    yield settings, batches
    drop_tables(server, names)


def test_100k_readings_in_500_batches_land_as_100k_rows(
    server: Server, hundred_thousand: tuple[PostgresSettings, list[list[Reading]]]
) -> None:
    settings, _ = hundred_thousand
    assert count(server, settings.postgres_table) == 100_000


def test_replaying_every_batch_leaves_the_row_count_unchanged(
    server: Server, hundred_thousand: tuple[PostgresSettings, list[list[Reading]]]
) -> None:
    settings, batches = hundred_thousand
    asyncio.run(write_all(settings, batches))
    assert count(server, settings.postgres_table) == 100_000


def test_each_gpu_in_the_fleet_has_one_placement(
    server: Server, hundred_thousand: tuple[PostgresSettings, list[list[Reading]]]
) -> None:
    settings, _ = hundred_thousand
    assert count(server, settings.postgres_placements_table) == 8_000


async def test_a_reading_keeps_every_column(server: Server, tables: tuple[str, str]) -> None:
    sent = replace(reading(), chassis="CH-1")
    await write_all(make_settings(server, tables), [[sent]])
    with server.connect() as conn:
        row = conn.execute(
            psycopg.sql.SQL(
                "SELECT id, cluster, node, machine, source, chassis, gpu, read_time, uuid, model, "
                "pci_bus_id, gpu_index FROM {}"
            ).format(psycopg.sql.Identifier(tables[0]))
        ).fetchone()
    fields = ("cluster", "node", "machine", "source", "chassis", "gpu", "read_time", "uuid",
              "model", "pci_bus_id", "index")  # fmt: skip
    # The id is the first 128 bits of Reading.id, as a uuid.
    assert row == (uuid.UUID(hex=sent.id[:32]), *(getattr(sent, name) for name in fields))


async def test_a_value_postgres_cannot_store_is_a_permanent_error(
    server: Server, tables: tuple[str, str]
) -> None:
    exporter = PostgresExporter(make_settings(server, tables))
    with pytest.raises(PermanentExporterError) as caught:
        await exporter.write([reading(gpu="SN\x00-1")])
    await exporter.close()
    assert caught.value.error_type == "rejected"


@pytest.mark.parametrize(
    "field", ["cluster", "node", "machine", "source", "chassis", "gpu", "uuid", "read_time"]
)
async def test_readings_that_differ_in_one_identifying_field_are_both_kept(
    server: Server, tables: tuple[str, str], field: str
) -> None:
    first = reading()
    changed: Any = T0 + timedelta(milliseconds=1) if field == "read_time" else "other"
    await write_all(make_settings(server, tables), [[first, replace(first, **{field: changed})]])
    assert count(server, tables[0]) == 2


async def test_a_reading_sent_again_with_other_details_is_kept_once_as_first_written(
    server: Server, tables: tuple[str, str]
) -> None:
    first = reading()
    again = replace(first, model="NVIDIA H200", pci_bus_id="00000000:99:00.0", index=7)
    await write_all(make_settings(server, tables), [[first], [again]])
    with server.connect() as conn:
        rows = conn.execute(
            psycopg.sql.SQL("SELECT model FROM {}").format(psycopg.sql.Identifier(tables[0]))
        ).fetchall()
    assert rows == [(first.model,)]


async def test_a_batch_that_fails_after_its_copy_leaves_nothing_for_the_next(
    server: Server, tables: tuple[str, str]
) -> None:
    # Too big for the node index: the INSERT fails, after the COPY filled the
    # session's batch table. The next batch, on the same connection, must not
    # carry those rows along.
    exporter = PostgresExporter(make_settings(server, tables, postgres_pool_max=1))
    try:
        with pytest.raises(PermanentExporterError):
            await exporter.write([reading(node="".join(uuid.uuid4().hex for _ in range(500)))])
        await exporter.write([reading(gpu="SN-2")])
    finally:
        await exporter.close()
    assert (count(server, tables[0]), count(server, tables[1])) == (1, 1)


async def test_a_session_without_the_batch_table_creates_it_in_the_batch(
    server: Server, tables: tuple[str, str]
) -> None:
    # Behind a transaction-mode pooler a batch can land on a server session
    # that never ran the pool's configure step, so has no temporary table.
    exporter = PostgresExporter(make_settings(server, tables, postgres_pool_max=1))
    try:
        await exporter.open()
        assert exporter._pool is not None
        async with exporter._pool.connection() as conn:
            await conn.execute("DISCARD TEMP")
        await exporter.write([reading()])
        await exporter.write([reading(at=T0 + timedelta(hours=1))])
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 2


async def test_two_writers_replaying_the_same_batches_at_once_store_each_reading_once(
    server: Server, tables: tuple[str, str]
) -> None:
    batches = fleet_batches(20, 500)
    settings = make_settings(server, tables)
    await write_all(settings, batches[:1])  # the tables exist before the race
    await asyncio.gather(write_all(settings, batches), write_all(settings, batches))
    assert (count(server, tables[0]), count(server, tables[1])) == (10_000, 8_000)


async def test_a_role_that_may_not_create_temporary_tables_gets_an_auth_error(
    server: Server, empty_db: str
) -> None:
    role = f"notemp_{uuid.uuid4().hex[:10]}"
    ident = psycopg.sql.Identifier
    settings = make_settings(server, ("gpu", "placements"), postgres_db=empty_db)
    await write_all(settings, [[reading()]])
    with server.connect(empty_db) as conn:
        conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN").format(ident(role)))
        conn.execute(
            psycopg.sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(ident(empty_db))
        )
        conn.execute(psycopg.sql.SQL("GRANT ALL ON gpu, placements TO {}").format(ident(role)))
    exporter = PostgresExporter(
        replace_settings(settings, postgres_user=role, postgres_auto_migrate=False)
    )
    try:
        with pytest.raises(ExporterError, match="temporary tables") as caught:
            await exporter.write([reading(at=T0 + timedelta(hours=1))])
    finally:
        await exporter.close()
        with server.connect(empty_db) as conn:
            conn.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(ident(role)))
            conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(ident(role)))
    assert caught.value.error_type == "auth"


def replace_settings(settings: PostgresSettings, **changes: Any) -> PostgresSettings:
    return PostgresSettings(**{**settings.model_dump(), **changes})


# --- how a batch is written ---------------------------------------------------------------


def inserting_transactions(server: Server, table: str) -> dict[str, int]:
    """GPU serial -> how many transactions inserted its readings (xmin tells)."""
    with server.connect() as conn:
        cur = conn.execute(
            psycopg.sql.SQL("SELECT gpu, count(DISTINCT xmin::text) FROM {} GROUP BY gpu").format(
                psycopg.sql.Identifier(table)
            )
        )
        return {gpu: int(n) for gpu, n in cur.fetchall()}


def transactions(server: Server, table: str) -> int:
    with server.connect() as conn:
        cur = conn.execute(
            psycopg.sql.SQL("SELECT count(DISTINCT xmin::text) FROM {}").format(
                psycopg.sql.Identifier(table)
            )
        )
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, 1),  # the default: one transaction (batches overlap instead)
        ({"postgres_write_parallelism": 2}, 2),  # two transactions on two connections
        ({"postgres_write_parallelism": 3}, 3),
        ({"postgres_write_parallelism": 2, "postgres_pool_max": 1}, 1),  # no more than the pool
    ],
)
async def test_a_batch_is_written_as_parallel_transactions(
    server: Server, tables: tuple[str, str], overrides: dict[str, Any], expected: int
) -> None:
    (batch,) = fleet_batches(1, 500)
    await write_all(make_settings(server, tables, **overrides), [batch])
    assert count(server, tables[0]) == 500
    assert transactions(server, tables[0]) == expected


async def test_a_gpu_seen_twice_in_a_split_batch_is_written_by_one_transaction(
    server: Server, tables: tuple[str, str]
) -> None:
    # Two sweeps of 300 GPUs in one batch: both readings of a GPU (and so its
    # one placement) go to the same part, so parts never wait on each other.
    batch = [
        reading(f"SN-{g}", at=T0 + timedelta(minutes=sweep), index=g)
        for sweep in (0, 5)
        for g in range(300)
    ]
    await write_all(make_settings(server, tables, postgres_write_parallelism=2), [batch])
    assert transactions(server, tables[0]) == 2
    assert set(inserting_transactions(server, tables[0]).values()) == {1}
    assert count(server, tables[1]) == 300
    assert placements(server, tables[1])[0][2:] == (T0, T0 + timedelta(minutes=5))


async def test_new_readings_take_the_plain_insert_and_a_replay_the_conflict_path(
    server: Server, tables: tuple[str, str]
) -> None:
    batches = fleet_batches(3, 500)
    exporter = PostgresExporter(make_settings(server, tables, postgres_write_parallelism=2))
    try:
        for batch in batches:
            await exporter.write(batch)
        assert exporter.conflicting_parts == 0
        await exporter.write(batches[1])  # sent again, say after a lost acknowledgement
        # Each of the batch's two parts met stored rows, and stored nothing new.
        assert exporter.conflicting_parts == 2
        # A batch half old, half new: the new half is stored, the old not twice.
        mixed = batches[2][:250] + fleet_batches(4, 500)[3][:250]
        await exporter.write(mixed)
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 1_750
    assert count(server, tables[1]) == 1_750


async def test_when_one_part_is_refused_the_other_is_stored_and_the_batch_is_permanent(
    server: Server, tables: tuple[str, str]
) -> None:
    # The refused batch goes to the dead-letter file whole; the part that
    # committed is in the table, and harmless if the batch is ever replayed.
    (batch,) = fleet_batches(1, 400)
    too_long = "".join(uuid.uuid4().hex for _ in range(500))  # too big for the node index
    batch[0] = replace(batch[0], node=too_long)
    exporter = PostgresExporter(make_settings(server, tables, postgres_write_parallelism=2))
    try:
        with pytest.raises(PermanentExporterError):
            await exporter.write(batch)
    finally:
        await exporter.close()
    stored = count(server, tables[0])
    assert 0 < stored < 400
    assert count(server, tables[1]) == stored


async def test_the_time_indexes_are_brin_and_the_others_btree(
    server: Server, tables: tuple[str, str]
) -> None:
    exporter = PostgresExporter(make_settings(server, tables))
    try:
        await exporter.open()
    finally:
        await exporter.close()
    with server.connect() as conn:
        cur = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [tables[0]]
        )
        methods = {name: ddl.split(" USING ")[1].split()[0] for name, ddl in cur.fetchall()}
    table = tables[0]
    assert methods == {
        f"idx_{table}_key": "btree",
        f"idx_{table}_cluster": "btree",
        f"idx_{table}_node": "btree",
        f"idx_{table}_read_time": "brin",
        f"idx_{table}_created_at": "brin",
    }


# --- placements --------------------------------------------------------------------------


async def test_a_gpu_moved_to_another_machine_has_two_placements(
    server: Server, tables: tuple[str, str]
) -> None:
    t1, t2, t3 = T0, T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    await write_all(
        make_settings(server, tables),
        [[reading(at=t1)], [reading(at=t2)], [reading(machine="i-b", node="node-b", at=t3)]],
    )
    assert placements(server, tables[1]) == [("SN-1", "i-a", t1, t2), ("SN-1", "i-b", t3, t3)]


async def test_a_second_scan_on_the_same_machine_only_moves_last_seen(
    server: Server, tables: tuple[str, str]
) -> None:
    t1, t2 = T0, T0 + timedelta(hours=1)
    await write_all(make_settings(server, tables), [[reading(at=t1)], [reading(at=t2)]])
    assert placements(server, tables[1]) == [("SN-1", "i-a", t1, t2)]


async def test_a_late_replay_of_an_old_batch_never_moves_last_seen_back(
    server: Server, tables: tuple[str, str]
) -> None:
    t1, t2 = T0, T0 + timedelta(hours=1)
    await write_all(make_settings(server, tables), [[reading(at=t2)], [reading(at=t1)]])
    assert placements(server, tables[1]) == [("SN-1", "i-a", t1, t2)]


async def test_one_batch_seeing_a_gpu_twice_upserts_one_placement(
    server: Server, tables: tuple[str, str]
) -> None:
    t1, t2 = T0, T0 + timedelta(hours=1)
    await write_all(make_settings(server, tables), [[reading(at=t2), reading(at=t1)]])
    assert placements(server, tables[1]) == [("SN-1", "i-a", t1, t2)]


# --- settings ----------------------------------------------------------------------------


@pytest.fixture
def postgres_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in {
        "POSTGRES_HOST": "db.example",
        "POSTGRES_DB": "inventory",
        "POSTGRES_USER": "gpufleet",
    }.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.mark.parametrize("variable", ["POSTGRES_TABLE", "POSTGRES_PLACEMENTS_TABLE"])
def test_a_hostile_table_name_is_refused_at_start_up_in_one_line(
    postgres_env: pytest.MonkeyPatch, variable: str
) -> None:
    postgres_env.setenv(variable, "gpu; DROP TABLE x")
    with pytest.raises(ConfigError, match=variable) as caught:
        load_settings(PostgresSettings)
    assert "\n" not in str(caught.value)


def test_table_names_fold_to_lower_case_as_gpuid_unquoted_names_did(
    postgres_env: pytest.MonkeyPatch,
) -> None:
    postgres_env.setenv("POSTGRES_TABLE", "GPU_Readings")
    assert load_settings(PostgresSettings).postgres_table == "gpu_readings"


def test_gpuid_defaults_apply_when_only_the_required_variables_are_set(
    postgres_env: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(PostgresSettings)
    assert (settings.postgres_port, settings.postgres_sslmode, settings.postgres_table) == (
        5432,
        "require",
        "gpu",
    )


def test_a_missing_host_is_named_at_start_up(postgres_env: pytest.MonkeyPatch) -> None:
    postgres_env.delenv("POSTGRES_HOST")
    with pytest.raises(ConfigError, match="missing required POSTGRES_HOST"):
        load_settings(PostgresSettings)


# --- health and outages ------------------------------------------------------------------


async def test_health_passes_on_a_live_server(server: Server, tables: tuple[str, str]) -> None:
    exporter = PostgresExporter(make_settings(server, tables))
    try:
        await exporter.health()
    finally:
        await exporter.close()


async def test_health_against_a_closed_port_is_a_connection_error(
    server: Server, tables: tuple[str, str]
) -> None:
    exporter = PostgresExporter(
        make_settings(server, tables, postgres_port=free_port(), postgres_connect_timeout=0.5)
    )
    with pytest.raises(ExporterError) as caught:
        await exporter.health()
    await exporter.close()
    assert caught.value.error_type == "connection"


async def test_errors_name_the_server_but_never_the_password(
    server: Server, tables: tuple[str, str]
) -> None:
    port = free_port()
    exporter = PostgresExporter(
        make_settings(
            server, tables, postgres_port=port, postgres_password="s3cret-pw",
            postgres_connect_timeout=0.5,
        )
    )  # fmt: skip
    with pytest.raises(
        ExporterError, match=re.escape(f"{server.host}:{port}/{server.db}")
    ) as caught:
        await exporter.write([reading()])
    await exporter.close()
    assert "s3cret-pw" not in str(caught.value)


async def test_a_database_that_does_not_exist_is_a_config_error(
    server: Server, tables: tuple[str, str]
) -> None:
    exporter = PostgresExporter(make_settings(server, tables, postgres_db="no_such_database"))
    with pytest.raises(ExporterError) as caught:
        await exporter.health()
    await exporter.close()
    assert caught.value.error_type == "config"


async def test_sslmode_require_against_a_server_without_ssl_says_so_as_a_config_error(
    server: Server, tables: tuple[str, str]
) -> None:
    # The test server has no SSL. This once waited out the pool and said
    # "no connection within 3s", a retryable connection error.
    exporter = PostgresExporter(make_settings(server, tables, postgres_sslmode="require"))
    with pytest.raises(ExporterError) as caught:
        await exporter.write([reading()])
    await exporter.close()
    assert caught.value.error_type == "config"
    assert "server does not support SSL" in str(caught.value)
    assert "POSTGRES_SSLMODE=require" in str(caught.value)
    assert "no connection within" not in str(caught.value)


class Outage:
    """Stops the shared server and brings it back on the same port and data."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.stopped = False

    def stop(self) -> None:
        self.server.pg_ctl("-m", "fast", "-w", "stop")
        self.stopped = True

    def start(self) -> None:
        self.server.pg_ctl("-l", self.server.log, "-w", "-t", "60", "start")
        self.stopped = False


@pytest.fixture
def outage(server: Server) -> Iterator[Outage]:
    """Server control for a test; the server is always running again afterwards."""
    control = Outage(server)
    try:
        yield control
    finally:
        if control.stopped:
            control.start()


async def test_a_write_while_the_server_is_down_is_a_retryable_error(
    server: Server, tables: tuple[str, str], outage: Outage
) -> None:
    exporter = PostgresExporter(make_settings(server, tables, postgres_connect_timeout=1.0))
    await exporter.write([reading()])
    outage.stop()
    try:
        with pytest.raises(ExporterError) as caught:
            await exporter.write([reading(at=T0 + timedelta(hours=1))])
    finally:
        outage.start()
        await exporter.close()
    assert not isinstance(caught.value, PermanentExporterError)


async def test_the_same_exporter_writes_again_once_the_server_is_back(
    server: Server, tables: tuple[str, str], outage: Outage
) -> None:
    exporter = PostgresExporter(make_settings(server, tables, postgres_connect_timeout=1.0))
    try:
        await exporter.write([reading()])
        outage.stop()
        with pytest.raises(ExporterError):
            await exporter.write([reading(at=T0 + timedelta(hours=1))])
        outage.start()
        await exporter.write([reading(at=T0 + timedelta(hours=1))])
    finally:
        await exporter.close()
    assert count(server, tables[0]) == 2
