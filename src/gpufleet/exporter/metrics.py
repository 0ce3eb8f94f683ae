"""Render a `Snapshot` as Prometheus metric families (the nvitop-exporter names).

`SnapshotMetrics` is a custom Collector (client_python's `registry.Collector`):
at scrape time it yields families built from the latest snapshot and reads
nothing else. The families of one snapshot are built once, on its first
scrape, and served again to every later scrape of the same snapshot.

Units: memory in **bytes** (nvitop-exporter uses MiB; bytes are Prometheus's
base unit), temperature in °C, power in W, clocks in MHz, utilization in
percent (0-100).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufleet.exporter.snapshot import DeviceState, Owner, ProcessState, Snapshot

__all__ = [
    "DEFAULT_PROCESS_LABELS",
    "GPU_LABELS",
    "PROCESS_LABEL_CHOICES",
    "RenderOptions",
    "SnapshotMetrics",
]

log = logging.getLogger(__name__)

GPU_LABELS = ("hostname", "index", "devicename", "uuid")
"""The labels of every GPU-level series."""
OWNER_LABELS = ("pod", "namespace", "container")
"""Added to GPU-level series: the container the kubelet allocated the device to, or empty."""
PROCESS_LABEL_CHOICES = ("pid", "username", "pod_name", "pod_namespace", "container_name")
"""Process labels `--process-labels` may pick, on top of the GPU labels."""
DEFAULT_PROCESS_LABELS = PROCESS_LABEL_CHOICES


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """Cardinality controls: which process labels, whether ``process_info``, and a series cap."""

    process_labels: tuple[str, ...] = DEFAULT_PROCESS_LABELS
    """Without ``pid``, process series are summed per remaining label set (per container)."""
    process_info: bool = False
    """Emit ``process_info{command}`` (1 per process; a count when not per PID)."""
    max_series: int = 50_000
    """Process series past this many series in all are left out, and that is logged."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.process_labels if name not in PROCESS_LABEL_CHOICES]
        if unknown:
            raise ValueError(
                f"unknown process label(s) {', '.join(unknown)}; "
                f"choose from {', '.join(PROCESS_LABEL_CHOICES)}"
            )
        if self.max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {self.max_series}")


@dataclass(frozen=True, slots=True)
class _GpuMetric:
    name: str
    help: str
    value: Callable[[DeviceState], float | None]


def _sample(attribute: str) -> Callable[[DeviceState], float | None]:
    def read(state: DeviceState) -> float | None:
        if state.sample is None:
            return None
        value = getattr(state.sample, attribute)
        return None if value is None else float(value)

    return read


def _memory_total(state: DeviceState) -> float | None:
    return None if state.memory_total_bytes is None else float(state.memory_total_bytes)


_GPU_GAUGES = (
    _GpuMetric("gpu_utilization", "GPU utilization (%).", _sample("gpu_utilization_percent")),
    _GpuMetric(
        "gpu_memory_utilization",
        "GPU memory bandwidth utilization (%).",
        _sample("memory_utilization_percent"),
    ),
    _GpuMetric("gpu_memory_total", "GPU memory total (bytes).", _memory_total),
    _GpuMetric("gpu_memory_used", "GPU memory used (bytes).", _sample("memory_used_bytes")),
    _GpuMetric("gpu_memory_free", "GPU memory free (bytes).", _sample("memory_free_bytes")),
    _GpuMetric("gpu_temperature", "GPU temperature (C).", _sample("temperature_celsius")),
    _GpuMetric("gpu_power_usage", "GPU power usage (W).", _sample("power_usage_watts")),
    _GpuMetric("gpu_power_limit", "GPU enforced power limit (W).", _sample("power_limit_watts")),
    _GpuMetric("gpu_clock_sm", "GPU SM clock (MHz).", _sample("clock_sm_mhz")),
    _GpuMetric("gpu_clock_memory", "GPU memory clock (MHz).", _sample("clock_memory_mhz")),
)


