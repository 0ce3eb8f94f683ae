"""How the PostgreSQL exporter cuts a batch into parallel transactions (no server needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.postgres.exporter import (
    MIN_PART,
    distinct_placements,
    raise_worst,
    split_batch,
)
from gpufleet.inventory.exporters.postgres.settings import PostgresSettings
from gpufleet.inventory.reading import Reading

T0 = datetime(2026, 11, 24, tzinfo=UTC)


def reading(gpu: int, sweep: int = 0, machine: str = "i-a") -> Reading:
    return Reading(
        cluster="c1", node=f"node-{gpu // 8}", machine=machine, source="nvml", chassis="",
        gpu=f"SN-{gpu}", read_time=T0 + timedelta(minutes=5 * sweep), uuid=f"GPU-{gpu}",
        model="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:18:00.0", index=gpu % 8,
    )  # fmt: skip


def test_a_batch_is_cut_into_at_most_parallelism_parts_holding_every_reading_once() -> None:
    batch = [reading(g) for g in range(500)]
    parts = split_batch(batch, 2)
    assert len(parts) == 2
    assert sorted(r.id for part in parts for r in part) == sorted(r.id for r in batch)
    # A hash split: neither part is starved.
    assert all(len(part) > 100 for part in parts)


def test_every_reading_of_one_gpu_lands_in_the_same_part() -> None:
    # Three sweeps of 200 GPUs, two machines for some: one placement never
    # spans two parts, so two parts never wait on each other's row locks.
    batch = [reading(g, sweep, "i-a" if g % 3 else "i-b") for sweep in range(3) for g in range(200)]
    parts = split_batch(batch, 4)
    assert len(parts) == 4
    owner = {}
    for n, part in enumerate(parts):
        for r in part:
            assert owner.setdefault(r.gpu, n) == n


@pytest.mark.parametrize(
    ("size", "parallelism", "parts"),
    [
        (MIN_PART * 2 - 1, 2, 1),  # too small to be worth a second commit
        (MIN_PART * 2, 2, 2),
        (MIN_PART * 3, 8, 3),  # no part below MIN_PART's share
        (500, 1, 1),
        (0, 2, 1),
    ],
)
def test_small_batches_are_not_split(size: int, parallelism: int, parts: int) -> None:
    batch = [reading(g) for g in range(size)]
    got = split_batch(batch, parallelism)
    assert len(got) == parts
    assert sum(map(len, got)) == size


def test_write_parallelism_never_exceeds_the_pool() -> None:
    common = {"postgres_host": "db", "postgres_db": "inv", "postgres_user": "u"}
    assert PostgresSettings(**common).write_parts == 1  # batches overlap instead (in flight)
    assert PostgresSettings(**common, postgres_write_parallelism=2).write_parts == 2
    assert (
        PostgresSettings(**common, postgres_write_parallelism=2, postgres_pool_max=1).write_parts
        == 1
    )
    assert PostgresSettings(**common, postgres_write_parallelism=3).write_parts == 3
    assert (
        PostgresSettings(**common, postgres_write_parallelism=8, postgres_pool_max=4).write_parts
        == 4
    )


def test_distinct_placements_tells_a_gpu_seen_twice() -> None:
    assert distinct_placements([reading(1), reading(2)])
    assert not distinct_placements([reading(1), reading(1, sweep=1)])
    assert distinct_placements([reading(1, machine="i-a"), reading(1, machine="i-b")])


def test_a_retryable_failure_of_one_part_wins_over_a_permanent_one() -> None:
    # A committed or refused part is harmless when the whole batch is sent
    # again, so the batch is retried rather than dead-lettered.
    refused = PermanentExporterError("postgres", "bad value")
    down = ExporterError("postgres", "server down", error_type="connection")
    with pytest.raises(ExporterError) as caught:
        raise_worst([refused, down])
    assert caught.value is down
    with pytest.raises(PermanentExporterError) as permanent:
        raise_worst([refused])
    assert permanent.value is refused
    raise_worst([])  # every part committed


def test_a_failure_that_is_not_an_exporter_error_is_raised_as_it_is() -> None:
    bug = KeyError("bug")
    with pytest.raises(KeyError):
        raise_worst([PermanentExporterError("postgres", "bad"), bug])
