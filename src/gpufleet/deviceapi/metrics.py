"""Prometheus metrics of the device API server.

Request counts and latencies are recorded as requests finish; the GPU and
watcher gauges and the eviction counter are read from the store at scrape
time by a collector, so they can never drift from the store's own counts.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["PREFIX", "DeviceApiMetrics", "StoreStats"]

PREFIX = "gpufleet_deviceapi"

# Node-local calls over a unix socket: most finish well under a millisecond.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


class StoreStats(Protocol):
    """What the collector reads from the store at scrape time."""

    @property
    def gpu_count(self) -> int:
        """GPUs stored now."""
        ...

    @property
    def watcher_count(self) -> int:
        """Open watchers now."""
        ...

    @property
    def evicted_total(self) -> int:
        """Watchers closed for falling behind, since start."""
        ...


_FROZEN_HELP = "Start-up objects kept out of the cyclic garbage collector's scans (gc.freeze)."


class _StoreCollector(Collector):
    """Yields the store's gauges and eviction counter from a snapshot at scrape time."""

    def __init__(self, store: StoreStats) -> None:
        self._store = store

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            f"{PREFIX}_gpus", "GPUs registered in the store.", value=self._store.gpu_count
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_watchers", "Open watch streams.", value=self._store.watcher_count
        )
        yield CounterMetricFamily(
            f"{PREFIX}_watchers_evicted",
            "Watchers closed because they fell behind their bounded queue.",
            value=self._store.evicted_total,
        )
        frozen = gc.get_freeze_count()
        yield GaugeMetricFamily(f"{PREFIX}_gc_frozen_objects", _FROZEN_HELP, value=frozen)

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        # Describing without collecting keeps registration from touching the store.
        yield GaugeMetricFamily(f"{PREFIX}_gpus", "GPUs registered in the store.")
        yield GaugeMetricFamily(f"{PREFIX}_watchers", "Open watch streams.")
        yield CounterMetricFamily(
            f"{PREFIX}_watchers_evicted",
            "Watchers closed because they fell behind their bounded queue.",
        )
        yield GaugeMetricFamily(f"{PREFIX}_gc_frozen_objects", _FROZEN_HELP)


class DeviceApiMetrics:
    """The server's metrics, registered in `registry` (a fresh one per server in tests)."""

    def __init__(self, registry: CollectorRegistry, store: StoreStats) -> None:
        self.registry = registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Device API requests by method and gRPC status code.",
            ("method", "code"),
            registry=registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Device API request latency (for watches: the stream's lifetime).",
            ("method",),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.watch_events = Counter(
            f"{PREFIX}_watch_events",
            "Watch events sent to clients, by event type.",
            ("type",),
            registry=registry,
        )
        self.watch_messages = Counter(
            f"{PREFIX}_watch_messages",
            "Watch stream messages sent (a WatchGpuBatches message carries several events).",
            registry=registry,
        )
        registry.register(_StoreCollector(store))
        self._watch_event_children = {
            kind: self.watch_events.labels(type=kind)
            for kind in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")
        }

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one finished request and its latency."""
        self.requests.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(seconds)

    def watch_event(self, kind: str, count: int = 1) -> None:
        """Count `count` watch events of one type sent (events, not stream messages)."""
        child = self._watch_event_children.get(kind)
        if child is None:
            child = self.watch_events.labels(type=kind)
        child.inc(count)
