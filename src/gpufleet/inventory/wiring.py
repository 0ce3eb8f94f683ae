"""Build deliveries from settings: a spooled pipeline per remote exporter."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from gpufleet.core.errors import GpufleetError
from gpufleet.core.http import HealthServer
from gpufleet.core.retry import Backoff
from gpufleet.core.signals import stop_on_signals
from gpufleet.inventory.config import DeliverySettings, ExportSettings
from gpufleet.inventory.delivery import Delivery, DeliveryConfig, DeliveryPipeline
from gpufleet.inventory.direct import DirectDelivery
from gpufleet.inventory.exporters.base import REMOTE_EXPORTERS, make_exporter
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool

log = logging.getLogger(__name__)


def delivery_config(settings: DeliverySettings) -> DeliveryConfig:
    """The pipeline's batching and retry knobs from the settings."""
    cap = settings.retry_max_backoff
    return DeliveryConfig(
        batch_size=settings.batch_size,
        flush_interval=settings.flush_interval,
        backoff=Backoff(initial=min(0.5, cap), factor=2.0, cap=cap),
        max_attempts=settings.retry_max_attempts,
        max_age=settings.retry_max_age,
    )


def open_delivery(
    kind: str,
    settings: ExportSettings,
    metrics: ExportMetrics | None = None,
    *,
    open_local_on_first_write: bool = False,
) -> Delivery:
    """The exporter ``kind``, behind a spool when it is remote.

    Each remote exporter has its own spool file ``SPOOL_DIR/<kind>.spool``, so
    one sink's outage never holds back another's readings. With
    ``open_local_on_first_write`` (the one-shot scan) a local exporter is
    opened on its first write, in a thread, so a file it cannot open (or must
    wait for) fails or holds up that exporter alone; a long-running command
    opens it now and fails at start instead.
    """
    if kind not in REMOTE_EXPORTERS:
        if open_local_on_first_write:
            return DirectDelivery.opening(
                kind, functools.partial(make_exporter, kind, sqlite_path=settings.sqlite_path)
            )
        return DirectDelivery(make_exporter(kind, sqlite_path=settings.sqlite_path))
    exporter = make_exporter(kind, sqlite_path=settings.sqlite_path)
    spool = Spool(
        settings.spool_dir / f"{kind}.spool",
        max_bytes=settings.spool_max_bytes,
        full_policy=settings.spool_full_policy,
    )
    # A one-shot scan has no /metrics; its own registry keeps the global one clean.
    return DeliveryPipeline(
        exporter,
        spool,
        cluster=settings.cluster_name,
        metrics=metrics or ExportMetrics(CollectorRegistry()),
        config=delivery_config(settings),
    )


async def close_deliveries(deliveries: Sequence[Delivery]) -> None:
    """Close every exporter and spool; one failing close does not skip the others."""
    for delivery in deliveries:
        try:
            await delivery.close()
        except Exception as exc:
            log.warning(
                "closing exporter failed", extra={"exporter": delivery.name, "error": str(exc)}
            )


@dataclass
class Interruption:
    """Which signal, if any, interrupted a one-shot command."""

    signum: int | None = None

    @property
    def signal_name(self) -> str:
        """``SIGINT``, ``SIGTERM``; empty when no signal came."""
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextlib.contextmanager
def interrupt_deliveries_on_signals(deliveries: Sequence[Delivery]) -> Iterator[Interruption]:
    """On SIGTERM or SIGINT, stop delivering at once: the spools keep the rest.

    The writes in flight are cancelled, so Ctrl-C ends the command now rather
    than after the exporter's own timeout; the yielded ``Interruption`` says
    which signal came.
    """
    interruption = Interruption()

    def stop(signum: int) -> None:
        interruption.signum = signum
        log.warning(
            "signal received; leaving undelivered readings in the spool",
            extra={"signal": signal.Signals(signum).name},
        )
        for delivery in deliveries:
            delivery.interrupt()

    with stop_on_signals(stop):
        yield interruption


def synthetic_reading(settings: ExportSettings, node: str) -> Reading:
    """The reading ``export-test`` sends: plainly marked, easy to find and delete."""
    return Reading(
        cluster=settings.cluster_name,
        node=node,
        machine="gpufleet-export-test",
        source="gpufleet-export-test",
        chassis="",
        gpu="GPUFLEET-EXPORT-TEST",
        read_time=datetime.now(UTC),
        uuid="GPU-00000000-0000-0000-0000-000000000000",
        model="gpufleet export-test",
        pci_bus_id="00000000:00:00.0",
        index=0,
    )


async def run_export_test(settings: ExportSettings, node: str) -> list[tuple[str, str | None]]:
    """Health-check and write one synthetic reading to each exporter, directly.

    Returns ``(exporter, None)`` on success and ``(exporter, error)`` with the
    exact failure otherwise; one exporter failing does not skip the others.
    """
    results: list[tuple[str, str | None]] = []
    for kind in settings.exporter_type:
        try:
            exporter = make_exporter(kind, sqlite_path=settings.sqlite_path)
        except GpufleetError as exc:
            results.append((kind, str(exc)))
            continue
        try:
            await exporter.health()
            await exporter.write([synthetic_reading(settings, node)])
        except Exception as exc:  # the operator wants the exact failure, whatever it is
            results.append((kind, f"{type(exc).__name__}: {exc}"))
        else:
            results.append((kind, None))
        finally:
            with contextlib.suppress(Exception):
                await exporter.close()
    return results


def add_readiness_checks(server: HealthServer, deliveries: Sequence[Delivery]) -> None:
    """Make ``/readyz`` follow each exporter's health check (``exporter:<name>``)."""
    for delivery in deliveries:
        if isinstance(delivery, DeliveryPipeline):
            server.add_readiness_check(f"exporter:{delivery.name}", delivery.check_health)
