"""Taking over gpuid's own readings table, in place, so history goes on across the switch.

gpuid and gpufleet both default ``POSTGRES_TABLE`` to ``gpu``. gpuid's table has
a ``BIGSERIAL`` id and a UNIQUE key over its seven reading columns, and none of
the columns gpufleet adds (``uuid``, ``model``, ``pci_bus_id``, ``gpu_index``).
The migration turns it into a version-1 gpufleet table without losing a row:

- the added columns get what gpuid did not know: empty text and index 0;
- ``id`` becomes the ``uuid`` gpufleet would have computed for the reading
  (the first 128 bits of the SHA-256 of the identifying fields, ``uuid`` empty),
  computed by the server in the same rewrite;
- gpuid's primary key and UNIQUE key are dropped for gpufleet's ``UNIQUE (id)``
  (the seven-column key would refuse the second die of a GB200 board, which
  shares its board serial), and the id's sequence is dropped;
- the placements table is filled from the migrated readings, so ``inventory
  history`` shows where gpuid saw each GPU.

It all runs in the exporter's schema transaction, under its advisory lock: two
gpufleet processes starting together migrate once, the second finds a gpufleet
table, and a failure leaves gpuid's table as it was.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

__all__ = ["GPUID_COLUMNS", "backfill_placements", "is_gpuid_table", "take_over"]

GPUID_COLUMNS = frozenset(
    {"id", "cluster", "node", "machine", "source", "chassis", "gpu", "read_time", "created_at"}
)
"""The columns of gpuid's readings table."""

_GPUID_TEXT = ("cluster", "node", "machine", "source", "chassis", "gpu")
_INTEGER_IDS = {"bigint", "integer", "smallint"}


def is_gpuid_table(found: dict[str, str]) -> bool:
    """Whether a table's columns (name → type) are gpuid's, not yet migrated."""
    return (
        found.keys() >= GPUID_COLUMNS
        and found["id"] in _INTEGER_IDS
        and "uuid" not in found
        and found["read_time"].startswith("timestamp")
    )


def _utc(column: str, kind: str) -> sql.Composable:
    """The column as a ``timestamptz``; gpuid's zone-less times are taken as UTC."""
    if kind.startswith("timestamp with time zone"):
        return sql.Identifier(column)
    return sql.SQL("({} AT TIME ZONE 'UTC')").format(sql.Identifier(column))


def _id_expression(read_time: sql.Composable) -> sql.Composable:
    """``Reading.id`` in SQL, as a uuid: the identity text of ``reading.py``, hashed.

    Each identifying field followed by a unit separator (U+001F), ``uuid``
    empty, ``read_time`` in ``format_time``'s form (UTC, milliseconds truncated,
    ``Z``); then the first 16 bytes of the SHA-256.
    """
    fields: list[sql.Composable] = [
        sql.SQL("coalesce({}::text, '')").format(sql.Identifier(c)) for c in _GPUID_TEXT
    ]
    fields.append(sql.SQL("''"))  # uuid: gpuid did not record it
    fields.append(
        sql.SQL("""to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')""").format(
            read_time
        )
    )
    text = sql.SQL(" || chr(31) || ").join(fields) + sql.SQL(" || chr(31)")
    return sql.SQL(
        "encode(substring(sha256(convert_to({}, 'UTF8')) FROM 1 FOR 16), 'hex')::uuid"
    ).format(text)


async def take_over(
    conn: psycopg.AsyncConnection[Any], table: str, found: dict[str, str], key: sql.Identifier
) -> None:
    """Migrate gpuid's table ``table`` (columns ``found``) in place, in the caller's transaction.

    ``key`` is the name of gpufleet's ``UNIQUE (id)`` constraint. The caller
    holds the migration lock and has checked ``is_gpuid_table(found)``.
    """
    t = sql.Identifier(table)
    cur = await conn.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) "
        "AND contype IN ('p', 'u') ORDER BY conname",
        [t.as_string(conn)],
    )
    for (name,) in await cur.fetchall():
        await conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(t, sql.Identifier(name))
        )
    cur = await conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass(pg_get_serial_sequence(%s, 'id'))",
        [t.as_string(conn)],
    )
    sequence = await cur.fetchone()
    read_time = _utc("read_time", found["read_time"])
    alters: list[sql.Composable] = [
        sql.SQL("ALTER COLUMN id DROP DEFAULT"),
        sql.SQL("ALTER COLUMN id TYPE uuid USING {}").format(_id_expression(read_time)),
        sql.SQL("ALTER COLUMN read_time TYPE timestamptz USING {}").format(read_time),
        sql.SQL("ALTER COLUMN created_at TYPE timestamptz USING coalesce({}, now())").format(
            _utc("created_at", found["created_at"])
        ),
        sql.SQL("ALTER COLUMN created_at SET DEFAULT now()"),
    ]
    for column in _GPUID_TEXT:
        alters.append(
            sql.SQL("""ALTER COLUMN {c} TYPE text COLLATE "C" USING coalesce({c}::text, '')""")
            .format(c=sql.Identifier(column))
        )  # fmt: skip
    alters.append(sql.SQL("ALTER COLUMN chassis SET DEFAULT ''"))
    for column in ("uuid", "model", "pci_bus_id"):
        alters.append(
            sql.SQL("""ADD COLUMN {} text COLLATE "C" NOT NULL DEFAULT ''""").format(
                sql.Identifier(column)
            )
        )
    alters.append(sql.SQL("ADD COLUMN gpu_index integer NOT NULL DEFAULT 0"))
    # One statement, so the table is rewritten once.
    await conn.execute(sql.SQL("ALTER TABLE {} ").format(t) + sql.SQL(", ").join(alters))
    for column in ("id", "read_time", *_GPUID_TEXT):
        await conn.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(t, sql.Identifier(column))
        )
    await conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE (id)").format(t, key))
    if sequence is not None:
        await conn.execute(sql.SQL("DROP SEQUENCE IF EXISTS {}").format(sql.Identifier(*sequence)))


async def backfill_placements(
    conn: psycopg.AsyncConnection[Any], readings: str, placements: str
) -> int:
    """Fold every stored reading into the placements table; the placements written."""
    cur = await conn.execute(
        sql.SQL(
            """INSERT INTO {p} AS p (cluster, gpu, uuid, machine, node, first_seen, last_seen)
            SELECT cluster, gpu, uuid, machine, node, min(read_time), max(read_time) FROM {r}
            GROUP BY cluster, gpu, uuid, machine, node
            ORDER BY cluster, gpu, uuid, machine, node
            ON CONFLICT (cluster, gpu, uuid, machine, node) DO UPDATE SET
                first_seen = LEAST(p.first_seen, EXCLUDED.first_seen),
                last_seen = GREATEST(p.last_seen, EXCLUDED.last_seen)"""
        ).format(p=sql.Identifier(placements), r=sql.Identifier(readings))
    )
    return cur.rowcount
