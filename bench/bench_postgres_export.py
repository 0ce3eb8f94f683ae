"""How fast does the PostgreSQL exporter write? Batched COPY vs one INSERT per reading.

gpufleet writes a 500-reading batch as one transaction: COPY into a temporary
table, one INSERT … SELECT into the readings, one upsert of the placements,
COMMIT. When batches wait (a replay after an outage), the delivery pipeline has
up to ``POSTGRES_BATCHES_IN_FLIGHT`` (4) of them on the way; they overlap
their work but commit one after the other, oldest first. The peers are what
straightforward code does (gpuid's first exporter did the first): one INSERT
per reading, each committed on its own; and the same with the reading's
placement upserted in its transaction, which leaves the tables as the
exporter does. All write to tables with the same columns and indexes, on the
same server, in the same run. The naive writers run on fewer readings (they
are that slow); the figures are per-reading rates.

The data is what a controller produces: a fleet of 8,000 GPUs (1,000 nodes of
8) scanned every 5 minutes, so every batch holds 500 different GPUs and moves
500 placements, and the readings outnumber the placements 12 to 1 by the end.
Each writer gets fresh tables per round. Before its clock starts, the exporter
writes warm-up batches, so connecting, migrating and preparing statements are
not measured; the naive writers connect before their clock starts too. The
exporter is fed as the delivery pipeline feeds it: up to ``max_in_flight``
batches, oldest first, the next started when the oldest returns. Further lines
show one batch at a time (whole, and split in two transactions on two
connections), and the real ``DeliveryPipeline`` draining the readings from its
spool, which adds reading and decoding each batch. The figures are the median
of ``--rounds`` rounds (3 by default), since a shared VM varies from run to run.

The server is the one ``scripts/test-servers.sh start`` left in
``.testservers/env``, or else a throwaway one this script starts with
``scripts/servers/postgres.sh`` and stops at the end. Its configuration is left
as it is: fsync, synchronous_commit and full_page_writes at their defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from prometheus_client import CollectorRegistry
from psycopg import sql

from gpufleet.inventory.delivery import DeliveryConfig, DeliveryPipeline
from gpufleet.inventory.exporters.postgres import PostgresExporter, PostgresSettings
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.testservers import read_facts

ROOT = Path(__file__).resolve().parent.parent
READINGS = 100_000
BATCH = 500
NAIVE_READINGS = 2_000
WARMUP_BATCHES = 4  # per lane
NODES, GPUS_PER_NODE = 1_000, 8
T0 = datetime(2026, 11, 24, tzinfo=UTC)


def fleet_readings(count: int, sweep_offset: int = 0) -> list[Reading]:
    """Sweeps over a fleet of 8-GPU nodes, in the order a controller reads them."""
    fleet = NODES * GPUS_PER_NODE
    out = []
    for i in range(count):
        gpu, sweep = i % fleet, i // fleet + sweep_offset
        node = f"node-{gpu // GPUS_PER_NODE:04d}"
        out.append(
            Reading(
                cluster="bench", node=node, machine=f"i-{gpu // GPUS_PER_NODE:017x}",
                source="exec", chassis="", gpu=f"1654922{gpu:06d}",
                read_time=T0 + timedelta(minutes=5 * sweep), uuid=f"GPU-{uuid.UUID(int=gpu)}",
                model="NVIDIA H100 80GB HBM3", pci_bus_id=f"00000000:{gpu % 8 + 0x18:02X}:00.0",
                index=gpu % GPUS_PER_NODE,
            )
        )  # fmt: skip
    return out


def reachable(env: dict[str, str]) -> bool:
    try:
        with psycopg.connect(
            host=env["GPUFLEET_TEST_PG_HOST"],
            port=env["GPUFLEET_TEST_PG_PORT"],
            user=env["GPUFLEET_TEST_PG_USER"],
            dbname=env["GPUFLEET_TEST_PG_DB"],
            connect_timeout=3,
        ):
            return True
    except (KeyError, psycopg.Error):
        return False


@contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """The test servers' PostgreSQL if it runs, else a throwaway one for this run."""
    env = read_facts()
    if reachable(env):
        yield env
        return
    script = ROOT / "scripts" / "servers" / "postgres.sh"
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as state:
        Path(state, "env").touch()
        subprocess.run(["bash", str(script), "start", state], check=True, stdout=subprocess.DEVNULL)
        try:
            yield read_facts(Path(state, "env"))
        finally:
            subprocess.run(["bash", str(script), "stop", state], check=False)


