"""What one collection saw: immutable records that a scrape renders and never changes.

A scrape reads the latest `Snapshot` and nothing else, so it cannot touch NVML,
/proc or the Kubernetes API, and a process that is not in the snapshot has no
series: stale series disappear by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.gpu.model import GpuSample


@dataclass(frozen=True, slots=True)
class Owner:
    """The pod and container a process or a device belongs to."""

    namespace: str
    pod: str
    container: str
    labels: tuple[tuple[str, str], ...] = ()
    """The pod's labels that `--pod-label-allowlist` copies, sorted by key."""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """One GPU, or one MIG instance (``index`` ``"<gpu>:<mig>"``), at collection time."""

    index: str
    uuid: str
    name: str
    up: bool
    """False when the device could not be read this time (lost, or an NVML error)."""
    sample: GpuSample | None = None
    memory_total_bytes: int | None = None
    owner: Owner | None = None
    """The container the kubelet allocated this device to (PodResources), if any."""
    xid_counts: tuple[tuple[int, int], ...] = ()
    """(xid, count) of every XID seen on this device since the exporter started."""


@dataclass(frozen=True, slots=True)
class ProcessState:
    """One compute process on one device."""

    device_index: str
    device_uuid: str
    device_name: str
    pid: int
    username: str
    command: str
    owner: Owner | None
    used_memory_bytes: int | None
    sm_utilization_percent: int | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one collection read, in device-index order."""

    hostname: str
    taken_at: float
    """Unix time at the end of the collection."""
    duration_s: float
    devices: tuple[DeviceState, ...] = ()
    processes: tuple[ProcessState, ...] = ()
    errors: tuple[tuple[str, int], ...] = field(default=())
    """(stage, count) of the errors this collection hit."""