class _Budget:
    """Counts series against the cap; remembers how many were left out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.dropped = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            self.dropped += 1
            return False
        self.used += 1
        return True


class SnapshotMetrics(Collector):
    """A Collector that renders the snapshot `latest()` returns, and only that."""

    def __init__(
        self, latest: Callable[[], Snapshot | None], options: RenderOptions | None = None
    ) -> None:
        self._latest = latest
        self._options = options if options is not None else RenderOptions()
        self._lock = threading.Lock()
        self._rendered_for: Snapshot | None = None
        self._rendered: Sequence[Metric] = ()
        self.renders = 0
        """How many snapshots were turned into families (one per snapshot, not per scrape)."""

    def collect(self) -> Iterator[Metric]:
        """The families of the latest snapshot (none before the first collection)."""
        snapshot = self._latest()
        if snapshot is None:
            return iter(())
        with self._lock:
            if snapshot is not self._rendered_for:
                self._rendered = self._render(snapshot)
                self._rendered_for = snapshot
                self.renders += 1
            return iter(self._rendered)

    def describe(self) -> Iterable[Metric]:
        # Registering must not call collect(): there may be no snapshot yet.
        return ()

    # --- rendering ---------------------------------------------------------------

    def _render(self, snapshot: Snapshot) -> list[Metric]:
        budget = _Budget(self._options.max_series)
        families: list[Metric] = []
        families.extend(self._self_metrics(snapshot, budget))
        families.extend(self._gpu_metrics(snapshot, budget))
        families.extend(self._process_metrics(snapshot, budget))
        capped = GaugeMetricFamily(
            "gpufleet_exporter_series_capped",
            "Series left out of the latest snapshot because of the series cap.",
            value=budget.dropped,
        )
        families.append(capped)
        if budget.dropped:
            log.warning(
                "series cap hit: process series left out",
                extra={"max_series": budget.limit, "left_out": budget.dropped},
            )
        return families

    def _self_metrics(self, snapshot: Snapshot, budget: _Budget) -> list[Metric]:
        up = GaugeMetricFamily(
            "gpufleet_exporter_gpu_up",
            "1 when the device was read in the latest collection, 0 when it could not be.",
            labels=GPU_LABELS,
        )
        for state in snapshot.devices:
            budget.take()
            up.add_metric(_gpu_label_values(snapshot, state), 1.0 if state.up else 0.0)
        last = GaugeMetricFamily(
            "gpufleet_exporter_last_collect_timestamp_seconds",
            "Unix time at which the latest collection ended.",
            value=snapshot.taken_at,
        )
        errors = CounterMetricFamily(
            "gpufleet_exporter_collect_errors",
            "Errors met while collecting, by stage.",
            labels=("stage",),
        )
        for stage, count in snapshot.errors:
            errors.add_metric((stage,), float(count))
        return [up, last, errors]

    def _gpu_metrics(self, snapshot: Snapshot, budget: _Budget) -> list[Metric]:
        labels = (*GPU_LABELS, *OWNER_LABELS)
        gauges = [GaugeMetricFamily(m.name, m.help, labels=labels) for m in _GPU_GAUGES]
        ecc = CounterMetricFamily(
            "gpu_ecc_errors",
            "GPU memory ECC errors since the driver loaded (volatile), by type.",
            labels=(*labels, "type"),
        )
        xid = CounterMetricFamily(
            "gpu_xid_errors", "XID errors seen since the exporter started.", labels=(*labels, "xid")
        )
        for state in snapshot.devices:
            if not state.up:
                continue
            values = (*_gpu_label_values(snapshot, state), *_owner_values(state.owner))
            for metric, family in zip(_GPU_GAUGES, gauges, strict=True):
                value = metric.value(state)
                if value is not None and budget.take():
                    family.add_metric(values, value)
            sample = state.sample
            if sample is not None:
                for kind, total in (
                    ("corrected", sample.ecc_corrected_total),
                    ("uncorrected", sample.ecc_uncorrected_total),
                ):
                    if total is not None and budget.take():
                        ecc.add_metric((*values, kind), float(total))
            for code, count in state.xid_counts:
                if budget.take():
                    xid.add_metric((*values, str(code)), float(count))
        return [*gauges, ecc, xid]

    def _process_metrics(self, snapshot: Snapshot, budget: _Budget) -> list[Metric]:
        chosen = self._options.process_labels
        labels = (*GPU_LABELS, *chosen)
        extra_keys = sorted(
            {key for p in snapshot.processes if p.owner for key, _ in p.owner.labels}
        )
        all_labels = (*labels, *extra_keys)
        memory = GaugeMetricFamily(
            "process_gpu_memory", "GPU memory used by the process (bytes).", labels=all_labels
        )
        sm = GaugeMetricFamily(
            "process_gpu_sm_utilization",
            "SM utilization of the process (%).",
            labels=all_labels,
        )
        info = GaugeMetricFamily(
            "process_info",
            "1 per process (a count when PIDs are not labels), with its command line.",
            labels=(*all_labels, "command"),
        )
        groups: dict[tuple[str, ...], _Group] = {}
        for process in snapshot.processes:
            key = (
                *_process_label_values(snapshot, process, chosen),
                *_extra_values(process.owner, extra_keys),
            )
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group()
            group.add(process)
        for key, group in groups.items():
            if group.memory is not None and budget.take():
                memory.add_metric(key, float(group.memory))
            if group.sm is not None and budget.take():
                sm.add_metric(key, float(group.sm))
            if self._options.process_info:
                for command, count in group.commands.items():
                    if budget.take():
                        info.add_metric((*key, command), float(count))
        families: list[Metric] = [memory, sm]
        if self._options.process_info:
            families.append(info)
        return families


class _Group:
    """Processes that share one label set: summed."""

    __slots__ = ("commands", "memory", "sm")

    def __init__(self) -> None:
        self.memory: int | None = None
        self.sm: int | None = None
        self.commands: dict[str, int] = {}

    def add(self, process: ProcessState) -> None:
        if process.used_memory_bytes is not None:
            self.memory = (self.memory or 0) + process.used_memory_bytes
        if process.sm_utilization_percent is not None:
            self.sm = (self.sm or 0) + process.sm_utilization_percent
        self.commands[process.command] = self.commands.get(process.command, 0) + 1


def _gpu_label_values(snapshot: Snapshot, state: DeviceState) -> tuple[str, str, str, str]:
    return (snapshot.hostname, state.index, state.name, state.uuid)


def _owner_values(owner: Owner | None) -> tuple[str, str, str]:
    if owner is None:
        return ("", "", "")
    return (owner.pod, owner.namespace, owner.container)


def _process_label_values(
    snapshot: Snapshot, process: ProcessState, chosen: tuple[str, ...]
) -> tuple[str, ...]:
    owner = process.owner
    values = {
        "pid": str(process.pid),
        "username": process.username,
        "pod_name": owner.pod if owner else "",
        "pod_namespace": owner.namespace if owner else "",
        "container_name": owner.container if owner else "",
    }
    return (
        snapshot.hostname,
        process.device_index,
        process.device_name,
        process.device_uuid,
        *(values[name] for name in chosen),
    )


def _extra_values(owner: Owner | None, keys: list[str]) -> tuple[str, ...]:
    if not keys:
        return ()
    copied = dict(owner.labels) if owner else {}
    return tuple(copied.get(key, "") for key in keys)
