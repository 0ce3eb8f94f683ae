"""The delivery pipeline: accepted readings reach their exporter, or wait on disk.

One pipeline per exporter. ``submit`` writes readings to the spool before it
returns (that is what "accepted" means), so nothing accepted is lost to an
outage, a crash or a SIGKILL. A sender seals them into batches (``BATCH_SIZE``
readings, or whatever arrived within ``FLUSH_INTERVAL``) and writes the oldest
batch first, retrying with capped, jittered backoff while the exporter fails.
Later batches wait behind a failing one, so replay keeps the order.
(Local sinks are not spooled: ``direct.py``. ``Delivery`` is the face both show.
What each finished write means for the spool, the metrics and the log is
``outcomes.py``'s.)

A batch the sink refuses for good (``PermanentExporterError``: an HTTP 4xx)
goes to the dead-letter file with its reason instead of blocking the line;
when the sink took the rest of the batch (an HTTP 413 split down to one
reading), only the refused readings go there.

A batch that keeps failing with a retryable error (a receiver that answers 500
to this one batch) must not block the line for ever either. Once it has failed
``RETRY_MAX_ATTEMPTS`` times, or for ``RETRY_MAX_AGE`` since its first failure,
the pipeline sends the batch behind it: if the sink takes that one, the stuck
batch is the problem, and it goes to the dead-letter file
(``reason="retry_limit"``). If that one fails too the sink is down, and nothing
is dead-lettered: an outage of any length loses nothing.
A configuration error (``ExporterError.is_config``: a missing bucket, a table
of another layout) is never retried: the pipeline stops sending to that
exporter, keeps the readings in the spool and says why in its health check.

An exporter that commits overlapping writes in the order they started
(``max_in_flight`` > 1: PostgreSQL) is sent that many batches at once, oldest
first; when one fails, the ones behind it have stored nothing and go again
after it. Memory holds only the batches in flight: the queue itself is the
spool on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from gpufleet.core.retry import Backoff
from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.base import Exporter
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.outcomes import OutcomeRecorder, Refusal
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool, SpooledBatch, SpoolFullError, SpoolStats

log = logging.getLogger(__name__)


_Outcome = Literal["delivered", "dead_lettered", "failed", "misconfigured", "interrupted"]


class Delivery(Protocol):
    """Where a scan hands its readings: a spooled ``DeliveryPipeline`` or a ``DirectDelivery``."""

    refused: list[Refusal]
    """Batches dead-lettered, oldest first."""
    config_error: ExporterError | None
    """The configuration error that stopped delivery, if any."""
    interrupted: bool
    """``True`` once ``interrupt()`` was called."""

    @property
    def name(self) -> str:
        """The exporter type."""
        ...

    async def submit(self, readings: Sequence[Reading]) -> None:
        """Accept readings: on disk (spooled) or written (direct) once this returns."""
        ...

    async def drain(self, within: float) -> bool:
        """Deliver what is held back within ``within`` seconds; ``True`` if nothing is left."""
        ...

    def stop(self) -> None:
        """Ask the background delivery (if any) to finish."""
        ...

    def interrupt(self) -> None:
        """Stop at once; whatever is not delivered stays where it is."""
        ...

    def stats(self) -> SpoolStats:
        """What is waiting to be delivered."""
        ...

    async def close(self) -> None:
        """Close the exporter (and the spool, if any)."""
        ...


class _Writer(Protocol):
    def write(self, batch: Sequence[Reading]) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class _Sending:
    """A batch being written: its task and when it started."""

    batch: SpooledBatch
    write: Awaitable[None]
    task: asyncio.Task[None]
    started: float


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """How batches are formed and retried."""

    batch_size: int = 500
    flush_interval: float = 2.0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, factor=2.0, cap=30.0))
    max_attempts: int = 20
    """Failed attempts after which a batch is given up once the sink takes the next; 0: never."""
    max_age: float = 3600.0
    """Seconds since a batch's first failure after which the same holds; 0: never."""


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
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.exporter = exporter
        self.spool = spool
        self.cluster = cluster
        self.metrics = metrics
        self.config = config or DeliveryConfig()
        self._clock = clock
        self._rand = rand
        # The age limit outlives the process, so it is measured in Unix time.
        self._wall = wall
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._pending = spool.pending_count()
        # Readings left pending by an earlier process are due at once.
        self._first_pending_at: float | None = float("-inf") if self._pending else None
        self._window: deque[_Sending] = deque()
        self._outcomes = OutcomeRecorder(
            exporter.name, spool, cluster=cluster, metrics=metrics, clock=clock, wall=wall
        )
        self.refused: list[Refusal] = self._outcomes.refused
        """Batches dead-lettered by this pipeline, oldest first."""
        self.config_error: ExporterError | None = None
        """The configuration error that stopped delivery to this exporter, if any."""
        self.interrupted = False
        """``True`` once ``interrupt()`` was called."""
        # Exporters with lines of writes that commit in order (PostgreSQL)
        # take several batches at once; the others one at a time.
        line = getattr(exporter, "line", None)
        in_flight = int(getattr(exporter, "max_in_flight", 1)) if line is not None else 1
        self._max_in_flight = max(1, in_flight)
        self._new_line: Callable[[], _Writer] | None = line if in_flight > 1 else None
        self._writer: _Writer = exporter
        self._outcomes.refresh_gauges(spool.stats())

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

    def interrupt(self) -> None:
        """Stop at once (Ctrl-C in a one-shot command): the writes in flight are cancelled.

        Nothing they did is acked, so every batch stays in the spool, its
        attempts not counted, and the next process sends it again (an
        idempotent sink keeps one copy of a batch that did arrive).
        """
        self.interrupted = True
        self.stop()
        for sending in self._window:
            sending.task.cancel()

    @property
    def spool_path(self) -> Path:
        """The spool file that keeps what this pipeline has not delivered."""
        return self.spool.path

    async def _pump(self, deadline: float | None) -> bool:
        draining = deadline is not None
        attempt = 0
        window = self._window
        try:
            while True:
                if self.config_error is not None or self.interrupted:
                    return False
                stopping = self._stop.is_set()
                await self._seal(force=draining or stopping)
                out_of_time = await self._fill(window, deadline)
                if not window:
                    if out_of_time:
                        return False
                    self._outcomes.refresh_gauges(await asyncio.to_thread(self.spool.stats))
                    if draining or stopping:
                        return True
                    await self._wait_for_work()
                    continue
                # Still in the window while it is settled, so interrupt() reaches it.
                head = window[0].batch
                outcome = await self._settle(window[0])
                window.popleft()
                if outcome == "delivered":
                    attempt = 0
                    continue
                # Whatever was sent behind a batch that did not go through was
                # not committed (exporters commit in order): it goes again.
                await self._abandon(window)
                if outcome == "failed" and not stopping and self._over_limits(head):
                    outcome = await self._probe_past(head, deadline)
                if outcome == "dead_lettered":
                    attempt = 0
                    continue
                if outcome == "interrupted":
                    return False
                if outcome == "misconfigured":
                    if not draining:
                        # Retrying cannot help; the spool keeps the readings for
                        # the process that runs with fixed settings.
                        await self._stop.wait()
                    return False
                if stopping:
                    return False  # one last try was made; the spool keeps the rest
                delay = self.config.backoff.delay(attempt, self._rand)
                attempt += 1
                if deadline is not None:
                    delay = min(delay, max(0.0, deadline - self._clock()))
                if await self._sleep_unless_stopped(delay) and draining:
                    return False
        finally:
            # Cancelled (the service is shutting down): the writes in flight
            # end with it, and nothing they did is acked.
            for sending in window:
                sending.task.cancel()
            await self._abandon(window)

    async def _fill(self, window: deque[_Sending], deadline: float | None) -> bool:
        """Start writing the next batches, up to the exporter's ``max_in_flight``.

        Returns ``True`` if the deadline has passed (nothing more is started).
        """
        after = window[-1].batch.seq if window else None
        while len(window) < self._max_in_flight:
            batch = await asyncio.to_thread(self.spool.next_batch, after)
            if batch is None:
                return False
            if self.interrupted:
                return False
            budget = None if deadline is None else deadline - self._clock()
            if budget is not None and budget <= 0:
                return True
            if not window and self._new_line is not None:
                # A new line: its writes commit in order and stop at its first
                # failure, so nothing ever commits past a batch that did not.
                self._writer = self._new_line()
            # Called in spool order, here and now: the order of the calls is
            # the order of the commits.
            write = self._writer.write(batch.readings)
            task = asyncio.create_task(self._write(write, budget))
            window.append(_Sending(batch, write, task, self._clock()))
            after = batch.seq
        return False

    @staticmethod
    async def _write(write: Awaitable[None], budget: float | None) -> None:
        await asyncio.wait_for(write, budget)

    @staticmethod
    async def _abandon(window: deque[_Sending]) -> None:
        """Let the writes behind a failed batch end, and forget them; they stay in the spool."""
        await asyncio.gather(*(sending.task for sending in window), return_exceptions=True)
        for sending in window:
            _close_unstarted(sending)
        window.clear()

    async def _seal(self, *, force: bool) -> None:
        if self._pending <= 0:
            # Below zero for a moment when a seal took readings whose submit()
            # has not counted them yet; that submit brings it back to zero.
            self._first_pending_at = None
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
        sealed = await asyncio.to_thread(self.spool.seal, self.config.batch_size)
        # Only what was sealed: a submit() that landed while the seal ran in
        # its thread has added readings the next seal must take.
        self._pending -= sealed
        self._first_pending_at = self._clock() if self._pending > 0 else None

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

    async def _settle(self, sending: _Sending) -> _Outcome:
        """Wait for one batch's write, then ack, dead-letter or keep it."""
        batch, started = sending.batch, sending.started
        # wait() rather than await: a write cancelled by interrupt() must not
        # look like this task being cancelled.
        try:
            await asyncio.wait([sending.task])
        except asyncio.CancelledError:
            sending.task.cancel()  # this task is cancelled: so is the write it waits for
            raise
        if sending.task.cancelled():
            _close_unstarted(sending)
            return "interrupted"
        try:
            sending.task.result()
        except PermanentExporterError as exc:
            await self._outcomes.refused_for_good(batch, started, exc)
            return "dead_lettered"
        except ExporterError as exc:
            if not exc.is_config:
                await self._outcomes.failed(batch, started, exc)
                return "failed"
            await self._outcomes.misconfigured(batch, started, exc)
            self.config_error = exc
            return "misconfigured"
        except Exception as exc:
            await self._outcomes.failed(batch, started, exc)
            return "failed"
        await self._outcomes.delivered(batch, started)
        return "delivered"

    def _over_limits(self, batch: SpooledBatch) -> bool:
        """Whether ``batch``, which has just failed once more, is past a retry limit."""
        attempts = batch.attempts + 1
        first = batch.first_failed if batch.first_failed is not None else self._wall()
        limits = self.config
        return (limits.max_attempts > 0 and attempts >= limits.max_attempts) or (
            limits.max_age > 0 and self._wall() - first >= limits.max_age
        )

    def _give_up_reason(self, batch: SpooledBatch, error: str) -> str:
        first = batch.first_failed if batch.first_failed is not None else self._wall()
        limits = self.config
        return (
            f"gave up after {batch.attempts + 1} failed attempts over "
            f"{max(0.0, self._wall() - first):.0f}s (RETRY_MAX_ATTEMPTS={limits.max_attempts}, "
            f"RETRY_MAX_AGE={limits.max_age:g}s) while the exporter took the batch "
            f"behind it; last error: {error}"
        )

    async def _probe_past(self, head: SpooledBatch, deadline: float | None) -> _Outcome:
        """``head`` failed past its limits: is it the batch, or is the sink down?

        The batches behind it are sent one at a time. The first one the sink
        takes proves the sink is up; then ``head`` (and any batch between,
        itself past its limits) is sent once more, and one that fails again
        goes to the dead-letter file. A batch behind that fails within its
        limits says the sink is down: nothing is given up, and the caller
        backs off. So an outage never dead-letters anything, however long;
        a sink that comes back during the probe delivers the stuck batches
        just after the one that proved it.
        """
        stuck = [head]
        after = head.seq
        while True:
            batch = await asyncio.to_thread(self.spool.next_batch, after)
            if batch is None or self.interrupted:
                return "failed"
            outcome = await self._send_one(batch, deadline)
            if outcome is None:
                return "failed"  # out of time: the next run goes on from here
            if outcome == "delivered":
                break
            if outcome == "dead_lettered":
                after = batch.seq
                continue
            if outcome != "failed" or not self._over_limits(batch):
                return outcome
            stuck.append(batch)
            after = batch.seq
        for old in stuck:
            # Read again: the failed attempts of the probe are counted in it.
            again = await asyncio.to_thread(self.spool.next_batch, old.seq - 1)
            if again is None or again.seq != old.seq:
                continue
            outcome = await self._send_one(again, deadline)
            if outcome is None:
                return "failed"  # not sent again, so not given up
            if outcome == "failed":
                reason = self._give_up_reason(again, self._outcomes.last_error)
                await self._outcomes.dead_letter(again, reason, "retry_limit")
            elif outcome != "delivered" and outcome != "dead_lettered":
                return outcome
        return "dead_lettered"

    async def _send_one(self, batch: SpooledBatch, deadline: float | None) -> _Outcome | None:
        """Write one batch on a line of its own and settle it; ``None`` if out of time."""
        budget = None if deadline is None else deadline - self._clock()
        if budget is not None and budget <= 0:
            return None
        if self._new_line is not None:
            self._writer = self._new_line()
        write = self._writer.write(batch.readings)
        task = asyncio.create_task(self._write(write, budget))
        self._window.append(_Sending(batch, write, task, self._clock()))
        try:
            return await self._settle(self._window[0])
        finally:
            self._window.popleft()

    # --- health ----------------------------------------------------------------

    async def check_health(self) -> bool:
        """Run the exporter's health check; records ``gpuid_health_check_success``.

        After a configuration error it raises that error instead, so ``/readyz``
        names the exporter and the reason until the process restarts.
        """
        if self.config_error is not None:
            self.metrics.health.labels(self.name).set(0)
            raise self.config_error
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

    async def close(self) -> None:
        """Close the exporter, then the spool (whatever is in it stays on disk)."""
        try:
            await self.exporter.close()
        finally:
            self.spool.close()


def _close_unstarted(sending: _Sending) -> None:
    # A write cancelled before it ran: close it, or Python warns that it was
    # never awaited. Closing one that ran is a no-op.
    if inspect.iscoroutine(sending.write):
        sending.write.close()
