"""Outage with no loss: PostgreSQL stops, the writer is SIGKILLed, nothing accepted is lost."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import require

FEEDER = Path(__file__).with_name("feeder.py")


def pg_ctl(servers: dict[str, str], action: str) -> None:
    pg_bin, data = require(servers, "GPUFLEET_TEST_PG_BIN", "GPUFLEET_TEST_PG_DATA")
    extra = "-m fast" if action == "stop" else "-w"
    subprocess.run(
        ["su", "postgres", "-c", f"{pg_bin}/pg_ctl -D {data} {action} {extra} -l {data}/log"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def env(test_servers: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    host, port, user, db = require(
        test_servers,
        "GPUFLEET_TEST_PG_HOST",
        "GPUFLEET_TEST_PG_PORT",
        "GPUFLEET_TEST_PG_USER",
        "GPUFLEET_TEST_PG_DB",
    )
    table = f"outage_{os.getpid()}"
    yield {
        **os.environ,
        "CLUSTER_NAME": "outage", "EXPORTER_TYPE": "postgres", "SPOOL_DIR": str(tmp_path),
        "POSTGRES_HOST": host, "POSTGRES_PORT": port, "POSTGRES_USER": user,
        "POSTGRES_DB": db, "POSTGRES_SSLMODE": "disable", "POSTGRES_TABLE": table,
        "POSTGRES_PLACEMENTS_TABLE": f"{table}_placements", "POSTGRES_CONNECT_TIMEOUT": "1s",
        "BATCH_SIZE": "20", "FLUSH_INTERVAL": "0.1s", "RETRY_MAX_BACKOFF": "0.5s",
        "DELIVERY_TIMEOUT": "60s",
    }  # fmt: skip
    # Whatever happens in the test, the shared server is left running.
    pg_bin, data = test_servers["GPUFLEET_TEST_PG_BIN"], test_servers["GPUFLEET_TEST_PG_DATA"]
    if subprocess.run(
        ["su", "postgres", "-c", f"{pg_bin}/pg_ctl -D {data} status"], capture_output=True
    ).returncode:
        pg_ctl(test_servers, "start")  # fmt: skip


def read_accepted(proc: subprocess.Popen[str], want: int, limit_s: float = 60) -> list[str]:
    """Read ``accepted`` lines until ``want`` of them came, or the limit."""
    assert proc.stdout is not None
    accepted: list[str] = []
    deadline = time.monotonic() + limit_s
    while len(accepted) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            accepted.append(line.split()[1])
    return accepted


def test_every_reading_accepted_before_a_sigkill_during_an_outage_lands_exactly_once(
    env: dict[str, str], test_servers: dict[str, str]
) -> None:
    feeder = subprocess.Popen(
        [sys.executable, str(FEEDER), "0", "100000"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        accepted = read_accepted(feeder, 150)
        pg_ctl(test_servers, "stop")
        accepted += read_accepted(feeder, 150)  # accepted while the database is down
        feeder.kill()  # SIGKILL: no drain, no goodbye
        feeder.wait(timeout=30)
        accepted += [line.split()[1] for line in feeder.stdout or [] if line.strip()]
    finally:
        if feeder.poll() is None:
            feeder.kill()
        pg_ctl(test_servers, "start")
    assert len(accepted) >= 300
    # A fresh process with the same SPOOL_DIR delivers what the dead one left.
    replay = subprocess.run(
        [sys.executable, str(FEEDER), "9000000", "1"], env=env, text=True,
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr[-2000:]
    with psycopg.connect(
        host=env["POSTGRES_HOST"], port=int(env["POSTGRES_PORT"]), user=env["POSTGRES_USER"],
        dbname=env["POSTGRES_DB"],
    ) as conn:  # fmt: skip
        rows = conn.execute(
            f'SELECT gpu, COUNT(*) FROM "{env["POSTGRES_TABLE"]}" GROUP BY gpu'
        ).fetchall()
    counts = dict(rows)
    assert [gpu for gpu in accepted if counts.get(gpu) != 1] == []
