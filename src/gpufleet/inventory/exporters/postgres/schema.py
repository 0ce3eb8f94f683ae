"""The tables (schema version 1) and the statements that write a batch into them.

``readings`` is unique on ``id``: the first 128 bits of ``Reading.id``, the
SHA-256 of the identifying fields (``reading.IDENTITY_FIELDS``), stored as a
``uuid``. Two readings have the same ``id`` exactly when they are the same
observation, so ``UNIQUE (id)`` means what the 8-column key of the SQLite store
means, at a sixteenth of the index width.
"""

from __future__ import annotations

import hashlib

from psycopg import adapters, pq, sql
from psycopg.adapt import Dumper

from gpufleet.inventory.reading import Reading

__all__ = [
    "BATCH_TABLE",
    "COLUMNS",
    "COPY_TYPES",
    "PLACEMENT_COLUMNS",
    "SCHEMA_VERSION",
    "VERSION_TABLE",
    "KeyDumper",
    "WriteStatements",
    "batch_row",
    "index_name",
    "schema_statements",
]

SCHEMA_VERSION = 1
"""Version of the tables this module writes; recorded in ``gpufleet_schema_version``."""

VERSION_TABLE = sql.Identifier("gpufleet_schema_version")
BATCH_TABLE = sql.Identifier("gpufleet_batch")

# The temporary table's columns, in COPY order, with their binary COPY types.
_BATCH_COLUMNS = (
    ("id", "uuid"),
    ("cluster", "text"),
    ("node", "text"),
    ("machine", "text"),
    ("source", "text"),
    ("chassis", "text"),
    ("gpu", "text"),
    ("uuid", "text"),
    ("read_time", "timestamptz"),
    ("model", "text"),
    ("pci_bus_id", "text"),
    ("gpu_index", "int4"),
)
COLUMNS = [name for name, _ in _BATCH_COLUMNS]
COPY_TYPES = [kind for _, kind in _BATCH_COLUMNS]
_PLACEMENT_KEY = ("cluster", "gpu", "uuid", "machine", "node")
PLACEMENT_COLUMNS = frozenset({*_PLACEMENT_KEY, "first_seen", "last_seen"})


def batch_row(r: Reading) -> tuple[object, ...]:
    """One reading as a row of the temporary table, in ``COLUMNS`` order.

    The id goes over the wire as the 16 raw bytes of the uuid (see ``KeyDumper``):
    ``bytes.fromhex`` is several times cheaper than building a ``uuid.UUID``.
    """
    return (bytes.fromhex(r.id[:32]), r.cluster, r.node, r.machine, r.source, r.chassis,
            r.gpu, r.uuid, r.read_time, r.model, r.pci_bus_id, r.index)  # fmt: skip


class KeyDumper(Dumper):
    """Binary COPY of a ``uuid`` column from its 16 raw bytes.

    Registered by oid only (``register_dumper(None, KeyDumper)``), so it is used
    where ``Copy.set_types`` names ``uuid``, and never for a ``uuid.UUID`` or a
    ``bytes`` passed as a query parameter.
    """

    format = pq.Format.BINARY
    oid = adapters.types["uuid"].oid

    def dump(self, obj: bytes) -> bytes:
        return obj  # the server refuses anything but 16 bytes


def index_name(table: str, suffix: str) -> sql.Identifier:
    """gpuid's ``idx_<table>_<suffix>``, shortened with a hash where it would pass 63 bytes.

    PostgreSQL truncates long names silently, which would give two indexes of
    one long table the same name and make the second IF NOT EXISTS a no-op.
    """
    name = f"idx_{table}_{suffix}"
    if len(name) > 63:
        digest = hashlib.sha256(table.encode()).hexdigest()[:8]
        name = f"idx_{table[: 63 - len(suffix) - 14]}_{digest}_{suffix}"
    return sql.Identifier(name)


