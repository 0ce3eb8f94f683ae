"""The delivery pipeline and its spool: nothing accepted is lost, order is kept."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.inventory.delivery import DeliveryConfig, DeliveryPipeline
from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading, batch_hash
from gpufleet.inventory.spool import FullPolicy, Spool, SpoolError, SpoolFullError
from tests.polling import eventually
from tests.unit.delivery_support import FAST, RecordingExporter, readings, spool_at


def down(n: int) -> list[Exception]:
    return [ExporterError("rec", "connection refused", error_type="connection")] * n


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def pipeline(
    exporter: RecordingExporter, spool: Spool, registry: CollectorRegistry, batch_size: int = 500
) -> DeliveryPipeline:
    return DeliveryPipeline(
        exporter, spool, cluster="c", metrics=ExportMetrics(registry),
        config=DeliveryConfig(batch_size=batch_size, flush_interval=0.01, backoff=FAST),
    )  # fmt: skip


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_readings_are_written_in_batches_of_batch_size(tmp_path: Path, registry) -> None:
    exporter = RecordingExporter()
    pipe = pipeline(exporter, spool_at(tmp_path), registry, batch_size=500)
    await pipe.submit(readings(1200))
    assert await pipe.drain(within=10)
    assert [len(b) for b in exporter.batches] == [500, 500, 200]


async def test_accepted_readings_survive_a_process_that_never_delivered(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    spool.append(readings(7))
    spool.close()  # as good as a crash: nothing was delivered
    assert spool_at(tmp_path).stats().readings == 7


async def test_outage_keeps_order_and_delivers_each_reading_once(tmp_path: Path, registry) -> None:
    exporter = RecordingExporter(failures=down(3))
    pipe = pipeline(exporter, spool_at(tmp_path), registry, batch_size=10)
    await pipe.submit(readings(25))
    assert await pipe.drain(within=10)
    assert exporter.delivered == [r.gpu for r in readings(25)]


async def test_a_retried_batch_keeps_its_hash(tmp_path: Path, registry) -> None:
    exporter = RecordingExporter(failures=down(2))
    pipe = pipeline(exporter, spool_at(tmp_path), registry)
    await pipe.submit(readings(5))
    await pipe.drain(within=10)
    assert len(set(exporter.attempts)) == 1


async def test_one_shot_gives_up_after_its_deadline_and_keeps_everything(
    tmp_path: Path, registry
) -> None:
    spool = spool_at(tmp_path)
    pipe = pipeline(RecordingExporter(failures=down(10_000)), spool, registry)
    await pipe.submit(readings(8))
    assert not await pipe.drain(within=0.05)
    assert spool.stats().readings == 8


async def test_next_run_delivers_the_spooled_readings_first(tmp_path: Path, registry) -> None:
    first = spool_at(tmp_path)
    await pipeline(RecordingExporter(failures=down(10_000)), first, registry).submit(readings(3))
    first.close()
    exporter = RecordingExporter()
    pipe = pipeline(exporter, spool_at(tmp_path), CollectorRegistry())
    await pipe.submit(readings(2, start=100))
    await pipe.drain(within=10)
    assert exporter.delivered == ["S000000", "S000001", "S000002", "S000100", "S000101"]


async def test_refused_batch_goes_to_dead_letter_with_its_reason(tmp_path: Path, registry) -> None:
    spool = spool_at(tmp_path)
    exporter = RecordingExporter(failures=[PermanentExporterError("rec", "HTTP 400: bad field")])
    pipe = pipeline(exporter, spool, registry, batch_size=2)
    await pipe.submit(readings(4))
    assert await pipe.drain(within=10)
    (dead,) = [json.loads(line) for line in spool.dead_letter_path.read_text().splitlines()]
    assert "HTTP 400" in dead["reason"]
    assert [r["gpu"] for r in dead["readings"]] == ["S000000", "S000001"]
    assert exporter.delivered == ["S000002", "S000003"]


async def test_dead_lettered_readings_are_counted_as_dropped(tmp_path: Path, registry) -> None:
    exporter = RecordingExporter(failures=[PermanentExporterError("rec", "HTTP 422")])
    pipe = pipeline(exporter, spool_at(tmp_path), registry)
    await pipe.submit(readings(3))
    await pipe.drain(within=10)
    assert sample(registry, "gpufleet_delivery_dropped_total", reason="dead_letter") == 3


async def test_full_spool_refuses_new_readings_and_keeps_the_accepted(
    tmp_path: Path, registry
) -> None:
    spool = spool_at(tmp_path, max_bytes=2000)
    pipe = pipeline(RecordingExporter(), spool, registry)
    await pipe.submit(readings(3))
    with pytest.raises(SpoolFullError, match="SPOOL_MAX_BYTES"):
        await pipe.submit(readings(50, start=10))
    assert spool.stats().readings == 3
    assert sample(registry, "gpufleet_delivery_dropped_total", reason="spool_full") == 50


async def test_drop_oldest_policy_makes_room_and_counts_what_it_dropped(
    tmp_path: Path, registry
) -> None:
    spool = spool_at(tmp_path, max_bytes=3000, full_policy=FullPolicy.DROP_OLDEST)
    for start in range(0, 30, 3):
        spool.append(readings(3, start=start))
        spool.seal(3)
    kept = spool.stats().readings
    pipe = pipeline(RecordingExporter(), spool, registry)
    await pipe.submit(readings(3, start=100))
    assert sample(registry, "gpufleet_delivery_dropped_total", reason="spool_full_dropped_oldest")
    assert spool.stats().readings <= kept
    assert spool.stats().bytes <= 3000


async def test_a_second_process_cannot_open_the_same_spool(tmp_path: Path) -> None:
    first = spool_at(tmp_path)
    with pytest.raises(SpoolError, match="in use by another gpufleet process"):
        spool_at(tmp_path)
    first.close()


async def test_a_buggy_exporter_is_retried_not_fatal(tmp_path: Path, registry) -> None:
    exporter = RecordingExporter(failures=[RuntimeError("bug")])
    pipe = pipeline(exporter, spool_at(tmp_path), registry)
    await pipe.submit(readings(2))
    assert await pipe.drain(within=10)
    assert sample(registry, "gpuid_export_failure_total", error_type="other") == 1


async def test_metrics_count_successes_and_failures_by_error_type(tmp_path: Path, registry) -> None:
    exporter = RecordingExporter(failures=down(2))
    pipe = pipeline(exporter, spool_at(tmp_path), registry, batch_size=5)
    await pipe.submit(readings(10))
    await pipe.drain(within=10)
    assert (
        sample(registry, "gpuid_export_success_total", exporter_type="rec", cluster="c"),
        sample(registry, "gpuid_export_failure_total", error_type="connection"),
        sample(registry, "gpuid_export_duration_seconds_count", exporter_type="rec"),
        sample(registry, "gpufleet_delivery_queue_readings", exporter_type="rec"),
    ) == (2, 2, 4, 0)


async def test_health_check_sets_the_health_gauge(tmp_path: Path, registry) -> None:
    pipe = pipeline(RecordingExporter(failures=down(1)), spool_at(tmp_path), registry)
    assert not await pipe.check_health()
    assert sample(registry, "gpuid_health_check_success", exporter_type="rec") == 0


async def test_long_running_sender_flushes_a_partial_batch_after_the_interval(
    tmp_path: Path, registry
) -> None:
    exporter = RecordingExporter()
    pipe = pipeline(exporter, spool_at(tmp_path), registry)
    task = asyncio.create_task(pipe.run())
    await pipe.submit(readings(3))
    for _ in range(500):
        if exporter.batches:
            break
        await asyncio.sleep(0.01)
    pipe.stop()
    await asyncio.wait_for(task, 10)
    assert exporter.delivered == ["S000000", "S000001", "S000002"]


async def test_stop_during_an_outage_returns_and_keeps_the_spool(tmp_path: Path, registry) -> None:
    spool = spool_at(tmp_path)
    pipe = pipeline(RecordingExporter(failures=down(10_000)), spool, registry)
    task = asyncio.create_task(pipe.run())
    await pipe.submit(readings(4))
    await asyncio.sleep(0.05)
    pipe.stop()
    await asyncio.wait_for(task, 10)
    assert spool.stats().readings == 4


# --- configuration errors and interruptions -------------------------------------------


def misconfigured(n: int) -> list[Exception]:
    return [ExporterError("rec", "table gpu is not a gpufleet table", error_type="config")] * n


async def test_a_configuration_error_is_not_retried(tmp_path: Path, registry) -> None:
    exporter = RecordingExporter(failures=misconfigured(5))
    pipe = pipeline(exporter, spool_at(tmp_path), registry)
    await pipe.submit(readings(3))
    delivered = await pipe.drain(within=10)
    assert (delivered, len(exporter.attempts), pipe.stats().readings) == (False, 1, 3)
    assert sample(registry, "gpuid_export_failure_total", error_type="config") == 1


async def test_health_check_reports_the_configuration_error(tmp_path: Path, registry) -> None:
    exporter = RecordingExporter(failures=misconfigured(1))
    pipe = pipeline(exporter, spool_at(tmp_path), registry)
    await pipe.submit(readings(1))
    await pipe.drain(within=10)
    with pytest.raises(ExporterError, match="not a gpufleet table"):
        await pipe.check_health()  # the exporter itself would answer healthy now


class StallingExporter(RecordingExporter):
    """Takes every write and never answers."""

    async def write(self, batch: Sequence[Reading]) -> None:
        self.attempts.append(batch_hash(batch))
        await asyncio.Event().wait()


async def test_interrupt_cancels_the_write_in_flight_and_keeps_the_batch(
    tmp_path: Path, registry
) -> None:
    exporter = StallingExporter()
    spool = spool_at(tmp_path)
    pipe = pipeline(exporter, spool, registry)
    await pipe.submit(readings(3))
    drain = asyncio.create_task(pipe.drain(within=3600))
    await eventually(lambda: len(exporter.attempts) == 1)
    pipe.interrupt()
    delivered = await asyncio.wait_for(drain, 10)  # the hang guard
    batch = spool.next_batch(None)
    assert batch is not None
    assert (delivered, len(batch.readings), batch.attempts) == (False, 3, 0)
