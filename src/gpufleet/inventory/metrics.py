"""Inventory export metrics: gpuid's names, plus the delivery pipeline's own."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


class ExportMetrics:
    """The metrics of delivering readings to exporters.

    gpuid's ``gpuid_export_*`` names are kept so existing dashboards work; the
    ``{exporter_type, cluster}`` labels replace gpuid's per-pod labels, which
    grew with the fleet. Counters count batch writes (export operations).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.success = Counter(
            "gpuid_export_success",
            "Batches of readings written to an exporter.",
            ["exporter_type", "cluster"],
            registry=reg,
        )
        self.failure = Counter(
            "gpuid_export_failure",
            "Failed attempts to write a batch of readings to an exporter.",
            ["exporter_type", "cluster", "error_type"],
            registry=reg,
        )
        self.duration = Histogram(
            "gpuid_export_duration_seconds",
            "Time to write one batch to an exporter, successful or not.",
            ["exporter_type", "cluster"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=reg,
        )
        self.health = Gauge(
            "gpuid_health_check_success",
            "1 when the exporter's last health check passed, else 0.",
            ["exporter_type"],
            registry=reg,
        )
        self.queue = Gauge(
            "gpufleet_delivery_queue_readings",
            "Readings accepted and not yet delivered (all of them are in the spool on disk).",
            ["exporter_type"],
            registry=reg,
        )
        self.spooled = Gauge(
            "gpufleet_delivery_spooled_readings",
            "Readings held in the spool because their exporter failed at least once.",
            ["exporter_type"],
            registry=reg,
        )
        self.dropped = Counter(
            "gpufleet_delivery_dropped",
            "Readings not delivered: refused or dropped by a full spool, or dead-lettered.",
            ["exporter_type", "reason"],
            registry=reg,
        )
        self.delivered = Counter(
            "gpufleet_delivery_delivered_readings",
            "Readings written to an exporter.",
            ["exporter_type"],
            registry=reg,
        )
