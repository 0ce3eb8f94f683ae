"""Local scan: machine identity from MACHINE_ID or DMI, and one reading per GPU."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpufleet.gpu.model import DeviceList, FaultKind, GpuDevice, GpuFault
from gpufleet.inventory.direct import DirectDelivery
from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.exporters.sqlite import SqliteExporter, connect
from gpufleet.inventory.exporters.stdout import StdoutExporter
from gpufleet.inventory.local import ScanResult, machine_id_from_dmi, resolve_machine_id, scan_once
from gpufleet.inventory.reading import Reading
from tests.polling import eventually


def test_machine_id_prefers_the_configured_value(tmp_path: Path) -> None:
    (tmp_path / "product_uuid").write_text("EC2A1B2C-0000-1111-2222-333344445555\n")
    assert resolve_machine_id("i-0abc", tmp_path) == "i-0abc"


def test_machine_id_comes_from_dmi_product_uuid_lower_cased(tmp_path: Path) -> None:
    (tmp_path / "product_uuid").write_text("EC2A1B2C-0000-1111-2222-333344445555\n")
    assert machine_id_from_dmi(tmp_path) == "ec2a1b2c-0000-1111-2222-333344445555"


def test_machine_id_falls_back_to_board_serial_when_uuid_is_a_placeholder(tmp_path: Path) -> None:
    (tmp_path / "product_uuid").write_text("00000000-0000-0000-0000-000000000000\n")
    (tmp_path / "board_serial").write_text("BSN-4711\n")
    assert machine_id_from_dmi(tmp_path) == "BSN-4711"


def test_machine_id_is_unknown_without_dmi(tmp_path: Path) -> None:
    assert resolve_machine_id(None, tmp_path / "missing") == "unknown"


class FixedSource:
    """A GpuSource with fixed devices; the scan's collaborators are injected."""

    def __init__(self, listing: DeviceList) -> None:
        self.listing = listing

    def devices(self) -> DeviceList:
        return self.listing

    def close(self) -> None:
        pass


class BrokenExporter:
    name = "broken"

    async def write(self, batch: object) -> None:
        raise ExporterError(self.name, "down")

    async def health(self) -> None:
        raise ExporterError(self.name, "down")

    async def close(self) -> None:
        pass


LISTING = DeviceList(
    devices=(
        GpuDevice(0, "GPU-a", "S-A", "NVIDIA L4", "00000000:01:00.0"),
        GpuDevice(2, "GPU-c", "S-C", "NVIDIA L4", "00000000:03:00.0"),
    ),
    faults=(GpuFault(1, FaultKind.LOST, "GPU is lost", uuid="GPU-b"),),
)


async def run_scan(*exporters: object) -> object:
    return await scan_once(
        FixedSource(LISTING),
        [DirectDelivery(e) for e in exporters],
        cluster="c", node="n", machine="m", source_label="nvml",
        clock=lambda: datetime(2026, 11, 24, tzinfo=UTC),
    )  # fmt: skip


async def test_lost_gpu_does_not_stop_the_readings_of_the_others() -> None:
    out = io.StringIO()
    await run_scan(StdoutExporter(out))
    lines = [Reading.from_dict(json.loads(line)) for line in out.getvalue().splitlines()]
    assert [r.uuid for r in lines] == ["GPU-a", "GPU-c"]


async def test_failing_exporter_does_not_starve_the_others() -> None:
    out = io.StringIO()
    result = await run_scan(BrokenExporter(), StdoutExporter(out))
    assert (result.failed_exporters, len(out.getvalue().splitlines())) == (("broken",), 2)


# --- one local sink that cannot write holds up no other ---------------------------------


def opening_sqlite(db: Path, **options: float) -> DirectDelivery:
    return DirectDelivery.opening("sqlite", lambda: SqliteExporter(db, **options))


async def test_an_sqlite_file_that_cannot_be_opened_fails_alone(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = io.StringIO()
    result = await scan_once(
        FixedSource(LISTING),
        [opening_sqlite(blocker / "inv.db"), DirectDelivery(StdoutExporter(out))],
        cluster="c", node="n", machine="m", source_label="nvml",
    )  # fmt: skip
    assert (result.failed_exporters, len(out.getvalue().splitlines())) == (("sqlite",), 2)
    assert "cannot open" in result.errors["sqlite"]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection, holding an exclusive write lock on ``tmp_path/inv.db``."""
    connect(tmp_path / "inv.db").close()
    conn = sqlite3.connect(tmp_path / "inv.db", isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    yield conn
    conn.close()


def scan_into(out: io.StringIO, db: Path, busy_timeout: float) -> Awaitable[ScanResult]:
    return scan_once(
        FixedSource(LISTING),
        # sqlite first: the order of the exporters must not matter.
        [opening_sqlite(db, busy_timeout=busy_timeout), DirectDelivery(StdoutExporter(out))],
        cluster="c", node="n", machine="m", source_label="nvml",
    )  # fmt: skip


async def test_stdout_gets_its_readings_while_sqlite_waits_for_a_lock(
    holder: sqlite3.Connection, tmp_path: Path
) -> None:
    out = io.StringIO()
    scan = asyncio.create_task(scan_into(out, tmp_path / "inv.db", busy_timeout=60))
    try:
        await eventually(lambda: len(out.getvalue().splitlines()) == 2, limit=20)
    finally:
        holder.execute("ROLLBACK")  # sqlite's wait ends too, and the scan with it
        result = await asyncio.wait_for(scan, 60)
    assert result.failed_exporters == ()


async def test_a_locked_sqlite_file_is_reported_and_stdout_still_gets_the_readings(
    holder: sqlite3.Connection, tmp_path: Path
) -> None:
    out = io.StringIO()
    result = await scan_into(out, tmp_path / "inv.db", busy_timeout=0.2)
    assert (result.failed_exporters, len(out.getvalue().splitlines())) == (("sqlite",), 2)
    assert "locked" in result.errors["sqlite"]
