"""The spool keeps every reading through a seal racing a submit, a failed insert and a kill."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gpufleet.core.retry import Backoff
from gpufleet.inventory.delivery import DeliveryConfig, DeliveryPipeline
from gpufleet.inventory.errors import PermanentExporterError
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import FullPolicy, Spool, SpoolError
from tests.polling import eventually
from tests.unit.delivery_support import RecordingExporter, readings

FAST = Backoff(initial=0.001, factor=2.0, cap=0.005, jitter=0.0)
SRC = Path(__file__).resolve().parents[2] / "src"


# --- a submit() that lands while seal() runs in its thread (item 12) --------------------


async def test_a_submit_landing_while_seal_runs_is_sealed_in_the_same_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = RecordingExporter()
    spool = Spool(tmp_path / "rec.spool", max_bytes=10_000_000)
    pipe = DeliveryPipeline(
        exporter, spool, cluster="c", metrics=ExportMetrics(CollectorRegistry()),
        config=DeliveryConfig(batch_size=500, flush_interval=0.02, backoff=FAST),
    )  # fmt: skip
    real_seal = spool.seal
    sealed, landed = threading.Event(), threading.Event()

    def seal(batch_size: int) -> int:
        made = real_seal(batch_size)
        if not sealed.is_set():
            # The first seal is done in SQLite but its thread has not returned.
            sealed.set()
            landed.wait(10)
        return made

    monkeypatch.setattr(spool, "seal", seal)
    run = asyncio.create_task(pipe.run())
    try:
        await pipe.submit(readings(3))
        assert await asyncio.to_thread(sealed.wait, 10)
        await pipe.submit(readings(2, start=3))  # lands while that seal's thread still runs
        landed.set()
        await eventually(lambda: len(exporter.delivered) == 5, limit=10)
    finally:
        landed.set()
        pipe.stop()
        await asyncio.wait_for(run, 10)
        spool.close()
    assert exporter.delivered == [r.gpu for r in readings(5)]


# --- drop-oldest: the deletes and the insert that needed the room are one transaction ---


def _forbid_insert_of(spool_path: Path, gpu: str) -> None:
    """Make every insert of ``gpu``'s reading fail, as a full disk would (another connection)."""
    conn = sqlite3.connect(spool_path)
    conn.execute(
        "CREATE TRIGGER full_disk BEFORE INSERT ON pending"
        f" WHEN NEW.body LIKE '%{gpu}%' BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    conn.commit()
    conn.close()


def test_a_failing_insert_under_drop_oldest_loses_no_reading(tmp_path: Path) -> None:
    path = tmp_path / "rec.spool"
    spool = Spool(path, max_bytes=64 * 1024, full_policy=FullPolicy.DROP_OLDEST)
    kept = readings(100)
    spool.append(kept)
    spool.seal(10)
    before = spool.stats()
    _forbid_insert_of(path, "S999999")
    big = [
        Reading(
            cluster="c", node="n", machine="m", source="nvml", chassis="", gpu="S999999",
            read_time=datetime(2026, 11, 24, tzinfo=UTC) + timedelta(seconds=1),
            uuid="GPU-big", model="x" * 50_000, pci_bus_id="00000000:01:00.0", index=0,
        )
    ]  # fmt: skip
    with pytest.raises((SpoolError, sqlite3.Error)) as caught:
        spool.append(big)  # would drop the oldest batches to make room, then fail
    after = spool.stats()
    spool.close()
    reopened = Spool(path, max_bytes=64 * 1024, full_policy=FullPolicy.DROP_OLDEST)
    try:
        assert (after, reopened.stats()) == (before, before)
        assert reopened.oldest() is not None
        assert reopened.oldest().readings == tuple(kept[:10])  # type: ignore[union-attr]
    finally:
        reopened.close()
    assert isinstance(caught.value, SpoolError)  # one line naming the spool, no traceback
    assert "disk is full" in str(caught.value)


# --- SIGKILL between the dead-letter fsync and the spool delete (item 13) ---------------

_KILLED_AFTER_FSYNC = """
import os, signal, sys
from pathlib import Path
from gpufleet.inventory.spool import Spool
from tests.unit.delivery_support import readings

spool = Spool(Path(sys.argv[1]), max_bytes=10_000_000)
spool.append(readings(3))
spool.seal(500)
batch = spool.oldest()
# The dead-letter record is appended and fsync'd; the process dies before the delete.
spool._delete = lambda seq: os.kill(os.getpid(), signal.SIGKILL)
spool.dead_letter(batch, "HTTP 400: field read_time: invalid", "rec")
"""


def _dead_letter_then_sigkill(spool: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(SRC.parent)])}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_FSYNC, str(spool)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr


async def test_a_batch_dead_lettered_just_before_a_sigkill_is_not_sent_or_dead_lettered_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rec.spool"
    _dead_letter_then_sigkill(path)
    # The sink refuses the batch again if it is sent again.
    exporter = RecordingExporter([PermanentExporterError("rec", "HTTP 400")])
    spool = Spool(path, max_bytes=10_000_000)
    pipe = DeliveryPipeline(
        exporter, spool, cluster="c", metrics=ExportMetrics(CollectorRegistry()),
        config=DeliveryConfig(flush_interval=0.01, backoff=FAST),
    )  # fmt: skip
    try:
        assert await pipe.drain(within=10)
    finally:
        await pipe.close()
    records = [json.loads(line) for line in spool.dead_letter_path.read_text().splitlines()]
    assert (len(exporter.attempts), len(records)) == (0, 1)
    assert [r["gpu"] for r in records[0]["readings"]] == [r.gpu for r in readings(3)]


def test_a_dead_letter_record_torn_by_a_crash_stays_one_bad_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "rec.spool", max_bytes=10_000_000)
    spool.dead_letter_path.write_text('{"batch":"1-abc","readi')  # killed before its fsync
    spool.append(readings(2))
    spool.seal(500)
    batch = spool.oldest()
    assert batch is not None
    spool.dead_letter(batch, "refused", "rec")
    spool.close()
    lines = spool.dead_letter_path.read_text().splitlines()
    assert len(lines) == 2
    assert len(json.loads(lines[1])["readings"]) == 2
