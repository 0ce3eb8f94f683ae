"""Several writes in flight: an exporter with ``max_in_flight`` gets a window of batches.

The fake exporter here follows the contract in ``Exporter``'s docstring the way
the PostgreSQL exporter does: a write on a line does its own work first, then
waits for the write called before it on the same line (if any) and commits
only if that one committed; otherwise it stores nothing and raises
``EarlierWriteFailed``. So once a write of a line has failed, no later write of
that line commits, whenever it is called. Writes outside a line are independent.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.core.retry import Backoff
from gpufleet.inventory.delivery import DeliveryConfig, DeliveryPipeline
from gpufleet.inventory.errors import EarlierWriteFailed, ExporterError, PermanentExporterError
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool
from tests.polling import eventually
from tests.unit.delivery_support import FAST, readings, spool_at

PER_BATCH = 2
"""Readings per batch: batch ``n`` holds readings ``2n`` and ``2n + 1``."""

NEVER = Backoff(initial=3600.0, factor=1.0, cap=3600.0, jitter=0.0)
"""A backoff no drain deadline in these tests outlasts."""


def number(batch: Sequence[Reading]) -> int:
    """The batch's place in the spool, from its first reading (``S000004`` is in batch 2)."""
    return int(batch[0].gpu[1:]) // PER_BATCH


def gpus(batches: range) -> list[str]:
    """The readings of ``batches``, in order, by GPU serial."""
    first, last = batches.start * PER_BATCH, batches.stop * PER_BATCH
    return [r.gpu for r in readings(last - first, start=first)]


@dataclass
class _Write:
    batch: int
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    committed: bool = False


class OrderedExporter:
    """An exporter that commits overlapping writes in call order, with scripted holds and failures.

    ``max_in_flight`` and ``line`` are set only when ``max_in_flight`` is
    given, so ``OrderedExporter(None)`` is an exporter without lines.
    """

    name = "win"

    def __init__(self, max_in_flight: int | None = 3) -> None:
        if max_in_flight is not None:
            self.max_in_flight = max_in_flight
            self.line = self._new_line
        self.lines = 0
        self.started: list[int] = []
        self.committed: list[int] = []
        self.stored: list[str] = []
        self.earlier_failed: list[int] = []
        self.cancelled: list[int] = []
        self.running: set[int] = set()
        self.peak = 0
        self._holds: defaultdict[int, deque[asyncio.Event]] = defaultdict(deque)
        self._failures: defaultdict[int, deque[Exception]] = defaultdict(deque)

    def hold(self, batch: int) -> asyncio.Event:
        """Hold the next not yet held write of ``batch`` open until the returned event is set."""
        gate = asyncio.Event()
        self._holds[batch].append(gate)
        return gate

    def fail(self, batch: int, error: Exception) -> None:
        """Make the next not yet failed write of ``batch`` raise ``error`` (after its hold)."""
        self._failures[batch].append(error)

    def _new_line(self) -> _Line:
        self.lines += 1
        return _Line(self)

    async def write(self, batch: Sequence[Reading]) -> None:
        await self.write_after(batch, None, _Write(number(batch)))

    async def write_after(self, batch: Sequence[Reading], ahead: _Write | None, me: _Write) -> None:
        n = number(batch)
        self.started.append(n)
        self.running.add(n)
        self.peak = max(self.peak, len(self.running))
        try:
            if self._holds[n]:
                await self._holds[n].popleft().wait()
            if self._failures[n]:
                raise self._failures[n].popleft()
            if ahead is not None:
                await ahead.finished.wait()
                if not ahead.committed:
                    self.earlier_failed.append(n)
                    raise EarlierWriteFailed(self.name, f"batch {n}: the batch ahead failed")
            me.committed = True
            self.committed.append(n)
            self.stored.extend(r.gpu for r in batch)
        except asyncio.CancelledError:
            self.cancelled.append(n)
            raise
        finally:
            self.running.discard(n)
            me.finished.set()

    async def health(self) -> None:
        pass

    async def close(self) -> None:
        pass


class _Line:
    """Writes that commit in call order and stop at the line's first failure."""

    def __init__(self, exporter: OrderedExporter) -> None:
        self._exporter = exporter
        self._last: _Write | None = None

    async def write(self, batch: Sequence[Reading]) -> None:
        ahead, me = self._last, _Write(number(batch))
        self._last = me
        await self._exporter.write_after(batch, ahead, me)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def spooled(tmp_path: Path, batches: int) -> Spool:
    """A spool holding ``batches`` sealed batches of ``PER_BATCH`` readings."""
    spool = spool_at(tmp_path)
    spool.append(readings(batches * PER_BATCH))
    spool.seal(PER_BATCH)
    return spool


