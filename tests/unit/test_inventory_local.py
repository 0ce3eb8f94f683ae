"""Local scan: machine identity from MACHINE_ID or DMI, and one reading per GPU."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

from gpufleet.gpu.model import DeviceList, FaultKind, GpuDevice, GpuFault
from gpufleet.inventory.delivery import DirectDelivery
from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.exporters.stdout import StdoutExporter
from gpufleet.inventory.local import machine_id_from_dmi, resolve_machine_id, scan_once
from gpufleet.inventory.reading import Reading


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
