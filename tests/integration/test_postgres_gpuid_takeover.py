"""Switching from gpuid: the exporter takes over gpuid's own readings table, in place.

gpuid's table is created (``postgres_support.create_gpuid_table``) as gpuid
creates it (a ``BIGSERIAL`` id and a UNIQUE key over the seven reading columns)
and written as gpuid writes it; then gpufleet starts on it and writes on, and
nothing gpuid wrote may be lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import sql

from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.exporters.postgres import PostgresExporter
from gpufleet.inventory.reading import Reading
from tests.integration.postgres_support import (
    GPUID_ROWS,
    T0,
    Server,
    count,
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


@pytest.fixture
def gpuid(server: Server) -> Iterator[tuple[str, str]]:
    """Fresh table names; the readings table is gpuid's, with gpuid's rows in it."""
    names = new_tables()
    create_gpuid_table(server, names[0])
    yield names
    drop_tables(server, names)


def stored(server: Server, table: str) -> set[tuple[Any, ...]]:
    with server.connect() as conn:
        cur = conn.execute(
            sql.SQL(
                "SELECT cluster, node, machine, source, chassis, gpu, read_time FROM {}"
            ).format(sql.Identifier(table))
        )
        return {(*row[:6], row[6].astimezone(UTC)) for row in cur.fetchall()}


def placement_rows(server: Server, table: str) -> set[tuple[str, str, str, datetime, datetime]]:
    with server.connect() as conn:
        cur = conn.execute(
            sql.SQL("SELECT gpu, uuid, machine, first_seen, last_seen FROM {}").format(
                sql.Identifier(table)
            )
        )
        return {(g, u, m, f.astimezone(UTC), la.astimezone(UTC)) for g, u, m, f, la in cur}


def layout(server: Server, tables: tuple[str, str]) -> list[tuple[str, ...]]:
    """The two tables' columns, constraints and indexes (the shared database has others')."""
    with server.connect() as conn:
        columns = conn.execute(
            "SELECT attrelid::regclass::text, attname, format_type(atttypid, atttypmod), "
            "coalesce(pg_get_expr(d.adbin, d.adrelid), '') FROM pg_attribute a "
            "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
            "WHERE attrelid = ANY(%s::regclass[]) AND attnum > 0 AND NOT attisdropped",
            [list(tables)],
        ).fetchall()
        constraints = conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = ANY(%s::regclass[])",
            [list(tables)],
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s)", [list(tables)]
        ).fetchall()
    return sorted(map(tuple, [*columns, *constraints, *indexes]))


def gpuid_readings() -> set[tuple[Any, ...]]:
    return {(*row[:4], row[4] or "", *row[5:]) for row in GPUID_ROWS}


OLD_PLACEMENTS = {
    ("SN-1", "", "i-a", T0, T0 + timedelta(hours=1)),
    ("SN-2", "", "i-a", T0, T0),
    ("SN-3", "", "i-b", T0 + timedelta(minutes=5), T0 + timedelta(minutes=5)),
}


@pytest.mark.parametrize("read_time_type", ["TIMESTAMPTZ", "TIMESTAMP"])
async def test_gpuids_table_is_taken_over_and_keeps_every_row_beside_the_new_ones(
    server: Server, read_time_type: str
) -> None:
    tables = new_tables()
    try:
        create_gpuid_table(server, tables[0], read_time_type)
        new = [reading("SN-1", "i-c", "node-c", T0 + timedelta(hours=2))]
        await write_all(make_settings(server, tables), [new])
        assert stored(server, tables[0]) == gpuid_readings() | {
            ("c1", "node-c", "i-c", "nvml", "", "SN-1", T0 + timedelta(hours=2))
        }
        assert placement_rows(server, tables[1]) == OLD_PLACEMENTS | {
            ("SN-1", "GPU-SN-1", "i-c", T0 + timedelta(hours=2), T0 + timedelta(hours=2))
        }
    finally:
        drop_tables(server, tables)


async def test_a_taken_over_reading_has_the_id_gpufleet_gives_it(
    server: Server, gpuid: tuple[str, str]
) -> None:
    exporter = PostgresExporter(make_settings(server, gpuid))
    await exporter.open()
    await exporter.close()
    with server.connect() as conn:
        cur = conn.execute(
            sql.SQL("SELECT replace(id::text, '-', '') FROM {} WHERE gpu = 'SN-3'").format(
                sql.Identifier(gpuid[0])
            )
        )
        (stored_id,) = cur.fetchone() or ("",)
    as_gpufleet = Reading(
        cluster="c1", node="node-b", machine="i-b", source="nvidia-smi", chassis="CH-9",
        gpu="SN-3", read_time=T0 + timedelta(minutes=5), uuid="", model="", pci_bus_id="",
        index=0,
    )  # fmt: skip
    assert stored_id == as_gpufleet.id[:32]


async def test_taking_over_twice_changes_nothing_the_second_time(
    server: Server, gpuid: tuple[str, str]
) -> None:
    settings = make_settings(server, gpuid)
    await write_all(settings, [[reading()]])
    before = layout(server, gpuid), placement_rows(server, gpuid[1])
    await write_all(settings, [[reading()]])
    assert (layout(server, gpuid), placement_rows(server, gpuid[1])) == before
    assert count(server, gpuid[0]) == len(GPUID_ROWS) + 1


async def test_two_exporters_taking_over_at_once_migrate_once_and_lose_nothing(
    server: Server, gpuid: tuple[str, str]
) -> None:
    settings = make_settings(server, gpuid)
    first, second = PostgresExporter(settings), PostgresExporter(settings)
    try:
        await asyncio.gather(first.open(), second.open())
        await asyncio.gather(
            first.write([reading("SN-8", at=T0 + timedelta(hours=3))]),
            second.write([reading("SN-9", at=T0 + timedelta(hours=3))]),
        )
    finally:
        await asyncio.gather(first.close(), second.close())
    assert count(server, gpuid[0]) == len(GPUID_ROWS) + 2
    assert placement_rows(server, gpuid[1]) >= OLD_PLACEMENTS
    assert len(placement_rows(server, gpuid[1])) == len(OLD_PLACEMENTS) + 2


async def test_after_the_takeover_both_dies_of_a_gb200_board_are_kept(
    server: Server, gpuid: tuple[str, str]
) -> None:
    # gpuid's seven-column key has no uuid: it would refuse the second die.
    board = reading("SN-GB", at=T0 + timedelta(hours=4))
    dies = [replace(board, uuid=f"GPU-die-{i}", index=i) for i in range(2)]
    await write_all(make_settings(server, gpuid), [dies])
    assert count(server, gpuid[0]) == len(GPUID_ROWS) + 2


async def test_without_auto_migrate_gpuids_table_is_refused_with_the_setting_to_change(
    server: Server, gpuid: tuple[str, str]
) -> None:
    exporter = PostgresExporter(make_settings(server, gpuid, postgres_auto_migrate=False))
    with pytest.raises(ExporterError, match="is gpuid's; set POSTGRES_AUTO_MIGRATE=true") as caught:
        await exporter.open()
    await exporter.close()
    assert caught.value.error_type == "config"
    assert count(server, gpuid[0]) == len(GPUID_ROWS)


async def test_a_takeover_that_fails_leaves_gpuids_table_as_it_was(
    server: Server, gpuid: tuple[str, str]
) -> None:
    # NULLs make two rows distinct to gpuid's key but equal to gpufleet's.
    with server.connect() as conn:
        for _ in range(2):
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (cluster, node, machine, source, chassis, gpu, read_time) "
                    "VALUES ('c1', 'node-z', 'i-z', 'nvml', NULL, 'SN-Z', %s)"
                ).format(sql.Identifier(gpuid[0])),
                [T0],
            )
    exporter = PostgresExporter(make_settings(server, gpuid))
    with pytest.raises(ExporterError, match="cannot take over gpuid's table") as caught:
        await exporter.open()
    await exporter.close()
    assert caught.value.error_type == "config"
    with server.connect() as conn:
        cur = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = 'id'",
            [gpuid[0]],
        )
        assert cur.fetchone() == ("bigint",)
    assert count(server, gpuid[0]) == len(GPUID_ROWS) + 2