def pipeline(
    exporter: OrderedExporter,
    spool: Spool,
    registry: CollectorRegistry,
    backoff: Backoff = FAST,
) -> DeliveryPipeline:
    return DeliveryPipeline(
        exporter, spool, cluster="c", metrics=ExportMetrics(registry),
        config=DeliveryConfig(batch_size=PER_BATCH, flush_interval=0.01, backoff=backoff),
    )  # fmt: skip


def attempts(spool: Spool) -> list[int]:
    """The ``attempts`` of every batch in the spool, oldest first."""
    found: list[int] = []
    batch = spool.oldest()
    while batch is not None:
        found.append(batch.attempts)
        batch = spool.next_batch(batch.seq)
    return found


def total(registry: CollectorRegistry, name: str) -> float:
    """The sum of a metric's samples over all their labels."""
    text = generate_latest(registry).decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


async def never(condition: Callable[[], bool], within: float = 0.2) -> bool:
    """Whether ``condition()`` stays false for ``within`` seconds: a chance to misbehave."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        if condition():
            return False
        await asyncio.sleep(0.01)
    return True


async def test_writes_start_in_spool_order_up_to_max_in_flight_at_once(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    exporter = OrderedExporter(max_in_flight=3)
    head = exporter.hold(0)
    drain = asyncio.create_task(pipeline(exporter, spooled(tmp_path, 10), registry).drain(30))
    await eventually(lambda: len(exporter.started) == 3)
    in_flight_while_head_held = sorted(exporter.running)
    head.set()
    delivered = await drain
    assert (
        in_flight_while_head_held,
        exporter.peak,
        exporter.started,
        exporter.committed,
        exporter.stored,
        delivered,
    ) == ([0, 1, 2], 3, list(range(10)), list(range(10)), gpus(range(10)), True)


async def test_a_new_write_starts_once_the_head_is_acked_while_the_next_are_still_open(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    exporter = OrderedExporter(max_in_flight=3)
    gates = [exporter.hold(n) for n in range(3)]
    drain = asyncio.create_task(pipeline(exporter, spooled(tmp_path, 5), registry).drain(30))
    await eventually(lambda: len(exporter.started) == 3)
    gates[0].set()
    await eventually(lambda: 3 in exporter.started)
    in_flight_when_batch_3_started = sorted(exporter.running)
    gates[1].set()
    gates[2].set()
    assert await drain
    assert in_flight_when_batch_3_started == [1, 2, 3]


async def test_writes_behind_a_failed_head_are_not_failures_and_go_again_after_it(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    spool = spooled(tmp_path, 5)
    exporter = OrderedExporter(max_in_flight=3)
    first_try = exporter.hold(0)
    exporter.fail(0, ExporterError("win", "connection reset", error_type="connection"))
    second_try = exporter.hold(0)
    drain = asyncio.create_task(pipeline(exporter, spool, registry).drain(30))
    await eventually(lambda: len(exporter.started) == 3)
    first_try.set()
    await eventually(lambda: len(exporter.started) == 6)
    attempts_during_retry = attempts(spool)
    failures_during_retry = total(registry, "gpuid_export_failure_total")
    second_try.set()
    delivered = await drain
    assert (
        exporter.earlier_failed,
        attempts_during_retry,
        failures_during_retry,
        exporter.started,
        exporter.committed,
        exporter.stored,
        delivered,
        exporter.lines,
    ) == (
        [1, 2],
        [1, 0, 0, 0, 0],
        1,
        [0, 1, 2, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4],
        gpus(range(5)),
        True,
        2,  # the batches went again on a new line
    )


async def test_the_window_goes_again_only_once_every_write_in_it_has_ended(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    exporter = OrderedExporter(max_in_flight=3)
    head = exporter.hold(0)
    exporter.fail(0, ExporterError("win", "connection reset", error_type="connection"))
    last = exporter.hold(2)
    drain = asyncio.create_task(pipeline(exporter, spooled(tmp_path, 5), registry).drain(30))
    await eventually(lambda: len(exporter.started) == 3)
    head.set()
    await eventually(lambda: total(registry, "gpuid_export_failure_total") == 1)
    waited_for_batch_2 = await never(lambda: len(exporter.started) > 3)
    last.set()
    assert await drain
    assert (waited_for_batch_2, exporter.committed) == (True, [0, 1, 2, 3, 4])


async def test_a_dead_lettered_head_lets_the_writes_behind_it_go_again_at_once(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    spool = spooled(tmp_path, 5)
    exporter = OrderedExporter(max_in_flight=3)
    head = exporter.hold(0)
    exporter.fail(0, PermanentExporterError("win", "HTTP 400: bad field"))
    # With an hour of backoff, only a pipeline that does not back off after a
    # dead letter delivers the rest before the deadline.
    drain = asyncio.create_task(pipeline(exporter, spool, registry, backoff=NEVER).drain(10))
    await eventually(lambda: len(exporter.started) == 3)
    head.set()
    delivered = await drain
    dead = [json.loads(line) for line in spool.dead_letter_path.read_text().splitlines()]
    assert (
        [[r["gpu"] for r in d["readings"]] for d in dead],
        exporter.earlier_failed,
        exporter.committed,
        exporter.stored,
        total(registry, "gpuid_export_failure_total"),
        delivered,
    ) == ([gpus(range(1))], [1, 2], [1, 2, 3, 4], gpus(range(1, 5)), 1, True)


async def test_an_exporter_without_max_in_flight_gets_one_write_at_a_time(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    exporter = OrderedExporter(max_in_flight=None)
    head = exporter.hold(0)
    drain = asyncio.create_task(pipeline(exporter, spooled(tmp_path, 5), registry).drain(30))
    await eventually(lambda: exporter.started == [0])
    alone = await never(lambda: len(exporter.started) > 1)
    head.set()
    assert await drain
    assert (alone, exporter.peak, exporter.committed) == (True, 1, list(range(5)))


async def test_drain_deadline_with_a_hanging_exporter_keeps_everything_in_the_spool(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    spool = spooled(tmp_path, 5)
    exporter = OrderedExporter(max_in_flight=3)
    for n in range(5):
        exporter.hold(n)  # never released
    delivered = await pipeline(exporter, spool, registry).drain(within=0.2)
    assert (
        delivered,
        spool.stats().readings,
        exporter.committed,
        sorted(exporter.cancelled),
        exporter.running,
    ) == (False, 5 * PER_BATCH, [], [0, 1, 2], set())


async def test_cancelling_run_cancels_the_writes_in_flight_and_acks_only_what_committed(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    spool = spooled(tmp_path, 5)
    exporter = OrderedExporter(max_in_flight=3)
    gates = [exporter.hold(n) for n in range(5)]
    run = asyncio.create_task(pipeline(exporter, spool, registry).run())
    await eventually(lambda: len(exporter.started) == 3)
    gates[0].set()
    # Batch 3 starts only once batch 0 is acked.
    await eventually(lambda: exporter.started == [0, 1, 2, 3])
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await eventually(lambda: not exporter.running)
    assert (
        sorted(exporter.cancelled),
        exporter.committed,
        attempts(spool),
        spool.stats().readings,
    ) == ([1, 2, 3], [0], [0, 0, 0, 0], 4 * PER_BATCH)


async def test_stop_lets_the_writes_in_flight_finish_and_delivers_the_rest(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    spool = spooled(tmp_path, 5)
    exporter = OrderedExporter(max_in_flight=3)
    gates = [exporter.hold(n) for n in range(3)]
    pipe = pipeline(exporter, spool, registry)
    run = asyncio.create_task(pipe.run())
    await eventually(lambda: len(exporter.started) == 3)
    pipe.stop()
    for gate in gates:
        gate.set()
    await asyncio.wait_for(run, 10)
    assert (exporter.committed, spool.stats().readings) == (list(range(5)), 0)


async def test_a_batch_that_fails_behind_the_head_holds_back_the_batches_after_it(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    exporter = OrderedExporter(max_in_flight=3)
    head = exporter.hold(0)
    second = exporter.hold(1)
    exporter.fail(1, ExporterError("win", "connection reset", error_type="connection"))
    drain = asyncio.create_task(pipeline(exporter, spooled(tmp_path, 5), registry).drain(30))
    await eventually(lambda: len(exporter.started) == 3)
    second.set()
    # Batch 1 has failed, and batch 2 behind it, while batch 0 is still open.
    await eventually(lambda: exporter.earlier_failed == [2])
    head.set()
    assert await drain
    # Batch 3 starts on the same line once batch 0 is acked, and must not
    # commit ahead of the failed batch 1: the line stops at its first failure.
    assert (exporter.committed, exporter.earlier_failed[:2]) == ([0, 1, 2, 3, 4], [2, 3])


async def test_a_head_stuck_past_its_retry_limit_is_given_up_and_nothing_commits_out_of_line(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    spool = spooled(tmp_path, 5)
    exporter = OrderedExporter(max_in_flight=3)
    for _ in range(4):  # three attempts, then once more after batch 1 went through
        exporter.fail(0, ExporterError("win", "HTTP 500", error_type="server"))
    pipe = DeliveryPipeline(
        exporter, spool, cluster="c", metrics=ExportMetrics(registry),
        config=DeliveryConfig(
            batch_size=PER_BATCH, flush_interval=0.01, backoff=FAST, max_attempts=3, max_age=0
        ),
    )  # fmt: skip
    assert await pipe.drain(10)
    dead = [json.loads(line) for line in spool.dead_letter_path.read_text().splitlines()]
    assert ([[r["gpu"] for r in d["readings"]] for d in dead], exporter.stored) == (
        [gpus(range(1))],
        gpus(range(1, 5)),
    )
    # Batch 1 proved the sink is up on a line of its own: the committed order is
    # that of the spool, less the stuck batch.
    assert exporter.committed == [1, 2, 3, 4]