def schema_statements(
    readings: str, placements: str
) -> tuple[list[sql.Composed], list[sql.Composed]]:
    """The idempotent DDL of schema version 1: (tables, indexes)."""
    r, p = sql.Identifier(readings), sql.Identifier(placements)
    tables = [
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {r} (
                id          uuid NOT NULL,
                cluster     text COLLATE "C" NOT NULL,
                node        text COLLATE "C" NOT NULL,
                machine     text COLLATE "C" NOT NULL,
                source      text COLLATE "C" NOT NULL,
                chassis     text COLLATE "C" NOT NULL DEFAULT '',
                gpu         text COLLATE "C" NOT NULL,
                uuid        text COLLATE "C" NOT NULL,
                read_time   timestamptz NOT NULL,
                model       text COLLATE "C" NOT NULL,
                pci_bus_id  text COLLATE "C" NOT NULL,
                gpu_index   integer NOT NULL,
                created_at  timestamptz NOT NULL DEFAULT now(),
                CONSTRAINT {key} UNIQUE (id)
            )"""
        ).format(r=r, key=index_name(readings, "key")),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {p} (
                gpu         text COLLATE "C" NOT NULL,
                uuid        text COLLATE "C" NOT NULL,
                machine     text COLLATE "C" NOT NULL,
                node        text COLLATE "C" NOT NULL,
                cluster     text COLLATE "C" NOT NULL,
                first_seen  timestamptz NOT NULL,
                last_seen   timestamptz NOT NULL,
                CONSTRAINT {key} PRIMARY KEY (cluster, gpu, uuid, machine, node)
            ) WITH (fillfactor = 70)"""
        ).format(p=p, key=index_name(placements, "pkey")),
    ]
    # gpuid's four indexes on the readings. Where a GPU or a machine has been is
    # the placements table's question. Its key leads with cluster, so `history
    # --gpu` (which names no cluster) has an index of its own; it is only
    # touched when a GPU turns up somewhere new, as placement updates are HOT.
    # The time indexes are BRIN: readings arrive in time order (see
    # docs/postgres-exporter.md).
    indexes = [
        (readings, r, "cluster", "(cluster)"),
        (readings, r, "node", "(node)"),
        (readings, r, "read_time", "USING brin (read_time)"),
        (readings, r, "created_at", "USING brin (created_at)"),
        (placements, p, "gpu", "(gpu)"),
        (placements, p, "machine", "(machine)"),
        (placements, p, "node", "(node)"),
        (placements, p, "uuid", "(uuid)"),
    ]
    return tables, [
        sql.SQL("CREATE INDEX IF NOT EXISTS {name} ON {table} {spec}").format(
            name=index_name(table, suffix), table=ident, spec=sql.SQL(spec)
        )
        for table, ident, suffix, spec in indexes
    ]


class WriteStatements:
    """The statements of one batch, composed and rendered once per exporter.

    They are kept as bytes: psycopg would otherwise render a ``Composed``
    again on every execution, which costs more than a microsecond per reading.
    The names in them are validated plain identifiers, so rendering them
    without a connection (no client encoding to honour) is exact.
    """

    def __init__(self, readings: str, placements: str) -> None:
        batch_columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(
                sql.Identifier(name), sql.SQL('text COLLATE "C"' if kind == "text" else kind)
            )
            for name, kind in _BATCH_COLUMNS
        )
        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        key = sql.SQL(", ").join(map(sql.Identifier, _PLACEMENT_KEY))
        # One temporary table per session, emptied at every commit; created when
        # the pool opens a connection, not per batch.
        create_batch = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {batch} ({columns}) ON COMMIT DELETE ROWS"
        ).format(batch=BATCH_TABLE, columns=batch_columns)
        copy = sql.SQL("COPY {batch} ({columns}) FROM STDIN (FORMAT BINARY)").format(
            batch=BATCH_TABLE, columns=columns
        )
        # Rows go in one fixed order so two writers replaying overlapping batches
        # wait on each other's rows in the same order and cannot deadlock.
        # insert_new is the usual statement and fails on a reading stored
        # already; insert then skips those.
        insert_new = sql.SQL(
            "INSERT INTO {r} ({columns}) SELECT {columns} FROM {batch} ORDER BY id"
        ).format(r=sql.Identifier(readings), columns=columns, batch=BATCH_TABLE)
        insert = sql.SQL("{} ON CONFLICT (id) DO NOTHING").format(insert_new)
        # ON CONFLICT DO UPDATE may touch a row once per statement, so a batch
        # that holds one placement twice is first folded to one row per
        # placement; upsert_distinct is for the usual batch, with no such pair.
        # The WHERE skips no-op updates, so a replay leaves no dead tuples.
        conflict = sql.SQL(
            """ON CONFLICT ({key}) DO UPDATE SET
                first_seen = LEAST(p.first_seen, EXCLUDED.first_seen),
                last_seen = GREATEST(p.last_seen, EXCLUDED.last_seen)
            WHERE EXCLUDED.first_seen < p.first_seen OR EXCLUDED.last_seen > p.last_seen"""
        ).format(key=key)
        upsert = sql.SQL(
            """INSERT INTO {p} AS p ({key}, first_seen, last_seen)
            SELECT {key}, min(read_time), max(read_time) FROM {batch}
            GROUP BY {key} ORDER BY {key} {conflict}"""
        ).format(p=sql.Identifier(placements), key=key, batch=BATCH_TABLE, conflict=conflict)
        upsert_distinct = sql.SQL(
            """INSERT INTO {p} AS p ({key}, first_seen, last_seen)
            SELECT {key}, read_time, read_time FROM {batch} ORDER BY {key} {conflict}"""
        ).format(p=sql.Identifier(placements), key=key, batch=BATCH_TABLE, conflict=conflict)
        probe = sql.SQL("SELECT 1 FROM {} LIMIT 1").format(sql.Identifier(readings))
        self.create_batch = create_batch.as_bytes(None)
        self.copy = copy.as_bytes(None)
        self.insert_new = insert_new.as_bytes(None)
        self.insert = insert.as_bytes(None)
        self.upsert = upsert.as_bytes(None)
        self.upsert_distinct = upsert_distinct.as_bytes(None)
        self.probe = probe.as_bytes(None)