def settings(env: dict[str, str], suffix: str) -> PostgresSettings:
    return PostgresSettings(
        postgres_host=env["GPUFLEET_TEST_PG_HOST"],
        postgres_port=int(env["GPUFLEET_TEST_PG_PORT"]),
        postgres_db=env["GPUFLEET_TEST_PG_DB"],
        postgres_user=env["GPUFLEET_TEST_PG_USER"],
        postgres_sslmode="disable",
        postgres_table=f"bench_readings_{suffix}",
        postgres_placements_table=f"bench_placements_{suffix}",
    )


async def gpufleet_rate(config: PostgresSettings, readings: list[Reading]) -> float:
    """Readings per second through PostgresExporter, fed as the delivery pipeline feeds it.

    Up to ``exporter.max_in_flight`` batches are in flight, started oldest
    first; the next one starts when the oldest has returned (a sliding window
    over the head, like ``DeliveryPipeline``).
    """
    batches = [readings[i : i + BATCH] for i in range(0, len(readings), BATCH)]
    # An earlier sweep: the measured batches still move every placement's last_seen.
    warmup = fleet_readings(WARMUP_BATCHES * BATCH, sweep_offset=-1_000)
    exporter = PostgresExporter(config)
    try:
        # Not measured: connecting the pool's connections, migrating, preparing.
        await exporter.open()
        await write_all(exporter, [warmup[i : i + BATCH] for i in range(0, len(warmup), BATCH)])
        start = time.perf_counter()
        await write_all(exporter, batches)
        return len(readings) / (time.perf_counter() - start)
    finally:
        await exporter.close()


async def write_all(exporter: PostgresExporter, batches: list[list[Reading]]) -> None:
    window: deque[asyncio.Task[None]] = deque()
    pending = iter(batches)
    while True:
        for batch in pending:
            window.append(asyncio.create_task(exporter.write(batch)))
            if len(window) >= exporter.max_in_flight:
                break
        if not window:
            return
        await window.popleft()


async def pipeline_rate(config: PostgresSettings, readings: list[Reading]) -> float:
    """Readings per second drained from a spool by the real DeliveryPipeline.

    The readings are accepted (written to the spool and sealed into batches)
    before the clock starts; the figure is the replay after an outage: read a
    batch from the spool, decode it, write it, ack it.
    """
    warmup = fleet_readings(WARMUP_BATCHES * BATCH, sweep_offset=-1_000)
    exporter = PostgresExporter(config)
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-spool-") as tmp:
        spool = Spool(Path(tmp, "bench.spool"), max_bytes=1 << 34)
        delivery = DeliveryPipeline(
            exporter, spool, cluster="bench", metrics=ExportMetrics(CollectorRegistry()),
            config=DeliveryConfig(batch_size=BATCH),
        )  # fmt: skip
        try:
            await exporter.open()
            await delivery.submit(warmup)
            if not await delivery.drain(within=60):
                raise RuntimeError("warm-up batches were not delivered")
            await delivery.submit(readings)
            spool.seal(BATCH)
            start = time.perf_counter()
            if not await delivery.drain(within=600):
                raise RuntimeError("the pipeline did not drain the spool")
            return len(readings) / (time.perf_counter() - start)
        finally:
            await exporter.close()
            spool.close()


