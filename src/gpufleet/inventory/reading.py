"""The inventory reading: one physical GPU seen in one machine at one time.

The first seven fields are gpuid's record (``cluster, node, machine, source,
chassis, gpu, read_time``), so gpuid users keep their queries. The rest pin the
GPU down further (``uuid`` is the only key unique per die on GB200 boards, where
two GPUs share a board serial).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gpufleet.gpu.model import GpuDevice

log = logging.getLogger(__name__)

# Fields that identify a reading. Two readings equal on these are the same
# observation, so their id (and every sink's unique key) is the same.
IDENTITY_FIELDS = ("cluster", "node", "machine", "source", "chassis", "gpu", "uuid", "read_time")

# nvidia-smi and NVML print these where a board has no readable serial.
_NO_SERIAL = {"", "n/a", "[n/a]", "not supported", "[not supported]", "unknown error"}


@functools.lru_cache(maxsize=4096)
def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with millisecond precision and ``Z``; sorts as text."""
    # Cached: it runs for every reading's id and JSON, and the readings of one
    # scan share a handful of read times. Equal aware datetimes are the same
    # instant, so they format alike whatever their zone; naive ones raise
    # (an exception is never cached).
    if value.tzinfo is None:
        raise ValueError("read_time must be timezone-aware")
    # isoformat is about twice as fast as strftime.
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse what ``format_time`` wrote (and any RFC 3339 timestamp)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Reading:
    """One GPU observed in one machine; the unit every exporter writes."""

    cluster: str
    node: str
    machine: str
    source: str
    chassis: str
    """Chassis serial (GB200 NVL racks); empty where the platform has none."""
    gpu: str
    """The board serial, or the UUID when the GPU reports no serial."""
    read_time: datetime
    uuid: str
    model: str
    pci_bus_id: str
    index: int

    @property
    def id(self) -> str:
        """A deterministic id: the SHA-256 of the identifying fields."""
        # Each field followed by a unit separator; one encode and one update,
        # since every exporter and the spool compute this per reading.
        text = "\x1f".join(
            (self.cluster, self.node, self.machine, self.source, self.chassis, self.gpu,
             self.uuid, format_time(self.read_time), "")
        )  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape, field order as in gpuid, ``read_time`` as RFC 3339."""
        return {
            "cluster": self.cluster,
            "node": self.node,
            "machine": self.machine,
            "source": self.source,
            "chassis": self.chassis,
            "gpu": self.gpu,
            "read_time": format_time(self.read_time),
            "uuid": self.uuid,
            "model": self.model,
            "pci_bus_id": self.pci_bus_id,
            "index": self.index,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reading:
        """Inverse of ``to_dict``."""
        return cls(
            cluster=str(data["cluster"]),
            node=str(data["node"]),
            machine=str(data["machine"]),
            source=str(data["source"]),
            chassis=str(data["chassis"]),
            gpu=str(data["gpu"]),
            read_time=parse_time(str(data["read_time"])),
            uuid=str(data["uuid"]),
            model=str(data["model"]),
            pci_bus_id=str(data["pci_bus_id"]),
            index=int(data["index"]),
        )


def batch_hash(batch: Sequence[Reading]) -> str:
    """A deterministic id of a batch: the SHA-256 of its reading ids, in order.

    The spool replays a batch as the same readings in the same order, so a
    replayed batch has the same hash (the S3 key and the HTTP Idempotency-Key).
    """
    digest = hashlib.sha256()
    for reading in batch:
        digest.update(reading.id.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def has_serial(serial: str | None) -> bool:
    """Whether ``serial`` is a real serial rather than a driver placeholder."""
    return serial is not None and serial.strip().lower() not in _NO_SERIAL


def readings_from_devices(
    devices: Iterable[GpuDevice],
    *,
    cluster: str,
    node: str,
    machine: str,
    source: str,
    read_time: datetime,
) -> list[Reading]:
    """Turn enumerated GPUs into one reading each.

    A GPU without a usable serial is kept, identified by its UUID, and a warning
    is logged: dropping it would hide a GPU from the inventory.
    """
    readings = []
    for device in devices:
        if has_serial(device.serial):
            gpu = str(device.serial).strip()
        else:
            gpu = device.uuid
            log.warning(
                "GPU reports no serial; using its UUID as the GPU id",
                extra={"node": node, "index": device.index, "uuid": device.uuid},
            )
        chassis = device.chassis_serial if has_serial(device.chassis_serial) else ""
        readings.append(
            Reading(
                cluster=cluster,
                node=node,
                machine=machine,
                source=source,
                chassis=str(chassis).strip(),
                gpu=gpu,
                read_time=read_time,
                uuid=device.uuid,
                model=device.product_name,
                pci_bus_id=device.pci_bus_id,
                index=device.index,
            )
        )
    return readings
