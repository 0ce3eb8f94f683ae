"""What became of a batch's write: recorded in the spool, the metrics and one log line.

The delivery pipeline (``delivery.py``) decides what to send when; once a
write has ended it hands the outcome here. A delivered batch is acked and
counted; a failed one stays in the spool with its attempt recorded; one the
sink refused for good (or that is given up past its retry limits) moves to
the dead-letter file, and only its refused readings count as dropped; a
configuration error marks the exporter unhealthy. Each logs one line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool, SpooledBatch, SpoolStats

__all__ = ["OutcomeRecorder", "Refusal"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A batch the exporter refused for good, now in the dead-letter file."""

    readings: int
    reason: str


class OutcomeRecorder:
    """Records the outcome of each write of one pipeline (one exporter, one spool).

    Spool methods run in a worker thread. ``clock`` times the writes;
    ``wall`` stamps failed attempts (the age limit outlives the process).
    """

    def __init__(
        self,
        name: str,
        spool: Spool,
        *,
        cluster: str,
        metrics: ExportMetrics,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.name = name
        self.spool = spool
        self.cluster = cluster
        self.metrics = metrics
        self._clock = clock
        self._wall = wall
        self._failing = False
        self.last_error = ""
        """Why the last failed attempt failed (for the give-up reason)."""
        self.refused: list[Refusal] = []
        """Batches dead-lettered, oldest first."""

    async def delivered(self, batch: SpooledBatch, started: float) -> None:
        """The sink has the batch: ack it, count it, and say so if the exporter was failing."""
        labels = (self.name, self.cluster)
        self.metrics.duration.labels(*labels).observe(self._clock() - started)
        self.metrics.success.labels(*labels).inc()
        await asyncio.to_thread(self.spool.ack, batch)
        self.metrics.delivered.labels(self.name).inc(len(batch.readings))
        self.metrics.queue.labels(self.name).dec(len(batch.readings))
        if self._failing:
            self._failing = False
            log.info("exporter recovered", extra={"exporter": self.name, "batch": batch.hash})

    async def refused_for_good(
        self, batch: SpooledBatch, started: float, exc: PermanentExporterError
    ) -> None:
        """The sink refused the batch (or ``exc.refused`` of it) for good: dead-letter that."""
        labels = (self.name, self.cluster)
        self.metrics.duration.labels(*labels).observe(self._clock() - started)
        self.metrics.failure.labels(*labels, exc.error_type).inc()
        await self.dead_letter(batch, str(exc), "dead_letter", exc.refused)

    async def misconfigured(self, batch: SpooledBatch, started: float, exc: ExporterError) -> None:
        """A configuration error: the batch stays, the exporter is unhealthy, one error line."""
        labels = (self.name, self.cluster)
        self.metrics.duration.labels(*labels).observe(self._clock() - started)
        self.metrics.failure.labels(*labels, exc.error_type).inc()
        await asyncio.to_thread(self.spool.failed, batch, str(exc))
        self.metrics.health.labels(self.name).set(0)
        log.error(
            "exporter misconfigured: not retried; delivery to it stops until the settings "
            "are fixed and the process restarts, and its readings stay in the spool",
            extra={
                "exporter": self.name,
                "spool": str(self.spool.path),
                "error_type": exc.error_type,
                "error": str(exc),
            },
        )

    async def failed(self, batch: SpooledBatch, started: float, exc: Exception) -> None:
        """A write that may succeed later: count it, keep the batch, log one line."""
        labels = (self.name, self.cluster)
        error_type = _error_type(exc)
        self.metrics.duration.labels(*labels).observe(self._clock() - started)
        self.metrics.failure.labels(*labels, error_type).inc()
        self.last_error = str(exc) or error_type
        await asyncio.to_thread(self.spool.failed, batch, self.last_error, self._wall())
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

    async def dead_letter(
        self,
        batch: SpooledBatch,
        reason: str,
        why: str,
        refused: Sequence[Reading] | None = None,
    ) -> None:
        """Move ``refused`` (the whole batch by default) to the dead-letter file; ack the rest."""
        count = len(batch.readings) if refused is None else len(refused)
        taken = len(batch.readings) - count
        await asyncio.to_thread(self.spool.dead_letter, batch, reason, self.name, refused)
        self.metrics.dropped.labels(self.name, why).inc(count)
        if taken:
            self.metrics.delivered.labels(self.name).inc(taken)
        self.metrics.queue.labels(self.name).dec(len(batch.readings))
        log.error(
            "batch refused by the exporter; moved to the dead-letter file"
            if why == "dead_letter"
            else "batch given up after too many failed attempts; moved to the dead-letter file",
            extra={
                "exporter": self.name,
                "batch": batch.hash,
                "readings": count,
                "delivered": taken,
                "dead_letter": str(self.spool.dead_letter_path),
                "error": reason,
            },
        )
        self.refused.append(Refusal(count, reason))

    def refresh_gauges(self, stats: SpoolStats) -> None:
        """Set the queue and spooled gauges from the spool's counts."""
        self.metrics.queue.labels(self.name).set(stats.readings)
        self.metrics.spooled.labels(self.name).set(stats.retried_readings)


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, ExporterError):
        return exc.error_type
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "other"