def naive_rate(config: PostgresSettings, readings: list[Reading], *, placements: bool) -> float:
    """Readings per second, one INSERT per reading, each committed on its own.

    With ``placements`` the reading's placement is upserted in the same
    transaction, so the naive writer leaves the tables as the exporter does.
    """
    insert = sql.SQL(
        "INSERT INTO {} (id, cluster, node, machine, source, chassis, gpu, uuid, read_time, "
        "model, pci_bus_id, gpu_index) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (id) DO NOTHING"
    ).format(sql.Identifier(config.postgres_table))
    upsert = sql.SQL(
        "INSERT INTO {} AS p (cluster, gpu, uuid, machine, node, first_seen, last_seen) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (cluster, gpu, uuid, machine, node) "
        "DO UPDATE SET first_seen = LEAST(p.first_seen, EXCLUDED.first_seen), "
        "last_seen = GREATEST(p.last_seen, EXCLUDED.last_seen)"
    ).format(sql.Identifier(config.postgres_placements_table))
    with psycopg.connect(**config.connection_kwargs(), autocommit=True) as conn:
        start = time.perf_counter()
        for r in readings:
            row = (uuid.UUID(hex=r.id[:32]), r.cluster, r.node, r.machine, r.source, r.chassis,
                   r.gpu, r.uuid, r.read_time, r.model, r.pci_bus_id, r.index)  # fmt: skip
            if not placements:
                conn.execute(insert, row)
                continue
            with conn.transaction():
                conn.execute(insert, row)
                conn.execute(upsert, (r.cluster, r.gpu, r.uuid, r.machine, r.node,
                                      r.read_time, r.read_time))  # fmt: skip
        return len(readings) / (time.perf_counter() - start)


def drop(config: PostgresSettings) -> None:
    with psycopg.connect(**config.connection_kwargs(), autocommit=True) as conn:
        for table in (config.postgres_table, config.postgres_placements_table):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            conn.execute("DELETE FROM gpufleet_schema_version WHERE table_name = %s", [table])


WRITERS = {
    "ours": "gpufleet PostgresExporter (defaults: 4 in flight)",
    "one_batch": "  one batch at a time (POSTGRES_BATCHES_IN_FLIGHT=1)",
    "split": "  same, split in two (POSTGRES_WRITE_PARALLELISM=2)",
    "pipeline": "  defaults, drained from the spool by DeliveryPipeline",
    "naive_same": "naive, same work: INSERT + placement upsert, commit",
    "naive": "naive, readings only: autocommitted INSERT",
}


def one_round(env: dict[str, str], readings: list[Reading]) -> dict[str, float]:
    """Readings/s of every writer, each on fresh tables."""
    runs = {name: settings(env, name) for name in WRITERS}
    runs["one_batch"] = runs["one_batch"].model_copy(update={"postgres_batches_in_flight": 1})
    runs["split"] = runs["split"].model_copy(
        update={"postgres_batches_in_flight": 1, "postgres_write_parallelism": 2}
    )
    try:
        rates = {
            name: asyncio.run(gpufleet_rate(runs[name], readings))
            for name in ("ours", "one_batch", "split")
        }
        rates["pipeline"] = asyncio.run(pipeline_rate(runs["pipeline"], readings))
        for name, with_placements in (("naive_same", True), ("naive", False)):
            # The naive writers get the same tables (columns, indexes), already warm.
            asyncio.run(gpufleet_rate(runs[name], []))
            rates[name] = naive_rate(
                runs[name],
                fleet_readings(NAIVE_READINGS, sweep_offset=100),
                placements=with_placements,
            )
    finally:
        for config in runs.values():
            drop(config)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    rounds = parser.parse_args().rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    readings = fleet_readings(READINGS)
    results: list[dict[str, float]] = []
    with postgres_server() as env:
        for n in range(rounds):
            results.append(one_round(env, readings))
            print(f"round {n + 1}: " + " / ".join(f"{k} {v:,.0f}" for k, v in results[-1].items()))
    median = {name: statistics.median(r[name] for r in results) for name in WRITERS}
    print(
        f"{'writer (median of ' + str(rounds) + ' rounds)':<54} {'readings':>9} {'readings/s':>11}"
    )
    for name, label in WRITERS.items():
        count = NAIVE_READINGS if name.startswith("naive") else READINGS
        print(f"{label:<54} {count:>9} {median[name]:>11,.0f}")
    ours = median["ours"]
    print(
        f"gpufleet {ours:,.0f} readings/s (target >= 50,000); "
        f"ratio {ours / median['naive_same']:.1f}x the same-work naive writer, "
        f"{ours / median['naive']:.1f}x the readings-only one (target >= 20x)"
    )


if __name__ == "__main__":
    main()
