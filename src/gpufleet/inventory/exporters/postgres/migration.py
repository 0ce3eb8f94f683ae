"""Getting the PostgreSQL tables ready before the first batch.

With ``POSTGRES_AUTO_MIGRATE`` (the default) the tables are created or
migrated under an advisory lock, gpuid's readings table is taken over in
place (``gpuid.py``), and the schema version is recorded; without it they are
only checked. Either way a missing table, a table of a newer gpufleet or a
foreign table of the same name is refused as a configuration error, never
retried. The statements themselves are in ``schema.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql

from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.exporters.postgres.errors import first_line
from gpufleet.inventory.exporters.postgres.gpuid import (
    backfill_placements,
    is_gpuid_table,
    take_over,
)
from gpufleet.inventory.exporters.postgres.schema import (
    COLUMNS,
    PLACEMENT_COLUMNS,
    SCHEMA_VERSION,
    VERSION_TABLE,
    index_name,
    schema_statements,
)
from gpufleet.inventory.exporters.postgres.settings import PostgresSettings

__all__ = ["Migration"]

log = logging.getLogger(__name__)

# Any fixed 64-bit number: every gpufleet exporter migrating any table in this
# database serialises on it, because concurrent CREATE TABLE IF NOT EXISTS can
# still fail on the catalog's unique index.
_MIGRATION_LOCK_KEY = 0x6770_7566_6C65_6574  # "gpufleet"


class Migration:
    """Creates, migrates or checks the tables of one exporter's settings, on a connection.

    ``name`` is the exporter's, for the ``ExporterError``s it raises.
    """

    def __init__(self, settings: PostgresSettings, name: str) -> None:
        self.settings = settings
        self.name = name

    @property
    def where(self) -> str:
        """The server and tables, for messages."""
        s = self.settings
        return f"{s.target} table {s.postgres_table}/{s.postgres_placements_table}"

    async def prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Create or migrate the tables (``POSTGRES_AUTO_MIGRATE``), then check they are ours."""
        s = self.settings
        tables = [s.postgres_table, s.postgres_placements_table]
        create_tables, create_indexes = schema_statements(*tables)
        taken_over, placed = False, 0
        async with conn.transaction():
            if s.postgres_auto_migrate:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK_KEY])
                await self._check_version(conn, tables)
                # Under the lock: a second process starting at the same time
                # waits here, then finds the table migrated.
                found = await self._columns(conn, s.postgres_table)
                if is_gpuid_table(found):
                    await self._take_over(conn, found)
                    taken_over = True
                for statement in create_tables:
                    await conn.execute(statement)
            # Before the indexes: a foreign table of the same name must be
            # refused with a clear message, not a "column does not exist".
            await self._check_columns(conn, s.postgres_table, frozenset(COLUMNS))
            await self._check_columns(conn, s.postgres_placements_table, PLACEMENT_COLUMNS)
            if s.postgres_auto_migrate:
                for statement in create_indexes:
                    await conn.execute(statement)
                if taken_over:
                    placed = await backfill_placements(conn, *tables)
                for table in tables:
                    await conn.execute(
                        sql.SQL(
                            "INSERT INTO {v} (table_name, version) VALUES (%s, %s) "
                            "ON CONFLICT (table_name) DO UPDATE SET version = EXCLUDED.version, "
                            "migrated_at = now() WHERE {v}.version < EXCLUDED.version"
                        ).format(v=VERSION_TABLE),
                        [table, SCHEMA_VERSION],
                    )
        if taken_over:
            log.info(
                "took over gpuid's readings table",
                extra={"table": s.postgres_table, "target": s.target, "placements": placed},
            )

    async def _take_over(self, conn: psycopg.AsyncConnection[Any], found: dict[str, str]) -> None:
        """Migrate gpuid's table in place; a failure leaves it as it was, and is ``config``."""
        table = self.settings.postgres_table
        try:
            await take_over(conn, table, found, index_name(table, "key"))
        except psycopg.Error as exc:
            # Rows gpuid's key let through that gpufleet's does not (NULLs in
            # the key), say. Not a batch's fault: never dead-letter for it.
            raise ExporterError(
                self.name,
                f"{self.settings.target}: cannot take over gpuid's table {table}: "
                f"{first_line(exc)}",
                error_type="config",
            ) from exc

    async def _check_version(self, conn: psycopg.AsyncConnection[Any], tables: list[str]) -> None:
        """Create the version table; refuse tables a newer gpufleet has migrated."""
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (table_name text PRIMARY KEY, "
                "version integer NOT NULL, migrated_at timestamptz NOT NULL DEFAULT now())"
            ).format(VERSION_TABLE)
        )
        cur = await conn.execute(
            sql.SQL("SELECT max(version) FROM {} WHERE table_name = ANY(%s)").format(VERSION_TABLE),
            [tables],
        )
        row = await cur.fetchone()
        if row is not None and row[0] is not None and row[0] > SCHEMA_VERSION:
            raise ExporterError(
                self.name,
                f"{self.where}: schema version {row[0]} is newer than this "
                f"gpufleet's {SCHEMA_VERSION}; upgrade gpufleet",
                error_type="config",
            )

    async def _columns(self, conn: psycopg.AsyncConnection[Any], table: str) -> dict[str, str]:
        """The table's columns and their types; empty when there is no such table."""
        cur = await conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
            [sql.Identifier(table).as_string(conn)],
        )
        return {name: kind for name, kind in await cur.fetchall()}

    async def _check_columns(
        self, conn: psycopg.AsyncConnection[Any], table: str, wanted: frozenset[str]
    ) -> None:
        """Refuse a missing table, or one not ours (and not gpuid's, which is taken over)."""
        found = await self._columns(conn, table)
        if not found:
            hint = "" if self.settings.postgres_auto_migrate else " (POSTGRES_AUTO_MIGRATE=false)"
            raise ExporterError(
                self.name,
                f"{self.settings.target}: table {table} does not exist{hint}",
                error_type="config",
            )
        if is_gpuid_table(found):
            raise ExporterError(
                self.name,
                f"{self.settings.target}: table {table} is gpuid's; set "
                "POSTGRES_AUTO_MIGRATE=true to take it over, or point POSTGRES_TABLE "
                "at a new table",
                error_type="config",
            )
        missing = sorted(wanted - found.keys())
        if missing or found.get("id", "uuid") != "uuid":
            raise ExporterError(
                self.name,
                f"{self.settings.target}: table {table} exists but is not a gpufleet table "
                f"(missing {', '.join(missing) or 'nothing'}; id is {found.get('id')}); "
                "point POSTGRES_TABLE/POSTGRES_PLACEMENTS_TABLE at new tables",
                error_type="config",
            )
