"""The inventory reading: gpuid's schema, serial fallback, deterministic ids."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gpufleet.gpu.model import GpuDevice
from gpufleet.inventory.reading import (
    IDENTITY_FIELDS,
    Reading,
    batch_hash,
    format_time,
    readings_from_devices,
)

T0 = datetime(2026, 11, 24, 12, 30, 15, 123456, tzinfo=UTC)


def device(index: int = 0, serial: str | None = "1654922001234", **kw: object) -> GpuDevice:
    fields: dict[str, object] = {
        "index": index,
        "uuid": f"GPU-0000000{index}-aaaa-bbbb-cccc-000000000000",
        "serial": serial,
        "product_name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": f"00000000:{0x18 + index:02X}:00.0",
    }
    fields.update(kw)
    return GpuDevice(**fields)


def make(devices: list[GpuDevice]) -> list[Reading]:
    return readings_from_devices(
        devices, cluster="c1", node="n1", machine="i-1", source="nvml", read_time=T0
    )


def test_reading_has_the_gpuid_fields_in_order_then_ours() -> None:
    (reading,) = make([device()])
    assert list(reading.to_dict()) == [
        "cluster", "node", "machine", "source", "chassis", "gpu", "read_time",
        "uuid", "model", "pci_bus_id", "index",
    ]  # fmt: skip


def test_read_time_is_rfc3339_utc_with_z() -> None:
    local = T0.astimezone(timezone(timedelta(hours=-5)))
    assert format_time(local) == "2026-11-24T12:30:15.123Z"


def test_naive_read_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        format_time(datetime(2026, 1, 1))


def test_the_same_instant_formats_alike_in_any_zone_and_cached_or_not() -> None:
    # format_time is memoised; equal aware datetimes are one instant, so the
    # cache may answer for either zone, and a naive time is refused every time.
    zones = [UTC, timezone(timedelta(hours=9)), timezone(timedelta(hours=-5, minutes=-30))]
    texts = {format_time(T0.astimezone(zone)) for zone in zones for _ in range(2)}
    assert texts == {"2026-11-24T12:30:15.123Z"}
    later = T0 + timedelta(milliseconds=1)
    assert format_time(later) == "2026-11-24T12:30:15.124Z"
    for _ in range(2):
        with pytest.raises(ValueError, match="timezone-aware"):
            format_time(datetime(2026, 1, 1))


def test_gpu_is_the_board_serial() -> None:
    (reading,) = make([device(serial="1654922001234")])
    assert reading.gpu == "1654922001234"


@pytest.mark.parametrize("serial", [None, "", "N/A", "[N/A]", "Not Supported"])
def test_gpu_without_serial_is_kept_under_its_uuid(serial: str | None) -> None:
    (reading,) = make([device(serial=serial)])
    assert reading.gpu == reading.uuid


def test_gpu_without_serial_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        make([device(serial="N/A")])
    assert any("no serial" in r.getMessage() for r in caplog.records)


def test_chassis_is_empty_where_platform_has_none() -> None:
    (reading,) = make([device(chassis_serial="N/A")])
    assert reading.chassis == ""


def test_chassis_serial_is_carried() -> None:
    (reading,) = make([device(chassis_serial="1821424000042")])
    assert reading.chassis == "1821424000042"


def test_id_is_deterministic_for_the_same_observation() -> None:
    assert make([device()])[0].id == make([device()])[0].id


def test_id_differs_when_an_identifying_field_differs() -> None:
    (a,) = make([device()])
    (b,) = readings_from_devices(
        [device()], cluster="c1", node="n1", machine="i-2", source="nvml", read_time=T0
    )
    assert a.id != b.id


def test_dict_round_trips() -> None:
    (reading,) = make([device(chassis_serial="X1")])
    again = Reading.from_dict(reading.to_dict())
    assert again.to_dict() == reading.to_dict()


def test_batch_hash_is_the_same_for_a_replayed_batch_and_differs_otherwise() -> None:
    batch = make([device(0), device(1)])
    assert batch_hash(batch) == batch_hash(list(batch))
    assert batch_hash(batch) != batch_hash(batch[:1])


def test_id_is_the_sha256_of_the_identifying_fields_each_followed_by_a_separator() -> None:
    # Stored ids depend on this exact form: changing it would duplicate rows on replay.
    (reading,) = make([device()])
    fields = reading.to_dict()
    text = "".join(f"{fields[name]}\x1f" for name in IDENTITY_FIELDS)
    assert reading.id == hashlib.sha256(text.encode()).hexdigest()
