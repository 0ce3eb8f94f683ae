"""The collection loop: NVML, /proc and the pod maps into one immutable `Snapshot`.

Collection is decoupled from scraping. `GpuCollector.run` collects every
``interval`` seconds; a scrape only renders `latest_snapshot()`. NVML and /proc
are blocking, so each collection runs in a worker thread; only the kubelet's
PodResources call (gRPC, async) runs on the event loop.

Failure is per device: one GPU's NVML error marks that GPU down (``gpu_up`` 0)
and is counted under ``collect_errors_total{stage}``; the other GPUs are still
read. After any failure, and every ``rediscover_interval`` seconds anyway, the
device list is enumerated again, which is how a lost GPU, a GPU that came back
and a reloaded driver are noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.exporter.errors import PodResourcesError
from gpufleet.exporter.podmap.procfs import ProcFs
from gpufleet.exporter.podmap.resolver import ProcessAttributor, ProcessIdentity
from gpufleet.exporter.snapshot import DeviceState, Owner, ProcessState, Snapshot
from gpufleet.gpu.model import (
    DeviceList,
    FaultKind,
    GpuDevice,
    GpuFault,
    GpuProcess,
    GpuSample,
)
from gpufleet.gpu.source import GpuError, GpuSource, XidEventStream

if TYPE_CHECKING:
    # Typing only: importing grpc costs ~10 MiB of RSS where no kubelet is asked.
    from gpufleet.exporter.podmap.podresources import ContainerRef, PodResourcesClient

__all__ = ["GpuCollector", "Stage"]

log = logging.getLogger(__name__)


class Stage:
    """The ``stage`` label values of ``gpufleet_exporter_collect_errors_total``."""

    DEVICES = "devices"
    SAMPLE = "sample"
    PROCESSES = "processes"
    PODRESOURCES = "podresources"
    XID = "xid"
    ALL = (DEVICES, SAMPLE, PROCESSES, PODRESOURCES, XID)


@dataclass(frozen=True, slots=True)
class _Known:
    uuid: str
    name: str


class GpuCollector:
    """Collects snapshots of every GPU, MIG instance and GPU process of one node.

    Collaborators are parameters: the `source` (real or simulated NVML), the
    `attributor` that names the owners of processes (or `procfs` alone, for
    usernames and commands without pods), and the kubelet `podresources`
    client that names the owners of whole devices.

    When the kubelet cannot be read, the last map it gave is kept for
    `podresources_max_age` seconds (an allocation outlives a kubelet
    restart), then dropped: during a long outage pods are deleted, and a
    deleted pod must not go on owning its GPUs in the metrics.
    """

    def __init__(
        self,
        source: GpuSource,
        *,
        hostname: str,
        procfs: ProcFs | None = None,
        attributor: ProcessAttributor | None = None,
        podresources: PodResourcesClient | None = None,
        rediscover_interval: float = 60.0,
        podresources_max_age: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if rediscover_interval <= 0:
            raise ValueError(f"rediscover_interval must be > 0, got {rediscover_interval!r}")
        if podresources_max_age < 0:
            raise ValueError(f"podresources_max_age must be >= 0, got {podresources_max_age!r}")
        if attributor is None and procfs is not None:
            attributor = ProcessAttributor(procfs)
        self._source = source
        self._hostname = hostname
        self._attributor = attributor
        self._podresources = podresources
        self._rediscover_interval = rediscover_interval
        self._clock = clock
        self._wall_clock = wall_clock

        self._devices: DeviceList | None = None
        self._enumerated_at = 0.0
        self._rediscover = True
        self._known: dict[int, _Known] = {}
        self._owners: Mapping[str, ContainerRef] = {}
        self._owners_read_at: float | None = None  # when the kubelet last answered
        self._podresources_max_age = podresources_max_age
        self._owners_error: str | None = None
        self._errors: Counter[str] = Counter({stage: 0 for stage in Stage.ALL})
        self._lock = threading.Lock()
        self._xids: Counter[tuple[str, int]] = Counter()
        self._xid_uuids: frozenset[str] = frozenset()
        self._latest: Snapshot | None = None
        self.enumerations = 0
        """How many times the device list was enumerated (tests assert re-enumeration)."""

    # --- public --------------------------------------------------------------

    def latest_snapshot(self) -> Snapshot | None:
        """The last complete snapshot; None before the first collection ends."""
        return self._latest

    async def collect(self) -> Snapshot:
        """Collect once and make the result the latest snapshot."""
        started = self._clock()
        owners = await self._device_owners()
        snapshot = await asyncio.to_thread(self._collect_blocking, owners, started)
        self._latest = snapshot
        return snapshot

    async def run(
        self,
        interval: float,
        stop: asyncio.Event,
        *,
        on_collect: Callable[[Snapshot], None] | None = None,
    ) -> None:
        """Collect every ``interval`` seconds, and count XID events, until ``stop`` is set."""
        halt = threading.Event()
        xid_task = asyncio.create_task(asyncio.to_thread(self._count_xids, halt))
        try:
            while not stop.is_set():
                started = self._clock()
                try:
                    snapshot = await self.collect()
                except Exception:  # one failed pass must not end the exporter
                    log.exception("collection failed")
                else:
                    if on_collect is not None:
                        on_collect(snapshot)
                delay = max(0.0, interval - (self._clock() - started))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            halt.set()
            await xid_task

    # --- device owners (kubelet PodResources) ------------------------------------

    async def _device_owners(self) -> Mapping[str, ContainerRef]:
        if self._podresources is None:
            return {}
        try:
            self._owners = await self._podresources.devices()
        except PodResourcesError as exc:
            # Keep the last good map: an allocation outlives a kubelet restart.
            self._count_error(Stage.PODRESOURCES)
            if str(exc) != self._owners_error:
                log.warning("kubelet PodResources unavailable", extra={"error": str(exc)})
            self._owners_error = str(exc)
            read_at = self._owners_read_at
            if read_at is not None and self._clock() - read_at > self._podresources_max_age:
                # But not for ever: pods deleted meanwhile must stop owning GPUs.
                log.warning(
                    "dropping the last kubelet PodResources map: too old",
                    extra={"max_age_s": self._podresources_max_age, "devices": len(self._owners)},
                )
                self._owners, self._owners_read_at = {}, None
        else:
            self._owners_read_at = self._clock()
            if self._owners_error is not None:
                log.info("kubelet PodResources readable again")
            self._owners_error = None
        return self._owners

    # --- one collection (worker thread) ----------------------------------------

    def _collect_blocking(self, owners: Mapping[str, ContainerRef], started: float) -> Snapshot:
        devices = self._device_list()
        states: list[DeviceState] = []
        found: list[tuple[DeviceState, GpuProcess]] = []
        xids = self._xid_counts()
        for device in devices.devices:
            self._known[device.index] = _Known(device.uuid, device.product_name)
            gpu_state = self._device_state(
                str(device.index), device.uuid, device.product_name,
                device.memory_total_bytes, owners.get(device.uuid) or owners.get(str(device.index)),
                xids.get(device.uuid, ()),
            )  # fmt: skip
            states.append(gpu_state)
            by_uuid = {device.uuid: gpu_state}
            for mig in device.mig_devices if device.mig_mode else ():
                name = device.product_name
                if mig.profile:
                    name = f"{name} MIG {mig.profile}"
                mig_state = self._device_state(
                    f"{device.index}:{mig.index}", mig.uuid, name, mig.memory_total_bytes,
                    owners.get(mig.uuid), (), parent_up=gpu_state.up,
                )  # fmt: skip
                states.append(mig_state)
                by_uuid[mig.uuid] = mig_state
            if gpu_state.up:
                found.extend(
                    (by_uuid.get(process.mig_uuid or device.uuid, gpu_state), process)
                    for process in self._processes(device)
                )
        for fault in devices.faults:
            known = self._known.get(fault.index)
            uuid = fault.uuid or (known.uuid if known else f"unknown-gpu-{fault.index}")
            name = known.name if known else ""
            states.append(DeviceState(str(fault.index), uuid, name, up=False))
            self._count_error(Stage.DEVICES)
        states.sort(key=_index_order)
        processes = self._process_states(found)
        self._register_xid_uuids(devices)
        with self._lock:
            errors = tuple(sorted(self._errors.items()))
        return Snapshot(
            hostname=self._hostname,
            taken_at=self._wall_clock(),
            duration_s=self._clock() - started,
            devices=tuple(states),
            processes=processes,
            errors=errors,
        )

    def _device_list(self) -> DeviceList:
        now = self._clock()
        if (
            self._devices is None
            or self._rediscover
            or now - self._enumerated_at >= self._rediscover_interval
        ):
            try:
                self._devices = self._source.devices()
            except GpuError as exc:
                # The driver is gone or reloading: report every known GPU down.
                self._count_error(Stage.DEVICES)
                log.warning("GPU enumeration failed", extra={"error": str(exc)})
                self._devices = DeviceList()
                self._rediscover = True
                return DeviceList(faults=self._faults_of_known(str(exc)))
            self.enumerations += 1
            self._enumerated_at = now
            self._rediscover = bool(self._devices.faults)
        return self._devices

    def _faults_of_known(self, message: str) -> tuple[GpuFault, ...]:
        return tuple(
            GpuFault(index, FaultKind.ERROR, message, uuid=known.uuid)
            for index, known in sorted(self._known.items())
        )

    def _device_state(
        self,
        index: str,
        uuid: str,
        name: str,
        memory_total: int | None,
        ref: ContainerRef | None,
        xids: tuple[tuple[int, int], ...],
        *,
        parent_up: bool = True,
    ) -> DeviceState:
        owner = None if ref is None else Owner(ref.namespace, ref.pod, ref.container)
        sample: GpuSample | None = None
        up = parent_up
        if up:
            try:
                sample = self._source.sample(uuid)
            except GpuError as exc:
                up = False
                self._count_error(Stage.SAMPLE)
                self._rediscover = True
                log.warning("GPU unreadable", extra={"gpu_uuid": uuid, "error": str(exc)})
        return DeviceState(index, uuid, name, up, sample, memory_total, owner, xids)

    def _processes(self, device: GpuDevice) -> tuple[GpuProcess, ...]:
        try:
            return self._source.processes(device.uuid)
        except GpuError as exc:
            self._count_error(Stage.PROCESSES)
            self._rediscover = True
            log.warning(
                "GPU processes unreadable", extra={"gpu_uuid": device.uuid, "error": str(exc)}
            )
            return ()

    def _process_states(
        self, found: list[tuple[DeviceState, GpuProcess]]
    ) -> tuple[ProcessState, ...]:
        identities: dict[int, ProcessIdentity] = {}
        if self._attributor is not None:
            identities = self._attributor.attribute(process.pid for _, process in found)
        unknown = ProcessIdentity("", "", None)
        states = []
        for device, process in found:
            identity = identities.get(process.pid, unknown)
            states.append(
                ProcessState(
                    device_index=device.index,
                    device_uuid=device.uuid,
                    device_name=device.name,
                    pid=process.pid,
                    username=identity.username,
                    command=identity.command,
                    owner=identity.owner,
                    used_memory_bytes=process.used_memory_bytes,
                    sm_utilization_percent=process.sm_utilization_percent,
                )
            )
        return tuple(states)

    # --- XID events (a second worker thread) -------------------------------------

    def _count_error(self, stage: str) -> None:
        with self._lock:
            self._errors[stage] += 1

    def _xid_counts(self) -> dict[str, tuple[tuple[int, int], ...]]:
        with self._lock:
            items = list(self._xids.items())
        counts: dict[str, list[tuple[int, int]]] = {}
        for (uuid, xid), count in items:
            counts.setdefault(uuid, []).append((xid, count))
        return {uuid: tuple(sorted(pairs)) for uuid, pairs in counts.items()}

    def _register_xid_uuids(self, devices: DeviceList) -> None:
        uuids = frozenset(device.uuid for device in devices.devices)
        with self._lock:
            self._xid_uuids = uuids

    def _count_xids(self, halt: threading.Event) -> None:
        """Count XID events until ``halt``; register again whenever the GPU set changes."""
        stream: XidEventStream | None = None
        registered: frozenset[str] | None = None
        try:
            while not halt.is_set():
                with self._lock:
                    wanted = self._xid_uuids
                if stream is None or wanted != registered:
                    if stream is not None:
                        stream.close()
                        stream = None
                    if not wanted:
                        halt.wait(0.5)
                        continue
                    try:
                        stream = self._source.xid_events()
                    except GpuError as exc:
                        self._count_error(Stage.XID)
                        log.warning("XID events unavailable", extra={"error": str(exc)})
                        halt.wait(self._rediscover_interval)
                        continue
                    registered = wanted
                try:
                    event = stream.wait(0.5)
                except GpuError as exc:
                    self._count_error(Stage.XID)
                    log.warning("XID event wait failed", extra={"error": str(exc)})
                    stream.close()
                    stream = None
                    halt.wait(1.0)
                    continue
                if event is not None:
                    with self._lock:
                        self._xids[(event.gpu_uuid, event.xid)] += 1
        finally:
            if stream is not None:
                stream.close()


def _index_order(state: DeviceState) -> tuple[int, ...]:
    return tuple(int(part) for part in state.index.split(":"))
