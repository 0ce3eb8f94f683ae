"""The delivery pipeline: accepted readings reach their exporter, or wait on disk.

One pipeline per exporter. ``submit`` writes readings to the spool before it
returns (that is what "accepted" means), so nothing accepted is lost to an
outage, a crash or a SIGKILL. A sender seals them into batches (``BATCH_SIZE``
readings, or whatever arrived within ``FLUSH_INTERVAL``) and writes the oldest
batch first, retrying with capped, jittered backoff while the exporter fails.
Later batches wait behind a failing one, so replay keeps the order.

A batch the sink refuses for good (``PermanentExporterError``: an HTTP 4xx)
goes to the dead-letter file with its reason instead of blocking the line.

Memory holds at most one batch: the queue itself is the spool on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gpufleet.core.retry import Backoff
from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.base import Exporter
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool, SpooledBatch, SpoolFullError, SpoolStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """How batches are formed and retried."""

    batch_size: int = 500
    flush_interval: float = 2.0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, factor=2.0, cap=30.0))


class DeliveryPipeline:
    """Delivers the readings accepted into one spool to one exporter."""

    def __init__(
        self,
        exporter: Exporter,
        spool: Spool,
        *,
        cluster: str,
        metrics: ExportMetrics,
        config: DeliveryConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.exporter = exporter
        self.spool = spool
        self.cluster = cluster
        self.metrics = metrics
        self.config = config or DeliveryConfig()
        self._clock = clock
        self._rand = rand
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._pending = spool.pending_count()
        # Readings left pending by an earlier process are due at once.
        self._first_pending_at: float | None = float("-inf") if self._pending else None
        self._failing = False
        self._refresh_gauges(spool.stats())

    @property
    def name(self) -> str:
        """The exporter type, the label of every metric of this pipeline."""
        return self.exporter.name

    # --- accepting -------------------------------------------------------------

    async def submit(self, readings: Sequence[Reading]) -> None:
        """Accept readings: once this returns they are on disk and will be delivered.

        Raises ``SpoolFullError`` (and counts the readings as dropped) when the
        spool is full and its policy refuses new readings.
        """
        if not readings:
            return
        try:
            dropped = await asyncio.to_thread(self.spool.append, readings)
        except SpoolFullError as exc:
            self.metrics.dropped.labels(self.name, "spool_full").inc(len(readings))
            log.error(
                "spool full: readings refused",
                extra={"exporter": self.name, "readings": len(readings), "error": str(exc)},
            )
            raise
        if dropped:
            self.metrics.dropped.labels(self.name, "spool_full_dropped_oldest").inc(dropped)
            log.warning(
                "spool full: dropped the oldest readings to make room",
                extra={"exporter": self.name, "dropped": dropped},
            )
        self._pending += len(readings)
        if self._first_pending_at is None:
            self._first_pending_at = self._clock()
        self.metrics.queue.labels(self.name).inc(len(readings))
        self._wake.set()

    # --- delivering ------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until ``stop()``; then make one last attempt and return.

        Whatever is not delivered when this returns stays in the spool for the
        next process.
        """
        await self._pump(deadline=None)

    async def drain(self, within: float) -> bool:
        """Deliver everything now (one-shot commands); ``True`` if the spool is empty.

        Gives up after ``within`` seconds, leaving the rest in the spool.
        """
        return await self._pump(deadline=self._clock() + within)

    def stop(self) -> None:
        """Ask ``run()`` to seal what is pending, try once more, and return."""
        self._stop.set()
        self._wake.set()

    async def _pump(self, deadline: float | None) -> bool:
        draining = deadline is not None
        attempt = 0
        while True:
            stopping = self._stop.is_set()
            await self._seal(force=draining or stopping)
            batch = await asyncio.to_thread(self.spool.oldest)
            if batch is None:
                self._refresh_gauges(await asyncio.to_thread(self.spool.stats))
                if draining or stopping:
                    return True
                await self._wait_for_work()
                continue
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                return False
            if await self._deliver(batch, remaining):
                attempt = 0
                continue
            if stopping:
                return False  # one last try was made; the spool keeps the rest
            delay = self.config.backoff.delay(attempt, self._rand)
            attempt += 1
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - self._clock()))
            if await self._sleep_unless_stopped(delay) and draining:
                return False

    async def _seal(self, *, force: bool) -> None:
        if not self._pending:
            return
        due = (
            force
            or self._pending >= self.config.batch_size
            or (
                self._first_pending_at is not None
                and self._clock() - self._first_pending_at >= self.config.flush_interval
            )
        )
        if not due:
            return
        await asyncio.to_thread(self.spool.seal, self.config.batch_size)
        self._pending = 0
        self._first_pending_at = None

    async def _wait_for_work(self) -> None:
        self._wake.clear()
        timeout = None
        if self._first_pending_at is not None:
            due_at = self._first_pending_at + self.config.flush_interval
            timeout = max(0.0, due_at - self._clock())
        if self._pending >= self.config.batch_size or self._stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _sleep_unless_stopped(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; ``True`` if ``stop()`` cut it short."""
        try:
            await asyncio.wait_for(self._stop.wait(), delay)
        except TimeoutError:
            return False
        return True

    async def _deliver(self, batch: SpooledBatch, budget: float | None) -> bool:
        """Write one batch; ``True`` if it left the spool (delivered or dead-lettered)."""
        labels = (self.name, self.cluster)
        started = self._clock()
        try:
            await asyncio.wait_for(self.exporter.write(batch.readings), budget)
        except PermanentExporterError as exc:
            self.metrics.duration.labels(*labels).observe(self._clock() - started)
            self.metrics.failure.labels(*labels, exc.error_type).inc()
            await asyncio.to_thread(self.spool.dead_letter, batch, str(exc), self.name)
            self.metrics.dropped.labels(self.name, "dead_letter").inc(len(batch.readings))
            self.metrics.queue.labels(self.name).dec(len(batch.readings))
            log.error(
                "batch refused by the exporter; moved to the dead-letter file",
                extra={
                    "exporter": self.name,
                    "batch": batch.hash,
                    "readings": len(batch.readings),
                    "dead_letter": str(self.spool.dead_letter_path),
                    "error": str(exc),
                },
            )
            return True
        except Exception as exc:
            error_type = _error_type(exc)
            self.metrics.duration.labels(*labels).observe(self._clock() - started)
            self.metrics.failure.labels(*labels, error_type).inc()
            await asyncio.to_thread(self.spool.failed, batch, str(exc) or error_type)
            self.metrics.spooled.labels(self.name).set(
                (await asyncio.to_thread(self.spool.stats)).retried_readings
            )
            # One line per failed attempt; a traceback only for a bug in an exporter.
            log.warning(
                "export failed; the batch stays in the spool and will be retried",
                extra={
                    "exporter": self.name,
                    "batch": batch.hash,
                    "attempt": batch.attempts + 1,
                    "error_type": error_type,
                    "error": str(exc) or error_type,
                },
                exc_info=not isinstance(exc, ExporterError | TimeoutError),
            )
            self._failing = True
            return False
        self.metrics.duration.labels(*labels).observe(self._clock() - started)
        self.metrics.success.labels(*labels).inc()
        await asyncio.to_thread(self.spool.ack, batch)
        self.metrics.delivered.labels(self.name).inc(len(batch.readings))
        self.metrics.queue.labels(self.name).dec(len(batch.readings))
        if self._failing:
            self._failing = False
            log.info("exporter recovered", extra={"exporter": self.name, "batch": batch.hash})
        return True

    def _refresh_gauges(self, stats: SpoolStats) -> None:
        self.metrics.queue.labels(self.name).set(stats.readings)
        self.metrics.spooled.labels(self.name).set(stats.retried_readings)

    # --- health ----------------------------------------------------------------

    async def check_health(self) -> bool:
        """Run the exporter's health check; records ``gpuid_health_check_success``."""
        try:
            await self.exporter.health()
        except Exception as exc:
            self.metrics.health.labels(self.name).set(0)
            log.warning(
                "exporter health check failed", extra={"exporter": self.name, "error": str(exc)}
            )
            return False
        self.metrics.health.labels(self.name).set(1)
        return True

    def stats(self) -> SpoolStats:
        """What is waiting in this pipeline's spool."""
        return self.spool.stats()


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, ExporterError):
        return exc.error_type
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "other"


class DirectDelivery:
    """A local exporter (stdout, SQLite) behind the pipeline's submit/drain face.

    A local sink fails at once and for a local reason (a closed pipe, a full
    disk), so spooling its readings would only hide the failure: ``submit``
    writes straight through and raises ``ExporterError``.
    """

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    @property
    def name(self) -> str:
        """The exporter type."""
        return self.exporter.name

    async def submit(self, readings: Sequence[Reading]) -> None:
        """Write the readings now."""
        await self.exporter.write(readings)

    async def drain(self, within: float) -> bool:
        """Nothing is ever held back."""
        return True

    def stop(self) -> None:
        """Nothing runs in the background."""

    def stats(self) -> SpoolStats:
        """Always empty: nothing waits."""
        return SpoolStats(0, 0, 0, 0, 0)


Delivery = DeliveryPipeline | DirectDelivery
"""Where a scan hands its readings: a spooled pipeline or a direct local write."""
