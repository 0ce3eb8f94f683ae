"""The PostgreSQL exporter's tests' set-up: the shared test server, table names, readings.

`server` is the module-scoped fixture of the server that scripts/servers/postgres.sh
starts (a module that uses it imports it); `create_gpuid_table` writes a table as
gpuid left it, for the takeover and history tests.
"""

from __future__ import annotations

import shlex
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from gpufleet.inventory.exporters.postgres import PostgresExporter, PostgresSettings
from gpufleet.inventory.reading import Reading
from tests.conftest import require

__all__ = [
    "GPUID_ROWS",
    "T0",
    "Server",
    "count",
    "create_gpuid_table",
    "drop_tables",
    "fleet_batches",
    "make_settings",
    "new_tables",
    "placements",
    "reading",
    "server",
    "write_all",
]

T0 = datetime(2026, 11, 24, 0, 16, 10, 123000, tzinfo=UTC)


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    db: str
    data: str
    bin: str
    log: str

    def connect(self, db: str | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=db or self.db, autocommit=True
        )

    def pg_ctl(self, *args: str) -> None:
        command = " ".join(shlex.quote(a) for a in (f"{self.bin}/pg_ctl", "-D", self.data, *args))
        subprocess.run(["su", "postgres", "-c", command], check=True, capture_output=True)


@pytest.fixture(scope="module")
def server(test_servers: dict[str, str]) -> Server:
    host, port, user, db, data, bin_, log = require(
        test_servers,
        "GPUFLEET_TEST_PG_HOST",
        "GPUFLEET_TEST_PG_PORT",
        "GPUFLEET_TEST_PG_USER",
        "GPUFLEET_TEST_PG_DB",
        "GPUFLEET_TEST_PG_DATA",
        "GPUFLEET_TEST_PG_BIN",
        "GPUFLEET_TEST_PG_LOG",
    )
    return Server(host, int(port), user, db, data, bin_, log)


def make_settings(server: Server, tables: tuple[str, str], **overrides: Any) -> PostgresSettings:
    values: dict[str, Any] = {
        "postgres_host": server.host,
        "postgres_port": server.port,
        "postgres_db": server.db,
        "postgres_user": server.user,
        "postgres_sslmode": "disable",
        "postgres_table": tables[0],
        "postgres_placements_table": tables[1],
        "postgres_connect_timeout": 3.0,
    }
    values.update(overrides)
    return PostgresSettings(**values)


def new_tables() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:10]
    return f"readings_{suffix}", f"placements_{suffix}"


def drop_tables(server: Server, names: tuple[str, str]) -> None:
    with server.connect() as conn:
        for name in names:
            conn.execute(
                psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(name))
            )


def reading(
    gpu: str = "SN-1", machine: str = "i-a", node: str = "node-a", at: datetime = T0, index: int = 0
) -> Reading:
    return Reading(
        cluster="c1", node=node, machine=machine, source="nvml", chassis="", gpu=gpu,
        read_time=at, uuid=f"GPU-{gpu}", model="NVIDIA H100 80GB HBM3",
        pci_bus_id=f"00000000:{index % 256:02x}:00.0", index=index % 8,
    )  # fmt: skip


def fleet_batches(batches: int, size: int) -> list[list[Reading]]:
    """Sweeps over a fleet of 8-GPU nodes, cut into batches as the pipeline would."""
    gpus = 8_000
    out = []
    for b in range(batches):
        batch = []
        for i in range(b * size, (b + 1) * size):
            gpu, sweep = i % gpus, i // gpus
            node = f"node-{gpu // 8}"
            batch.append(
                reading(f"SN-{gpu}", f"i-{node}", node, T0 + timedelta(minutes=sweep), gpu)
            )
        out.append(batch)
    return out


def count(server: Server, table: str, db: str | None = None) -> int:
    with server.connect(db) as conn:
        cur = conn.execute(
            psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(table))
        )
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


def placements(server: Server, table: str) -> list[tuple[str, str, datetime, datetime]]:
    with server.connect() as conn:
        cur = conn.execute(
            psycopg.sql.SQL(
                "SELECT gpu, machine, first_seen, last_seen FROM {} ORDER BY first_seen, machine"
            ).format(psycopg.sql.Identifier(table))
        )
        return [(g, m, f.astimezone(UTC), la.astimezone(UTC)) for g, m, f, la in cur.fetchall()]


async def write_all(settings: PostgresSettings, batches: list[list[Reading]]) -> None:
    exporter = PostgresExporter(settings)
    try:
        for batch in batches:
            await exporter.write(batch)
    finally:
        await exporter.close()


# (cluster, node, machine, source, chassis, gpu, read_time) as gpuid wrote them.
GPUID_ROWS: list[tuple[str, str, str, str, str | None, str, datetime]] = [
    ("c1", "node-a", "i-a", "nvml", "", "SN-1", T0),
    ("c1", "node-a", "i-a", "nvml", "", "SN-1", T0 + timedelta(hours=1)),
    ("c1", "node-a", "i-a", "nvml", None, "SN-2", T0),
    ("c1", "node-b", "i-b", "nvidia-smi", "CH-9", "SN-3", T0 + timedelta(minutes=5)),
]


def create_gpuid_table(server: Server, table: str, read_time_type: str = "TIMESTAMPTZ") -> None:
    """gpuid's DDL (its four indexes included), then its rows, inserted as gpuid inserts them."""
    t = sql.Identifier(table)
    with server.connect() as conn:
        conn.execute(
            sql.SQL(
                """CREATE TABLE {t} (
                    id BIGSERIAL PRIMARY KEY,
                    cluster VARCHAR(255) NOT NULL,
                    node VARCHAR(255) NOT NULL,
                    machine VARCHAR(255) NOT NULL,
                    source VARCHAR(255) NOT NULL,
                    chassis VARCHAR(255),
                    gpu VARCHAR(255) NOT NULL,
                    read_time {kind} NOT NULL,
                    created_at {kind} NOT NULL DEFAULT CURRENT_TIMESTAMP,
                    UNIQUE (cluster, node, machine, source, chassis, gpu, read_time)
                )"""
            ).format(t=t, kind=sql.SQL(read_time_type))
        )
        for column in ("cluster", "node", "read_time", "created_at"):
            conn.execute(
                sql.SQL("CREATE INDEX {} ON {} ({})").format(
                    sql.Identifier(f"idx_{table}_{column}"), t, sql.Identifier(column)
                )
            )
        for row in GPUID_ROWS:
            at = row[6] if read_time_type == "TIMESTAMPTZ" else row[6].replace(tzinfo=None)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (cluster, node, machine, source, chassis, gpu, read_time) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                ).format(t),
                [*row[:6], at],
            )
