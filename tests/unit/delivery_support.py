"""The delivery pipeline tests' set-up: readings, a scripted exporter, a spool in a temp dir."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpufleet.core.retry import Backoff
from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.reading import Reading, batch_hash
from gpufleet.inventory.spool import Spool

__all__ = ["FAST", "T0", "RecordingExporter", "readings", "spool_at"]

T0 = datetime(2026, 11, 24, tzinfo=UTC)
FAST = Backoff(initial=0.001, factor=2.0, cap=0.005, jitter=0.0)


def readings(n: int, start: int = 0) -> list[Reading]:
    return [
        Reading(
            cluster="c", node="n", machine="m", source="nvml", chassis="", gpu=f"S{i:06d}",
            read_time=T0 + timedelta(seconds=i), uuid=f"GPU-{i}", model="NVIDIA L4",
            pci_bus_id="00000000:01:00.0", index=0,
        )
        for i in range(start, start + n)
    ]  # fmt: skip


class RecordingExporter:
    """An exporter that keeps what it is given and fails as scripted."""

    name = "rec"

    def __init__(self, failures: Sequence[Exception] = ()) -> None:
        self.failures = list(failures)
        self.batches: list[list[Reading]] = []
        self.attempts: list[str] = []

    async def write(self, batch: Sequence[Reading]) -> None:
        self.attempts.append(batch_hash(batch))
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(list(batch))

    async def health(self) -> None:
        if self.failures:
            raise ExporterError(self.name, "down", error_type="connection")

    async def close(self) -> None:
        pass

    @property
    def delivered(self) -> list[str]:
        return [r.gpu for batch in self.batches for r in batch]


def spool_at(tmp_path: Path, **kw: object) -> Spool:
    return Spool(tmp_path / "rec.spool", max_bytes=int(kw.pop("max_bytes", 10_000_000)), **kw)  # type: ignore[arg-type]
