"""Local mode: read the GPUs of this machine and export one reading per GPU."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gpufleet.gpu.model import GpuFault
from gpufleet.gpu.source import GpuSource
from gpufleet.inventory.delivery import Delivery, DeliveryPipeline
from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.reading import Reading, readings_from_devices
from gpufleet.inventory.spool import SpoolError

log = logging.getLogger(__name__)

UNKNOWN_MACHINE = "unknown"

# DMI files in the order they identify a machine best. product_uuid is the VM's
# or host's SMBIOS UUID (it matches the Node's systemUUID); board_serial is a
# fallback on bare metal where the UUID is blank.
_DMI_FILES = ("product_uuid", "board_serial")
_DMI_PLACEHOLDERS = {
    "",
    "none",
    "not specified",
    "default string",
    "to be filled by o.e.m.",
    "00000000-0000-0000-0000-000000000000",
    "03000200-0400-0500-0006-000700080009",
}


def machine_id_from_dmi(dmi_dir: Path) -> str | None:
    """The machine identity from DMI, or ``None`` when it is unreadable or blank."""
    for name in _DMI_FILES:
        path = dmi_dir / name
        try:
            value = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as exc:
            log.debug("cannot read DMI identity", extra={"path": str(path), "error": str(exc)})
            continue
        if value.lower() not in _DMI_PLACEHOLDERS:
            return value.lower() if name == "product_uuid" else value
    return None


def resolve_machine_id(configured: str | None, dmi_dir: Path) -> str:
    """``MACHINE_ID`` if set, else the DMI identity, else ``unknown`` (with a warning)."""
    if configured:
        return configured
    found = machine_id_from_dmi(dmi_dir)
    if found is not None:
        return found
    log.warning(
        "no machine identity: set MACHINE_ID or make DMI readable",
        extra={"dmi_dir": str(dmi_dir), "machine": UNKNOWN_MACHINE},
    )
    return UNKNOWN_MACHINE


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What one local scan read and where it went."""

    readings: tuple[Reading, ...]
    faults: tuple[GpuFault, ...]
    failed_exporters: tuple[str, ...]
    """Exporters that did not take the readings: a local sink failed, a full spool, a
    batch refused (dead-lettered) or a configuration error."""
    undelivered: dict[str, int] = field(default_factory=dict)
    """Per exporter, readings accepted into its spool but not yet delivered."""
    errors: dict[str, str] = field(default_factory=dict)
    """Per failed exporter, one line saying why."""
    misconfigured: tuple[str, ...] = ()
    """The failed exporters whose failure is a configuration error (never retried)."""


async def scan_once(
    source: GpuSource,
    deliveries: Sequence[Delivery],
    *,
    cluster: str,
    node: str,
    machine: str,
    source_label: str,
    delivery_timeout: float | None = 30.0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ScanResult:
    """Enumerate the GPUs once, hand the readings to every exporter, and wait.

    A GPU that cannot be read is logged and reported in the result; it never stops
    the readings of the others. Every exporter gets the readings at once, so
    one that fails, or waits (a locked SQLite file), holds up none of the
    others; a failure is logged and reported with its reason, and so is a
    batch a remote sink refused (dead-lettered) or a configuration error its
    pipeline will not retry. Remote exporters get up to
    ``delivery_timeout`` seconds (together, not each); what they have not taken
    by then stays in their spool for the next run. With ``delivery_timeout=None``
    (the agent, whose pipelines run in the background) nothing is waited for.
    """
    listing = await asyncio.to_thread(source.devices)
    for fault in listing.faults:
        log.error(
            "GPU cannot be read",
            extra={
                "node": node,
                "index": fault.index,
                "uuid": fault.uuid,
                "fault": fault.kind,
                "error": fault.message,
            },
        )
    readings = readings_from_devices(
        listing.devices,
        cluster=cluster,
        node=node,
        machine=machine,
        source=source_label,
        read_time=clock(),
    )
    errors: dict[str, str] = {}
    misconfigured: list[str] = []
    # All at once: a local sink waiting on a lock holds up no other exporter.
    submitted = await asyncio.gather(
        *(d.submit(readings) for d in deliveries), return_exceptions=True
    )
    accepted = []
    for delivery, outcome in zip(deliveries, submitted, strict=True):
        if isinstance(outcome, ExporterError | SpoolError):
            log.error("export failed", extra={"exporter": delivery.name, "error": str(outcome)})
            errors[delivery.name] = str(outcome)
            if isinstance(outcome, ExporterError) and outcome.is_config:
                misconfigured.append(delivery.name)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            accepted.append(delivery)
    undelivered: dict[str, int] = {}
    if delivery_timeout is not None:
        # Every spool is drained at once, so one slow sink does not eat another's time.
        drained = await asyncio.gather(*(d.drain(delivery_timeout) for d in accepted))
        for delivery, ok in zip(accepted, drained, strict=True):
            if delivery.config_error is not None:
                errors[delivery.name] = f"{delivery.config_error} (configuration: not retried)"
                misconfigured.append(delivery.name)
            elif delivery.refused:
                errors[delivery.name] = _refused(delivery)
            if not ok:
                undelivered[delivery.name] = delivery.stats().readings
    failed = [d.name for d in deliveries if d.name in errors]
    log.info(
        "scan complete",
        extra={
            "node": node,
            "machine": machine,
            "gpus": len(readings),
            "faults": len(listing.faults),
            "failed_exporters": failed,
            "undelivered": undelivered,
        },
    )
    return ScanResult(
        tuple(readings), listing.faults, tuple(failed), undelivered, errors, tuple(misconfigured)
    )


def _refused(delivery: Delivery) -> str:
    """One line for the batches an exporter refused: how many readings, why, and where they are."""
    count = sum(r.readings for r in delivery.refused)
    where = (
        f", now in the dead-letter file {delivery.spool.dead_letter_path}"
        if isinstance(delivery, DeliveryPipeline)
        else ""
    )
    return f"{delivery.refused[-1].reason}; {count} reading(s) refused{where}"
