"""``GpuProvider``: registers this node's GPUs with the device API and keeps their health.

The provider is a separate process that reaches the server only through the
client. It reads GPUs from a ``GpuSource`` (real or simulated NVML), registers
each one, and owns one condition type, ``Healthy``, plus ``recommended_action``
and ``last_xids`` of the GPUs it registered.

**Ownership.** Each provider writes only its own condition types. A write is:
get the object, merge the provider's conditions into the current status
(other types are kept as they are), ``UpdateGpuStatus`` with the
resourceVersion just read, and on ``ConflictError`` read again and retry. A
write that would change nothing is not sent, so an idle provider never bumps a
resourceVersion.

**Health.** ``Healthy`` is the worst of what the provider knows about a GPU, in
this order of reasons: ``GpuLost`` (NVML says it fell off the bus; action
``RebootNode``, because a GPU that cannot be reached cannot be reset in place
either, and NVIDIA buckets XID 79 the same way), ``GpuUnreadable`` (status
``Unknown``: enumeration failed for another reason), ``XidCritical`` (a critical
XID, action from the catalogue), ``RowRemapFailure`` (``ReplaceGpu``) and
``RetiredPagesPending`` (``ResetGpu``). The recommended action is the most
disruptive action among all active problems.

**Latching.** The periodic checks are re-evaluated each interval: a GPU that is
found again, or whose pending retirement was applied, turns healthy again. A
critical XID, in contrast, is an event with no "cleared" counterpart in NVML,
so it is latched **for the life of the provider process**: the GPU stays
``Healthy=False`` until the provider restarts, which is what the recommended
actions (GPU reset, node reboot, replacement) come with. Restarting the
provider is the acknowledgement; the XID history (``last_xids``) survives it,
because a restarting provider adopts the history it finds on the server.

**Server restarts.** Every interval the provider lists the server's GPUs and
re-creates any of its own that are missing, then re-applies the status it
holds in memory. An ``UnavailableError`` makes it reconnect with exponential
backoff and do the same, so a server that comes back with an empty store is
repopulated with the current health.

Object names and labels come from ``naming``; the pure status merge (what a
write changes in the server's status) from ``health``. This module is the
process: enumeration, the XID thread, periodic checks and the writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from gpufleet.core.retry import Backoff
from gpufleet.deviceapi.errors import (
    AlreadyExistsError,
    ConflictError,
    DeviceApiError,
    NotFoundError,
    UnavailableError,
)
from gpufleet.deviceapi.health import (
    CONDITION_HEALTHY,
    HEALTHY,
    MAX_LAST_XIDS,
    HealthVerdict,
    copy_xid,
    merged_status,
    to_timestamp,
)
from gpufleet.deviceapi.naming import gpu_labels, gpu_name, provider_name
from gpufleet.deviceapi.v1alpha1.gpu_pb2 import (
    Gpu,
    GpuList,
    GpuSpec,
    GpuStatus,
    ObjectMeta,
    XidRecord,
)
from gpufleet.gpu.model import DeviceList, FaultKind, GpuDevice, GpuFault, GpuSample, XidEvent
from gpufleet.gpu.source import GpuError, GpuLostError, GpuSource, XidEventStream
from gpufleet.gpu.xid import DEFAULT_CATALOGUE, Action, Severity, XidCatalogue, XidInfo

__all__ = ["GpuApi", "GpuProvider"]

_log = logging.getLogger(__name__)

_CONFLICT_RETRIES = 8
_XID_POLL_S = 0.5
"""How long one ``nvmlEventSetWait`` blocks: the XID thread checks for stop this often."""


class GpuApi(Protocol):
    """The part of ``DeviceApiClient`` the provider uses (tests may pass a fake)."""

    async def create(self, gpu: Gpu) -> Gpu:
        """Create ``gpu``; ``AlreadyExistsError`` if its name is taken."""
        ...

    async def get(self, name: str) -> Gpu:
        """The GPU called ``name``; ``NotFoundError`` if there is none."""
        ...

    async def list(self, label_selector: str = "") -> GpuList:
        """Every GPU matching ``label_selector``."""
        ...

    async def update(self, gpu: Gpu) -> Gpu:
        """Apply spec, labels and annotations; ``ConflictError`` on a stale resourceVersion."""
        ...

    async def update_status(self, gpu: Gpu) -> Gpu:
        """Apply status only; ``ConflictError`` on a stale resourceVersion."""
        ...


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --- what the provider knows about one GPU ------------------------------------------


@dataclass(slots=True)
class _Tracked:
    """The provider's in-memory truth about one GPU: re-applied after a server restart."""

    name: str
    uuid: str
    spec: GpuSpec
    labels: dict[str, str]
    complete: bool = True
    """False when the GPU was a fault at enumeration: the spec holds what was known."""
    lost: bool = False
    unreadable: str | None = None
    latched: dict[int, XidInfo] = field(default_factory=dict)
    """Critical XIDs seen since the provider started (see "Latching")."""
    retired_pages_pending: bool = False
    row_remap_failure: bool = False
    xids: deque[XidRecord] = field(default_factory=lambda: deque(maxlen=MAX_LAST_XIDS))
    registered: bool = False

    def verdict(self) -> HealthVerdict:
        """The ``Healthy`` condition and action from everything known (worst reason first)."""
        problems: list[tuple[str, str, Action]] = []
        if self.lost:
            problems.append(
                ("GpuLost", f"GPU {self.uuid} is lost (unreachable)", Action.REBOOT_NODE)
            )
        for info in sorted(self.latched.values(), key=lambda item: item.xid):
            problems.append(("XidCritical", f"XID {info.xid}: {info.description}", info.action))
        if self.row_remap_failure:
            problems.append(
                ("RowRemapFailure", "GPU memory row remapping failed", Action.REPLACE_GPU)
            )
        if self.retired_pages_pending:
            problems.append(
                (
                    "RetiredPagesPending",
                    "retired GPU memory pages take effect after a GPU reset",
                    Action.RESET_GPU,
                )
            )
        if problems:
            action = max((problem[2] for problem in problems), key=lambda item: item.rank)
            message = "; ".join(problem[1] for problem in problems)
            return HealthVerdict("False", problems[0][0], message, action)
        if self.unreadable is not None:
            return HealthVerdict("Unknown", "GpuUnreadable", self.unreadable, Action.NONE)
        return HEALTHY


def _spec_for_device(device: GpuDevice, node: str) -> GpuSpec:
    return GpuSpec(
        uuid=device.uuid,
        serial=device.serial or "",
        product=device.product_name,
        pci_bus_id=device.pci_bus_id,
        index=device.index,
        node=node,
    )


def _spec_for_fault(fault: GpuFault, uuid: str, node: str) -> GpuSpec:
    return GpuSpec(uuid=uuid, pci_bus_id=fault.pci_bus_id or "", index=fault.index, node=node)


# --- the provider ---------------------------------------------------------------------


class GpuProvider:
    """Registers the GPUs of ``source`` through ``client`` and keeps their ``Healthy`` condition.

    ``run(stop)`` does everything until ``stop`` is set: enumerate, register,
    watch XID events in a dedicated thread, and every ``health_interval``
    sample each GPU, reconcile with the server and repair what is missing.
    """

    def __init__(
        self,
        client: GpuApi,
        source: GpuSource,
        *,
        node: str,
        catalogue: XidCatalogue = DEFAULT_CATALOGUE,
        health_interval: float = 30.0,
        backoff: Backoff | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """Provide the GPUs of ``source`` as node ``node``; nothing runs until ``run``."""
        if health_interval <= 0:
            raise ValueError(f"health_interval must be > 0, got {health_interval!r}")
        self._client = client
        self._source = source
        self._provider = provider_name(source)
        self._node = node
        self._catalogue = catalogue
        self._interval = health_interval
        self._backoff = backoff or Backoff(initial=0.5, cap=15.0)
        self._now = clock
        self._tracked: dict[str, _Tracked] = {}
        self._by_uuid: dict[str, _Tracked] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._ready = False
        self._first_registration = True
        self._created = 0
        """GPU objects this provider created (a counter: re-creations after a restart too)."""
        self._xid_stream_ready = threading.Event()
        self._orphans: list[GpuFault] = []
        """Faults without a UUID: matched to existing objects by index or PCI bus id."""
        self._orphans_reported: set[int] = set()

    # --- observation for tests, readiness and the CLI ------------------------------

    @property
    def ready(self) -> bool:
        """True once every GPU is registered and the last reconcile reached the server."""
        return self._ready

    @property
    def xid_stream_ready(self) -> bool:
        """True while an XID event set is registered (events before that are not seen)."""
        return self._xid_stream_ready.is_set()

    @property
    def names(self) -> tuple[str, ...]:
        """The object names of the GPUs this provider registers."""
        return tuple(self._tracked)

    def verdict(self, name: str) -> HealthVerdict:
        """The current belief about GPU ``name``."""
        return self._tracked[name].verdict()

    # --- main loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; never dies on one GPU's or one request's failure."""
        listing = await asyncio.to_thread(self._source.devices)
        self._adopt(listing)
        _log.info(
            "provider started",
            extra={"node": self._node, "gpus": len(self._tracked), "faults": len(listing.faults)},
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[XidEvent] = asyncio.Queue()
        halt = threading.Event()
        thread = threading.Thread(
            target=self._xid_thread, args=(loop, events, halt), name="xid-events", daemon=True
        )
        thread.start()
        consumer = asyncio.create_task(self._consume_xids(events), name="xid-consumer")
        try:
            await self._main_loop(stop)
        finally:
            halt.set()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await asyncio.to_thread(thread.join, 5.0)
            self._ready = False

    async def _main_loop(self, stop: asyncio.Event) -> None:
        attempt = 0
        lost_server = False
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.check_health()
                created_before = self._created
                await self.reconcile()
            except Exception as exc:
                # Whatever went wrong this round, the next one starts from scratch.
                self._ready = False
                delay = self._backoff.delay(attempt)
                attempt += 1
                context = {"error": str(exc), "retry_in_s": round(delay, 3)}
                if isinstance(exc, UnavailableError):
                    lost_server = True
                    _log.warning("device API unavailable; will re-register", extra=context)
                else:
                    _log.error(
                        "provider round failed",
                        exc_info=not isinstance(exc, DeviceApiError | GpuError),
                        extra=context,
                    )
            else:
                if lost_server:
                    # The one line that says the outage is over: a server that kept
                    # its state file still has every GPU (gpus_created 0), one that lost
                    # it was repopulated.
                    _log.info(
                        "re-registered with the device API",
                        extra={
                            "node": self._node,
                            "gpus": len(self._tracked),
                            "gpus_created": self._created - created_before,
                        },
                    )
                    lost_server = False
                attempt = 0
                delay = self._interval
            await _wait_any(stop, self._wake, delay)

    # --- enumeration ----------------------------------------------------------------

    def _adopt(self, listing: DeviceList) -> None:
        for device in listing.devices:
            self._track(
                _Tracked(
                    name=gpu_name(device.uuid),
                    uuid=device.uuid,
                    spec=_spec_for_device(device, self._node),
                    labels=gpu_labels(self._node, device.product_name, self._provider),
                )
            )
        for fault in listing.faults:
            if not fault.uuid:
                # A lost GPU usually cannot even tell its UUID; reconcile looks for the
                # object an earlier run registered for this index (or PCI bus id).
                self._orphans.append(fault)
                continue
            tracked = _Tracked(
                name=gpu_name(fault.uuid),
                uuid=fault.uuid,
                spec=_spec_for_fault(fault, fault.uuid, self._node),
                labels=gpu_labels(self._node, "", self._provider),
                complete=False,
            )
            if fault.kind is FaultKind.LOST:
                tracked.lost = True
            else:
                tracked.unreadable = fault.message
            self._track(tracked)

    def _track(self, tracked: _Tracked) -> None:
        existing = self._tracked.get(tracked.name)
        if existing is not None and existing.complete and not tracked.complete:
            return
        self._tracked[tracked.name] = tracked
        self._by_uuid[tracked.uuid] = tracked
        self._locks.setdefault(tracked.name, asyncio.Lock())

    # --- periodic health check ------------------------------------------------------

    async def check_health(self) -> None:
        """Sample every GPU (in a worker thread) and update what the provider believes."""
        if self._orphans or any(not tracked.complete for tracked in self._tracked.values()):
            await self._refresh_incomplete()
        uuids = [tracked.uuid for tracked in self._tracked.values()]
        results = await asyncio.to_thread(self._sample_all, uuids)
        for uuid, result in results.items():
            tracked = self._by_uuid[uuid]
            if isinstance(result, GpuLostError):
                if not tracked.lost:
                    _log.warning("GPU lost", extra={"gpu": tracked.name, "gpu_uuid": uuid})
                tracked.lost = True
            elif isinstance(result, GpuError):
                # One failed read is not a verdict: keep what we knew, say so once per interval.
                _log.warning(
                    "GPU health check failed", extra={"gpu": tracked.name, "error": str(result)}
                )
            else:
                tracked.lost = False
                tracked.unreadable = None
                tracked.retired_pages_pending = bool(result.retired_pages_pending)
                tracked.row_remap_failure = bool(result.remapped_rows_failure)

    def _sample_all(self, uuids: Sequence[str]) -> dict[str, GpuSample | GpuError]:
        results: dict[str, GpuSample | GpuError] = {}
        for uuid in uuids:
            try:
                results[uuid] = self._source.sample(uuid)
            except GpuError as exc:
                results[uuid] = exc
        return results

    async def _refresh_incomplete(self) -> None:
        """Re-enumerate while some GPU was a fault at start, to fill in its spec.

        A GPU that was unreadable without a UUID and reads again is tracked anew.
        """
        try:
            listing = await asyncio.to_thread(self._source.devices)
        except GpuError as exc:
            _log.warning("GPU enumeration failed", extra={"error": str(exc)})
            return
        for device in listing.devices:
            tracked = self._by_uuid.get(device.uuid)
            if tracked is not None and not tracked.complete:
                tracked.spec = _spec_for_device(device, self._node)
                tracked.labels = gpu_labels(self._node, device.product_name, self._provider)
                tracked.complete = True
                tracked.registered = False  # the spec on the server needs the update
            elif tracked is None:
                self._orphans = [o for o in self._orphans if o.index != device.index]
                self._track(
                    _Tracked(
                        name=gpu_name(device.uuid),
                        uuid=device.uuid,
                        spec=_spec_for_device(device, self._node),
                        labels=gpu_labels(self._node, device.product_name, self._provider),
                    )
                )

    # --- XID events -----------------------------------------------------------------

    def _xid_thread(
        self,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue[XidEvent],
        halt: threading.Event,
    ) -> None:
        """Block in ``nvmlEventSetWait`` off the event loop; recreate the set on errors."""
        stream: XidEventStream | None = None
        attempt = 0
        try:
            while not halt.is_set():
                if stream is None:
                    try:
                        stream = self._source.xid_events()
                    except GpuError as exc:
                        delay = self._backoff.delay(attempt)
                        attempt += 1
                        _log.error(
                            "cannot register for XID events",
                            extra={"error": str(exc), "retry_in_s": round(delay, 3)},
                        )
                        halt.wait(delay)
                        continue
                    self._xid_stream_ready.set()
                try:
                    event = stream.wait(_XID_POLL_S)
                except Exception as exc:
                    # A broken event set, not a broken GPU: recreate it, mark nobody dead.
                    self._xid_stream_ready.clear()
                    delay = self._backoff.delay(attempt)
                    attempt += 1
                    _log.warning(
                        "XID event wait failed; recreating the event set",
                        extra={"error": str(exc), "retry_in_s": round(delay, 3)},
                    )
                    _close_quietly(stream)
                    stream = None
                    halt.wait(delay)
                    continue
                attempt = 0
                if event is not None:
                    try:
                        loop.call_soon_threadsafe(events.put_nowait, event)
                    except RuntimeError:
                        return  # the loop is closed: the provider is gone
        finally:
            self._xid_stream_ready.clear()
            if stream is not None:
                _close_quietly(stream)

    async def _consume_xids(self, events: asyncio.Queue[XidEvent]) -> None:
        while True:
            event = await events.get()
            try:
                await self.handle_xid(event)
            except UnavailableError:
                self._ready = False
                self._wake.set()  # the main loop reconnects and re-applies this state
            except DeviceApiError as exc:
                _log.error(
                    "cannot record XID", extra={"gpu_uuid": event.gpu_uuid, "error": str(exc)}
                )
            except Exception as exc:
                _log.error(
                    "cannot record XID",
                    exc_info=True,
                    extra={"gpu_uuid": event.gpu_uuid, "error": str(exc)},
                )

    async def handle_xid(self, event: XidEvent) -> None:
        """Record one XID event: ignored ones change nothing, critical ones latch unhealthy."""
        info = self._catalogue.lookup(event.xid)
        tracked = self._by_uuid.get(event.gpu_uuid)
        context = {
            "gpu_uuid": event.gpu_uuid,
            "xid": event.xid,
            "severity": info.severity.value,
            "xid_description": info.description,
        }
        if tracked is None:
            _log.warning("XID on a GPU this provider does not know", extra=context)
            return
        if info.severity is Severity.IGNORED:
            _log.info("XID ignored (application-level)", extra=context)
            return
        tracked.xids.append(
            XidRecord(
                xid=event.xid, time=to_timestamp(event.timestamp), description=info.description
            )
        )
        if info.severity is Severity.CRITICAL:
            tracked.latched[event.xid] = info
            _log.warning("critical XID: GPU unhealthy", extra=context)
        else:
            _log.info("XID recorded", extra=context)
        if tracked.registered:
            await self._apply(tracked)
        else:
            self._wake.set()  # registration is pending: the main loop writes it

    # --- writing to the server ------------------------------------------------------

    async def reconcile(self) -> None:
        """Make the server agree with the provider: register what is missing, fix status."""
        listing = await self._client.list()
        present = {item.metadata.name: item for item in listing.items}
        if self._orphans:
            self._adopt_orphans(listing.items)
        for tracked in list(self._tracked.values()):
            try:
                current = present.get(tracked.name)
                if current is None or not tracked.registered:
                    current = await self._register(tracked)
                elif _needs_spec_update(current, tracked):
                    current = await self._update_spec(tracked, current)
                await self._apply(tracked, current)
            except UnavailableError:
                raise
            except DeviceApiError as exc:
                _log.error("cannot reconcile GPU", extra={"gpu": tracked.name, "error": str(exc)})
        self._first_registration = False
        self._ready = all(tracked.registered for tracked in self._tracked.values())

    def _adopt_orphans(self, items: Sequence[Gpu]) -> None:
        """Track, as far as the server knows them, GPUs that are faults without a UUID."""
        for fault in list(self._orphans):
            match = next(
                (
                    item
                    for item in items
                    if item.spec.node == self._node
                    and item.metadata.name not in self._tracked
                    and (
                        item.spec.pci_bus_id == fault.pci_bus_id
                        if fault.pci_bus_id
                        else item.spec.index == fault.index
                    )
                ),
                None,
            )
            if match is None:
                if fault.index not in self._orphans_reported:
                    self._orphans_reported.add(fault.index)
                    _log.error(
                        "GPU unreadable and without a UUID: cannot register it",
                        extra={"gpu_index": fault.index, "fault": fault.message},
                    )
                continue
            spec = GpuSpec()
            spec.CopyFrom(match.spec)
            tracked = _Tracked(
                name=match.metadata.name,
                uuid=match.spec.uuid,
                spec=spec,
                labels=gpu_labels(self._node, match.spec.product, self._provider),
                complete=False,
                registered=True,
            )
            if fault.kind is FaultKind.LOST:
                tracked.lost = True
            else:
                tracked.unreadable = fault.message
            self._orphans.remove(fault)
            self._track(tracked)
            _log.warning(
                "unreadable GPU matched to its registered object",
                extra={"gpu": tracked.name, "gpu_index": fault.index, "fault": fault.message},
            )

    async def _register(self, tracked: _Tracked) -> Gpu:
        """Create the GPU, or adopt the existing object and bring its spec up to date."""
        wanted = Gpu(
            metadata=ObjectMeta(name=tracked.name, labels=tracked.labels), spec=tracked.spec
        )
        # Created with its status, so a server that restarted empty gets it back in one write.
        wanted.status.CopyFrom(
            merged_status(GpuStatus(), tracked.verdict(), list(tracked.xids), 1, self._now())
        )
        try:
            current = await self._client.create(wanted)
            self._created += 1
            _log.info("GPU registered", extra={"gpu": tracked.name, "gpu_uuid": tracked.uuid})
        except AlreadyExistsError:
            current = await self._client.get(tracked.name)
            if _needs_spec_update(current, tracked):
                current = await self._update_spec(tracked, current)
        if self._first_registration and not tracked.xids and current.status.last_xids:
            # A restarted provider keeps the XID history the previous one wrote.
            tracked.xids.extend(copy_xid(record) for record in current.status.last_xids)
        tracked.registered = True
        return current

    async def _update_spec(self, tracked: _Tracked, current: Gpu) -> Gpu:
        for _ in range(_CONFLICT_RETRIES):
            wanted = Gpu()
            wanted.CopyFrom(current)
            if tracked.complete or not current.spec.uuid:
                wanted.spec.CopyFrom(tracked.spec)
            wanted.metadata.labels.update(tracked.labels)
            try:
                return await self._client.update(wanted)
            except ConflictError:
                current = await self._client.get(tracked.name)
                if not _needs_spec_update(current, tracked):
                    return current
        raise ConflictError(f"{tracked.name}: spec update kept conflicting")

    async def _apply(self, tracked: _Tracked, current: Gpu | None = None) -> Gpu:
        """Merge the provider's status into the server's, retrying on conflict; no-ops skip."""
        async with self._locks[tracked.name]:
            for _ in range(_CONFLICT_RETRIES):
                if current is None:
                    try:
                        current = await self._client.get(tracked.name)
                    except NotFoundError:
                        current = await self._register(tracked)
                status = merged_status(
                    current.status,
                    tracked.verdict(),
                    list(tracked.xids),
                    current.metadata.generation,
                    self._now(),
                )
                if status == current.status:
                    return current
                wanted = Gpu()
                wanted.CopyFrom(current)
                wanted.status.CopyFrom(status)
                try:
                    written = await self._client.update_status(wanted)
                except ConflictError:
                    current = None
                    continue
                except NotFoundError:
                    current = await self._register(tracked)
                    continue
                _log.info(
                    "GPU status written",
                    extra={
                        "gpu": tracked.name,
                        "healthy": _own_status(status),
                        "recommended_action": status.recommended_action,
                        "resource_version": written.metadata.resource_version,
                    },
                )
                return written
        raise ConflictError(f"{tracked.name}: status update kept conflicting")


def _needs_spec_update(current: Gpu, tracked: _Tracked) -> bool:
    labels_missing = any(
        current.metadata.labels.get(key) != value for key, value in tracked.labels.items()
    )
    if not tracked.complete:
        # What a fault told us must not overwrite a fuller spec written earlier.
        return labels_missing or not current.spec.uuid
    return labels_missing or current.spec != tracked.spec


def _own_status(status: GpuStatus) -> str:
    for condition in status.conditions:
        if condition.type == CONDITION_HEALTHY:
            return str(condition.status)
    return ""


def _close_quietly(stream: XidEventStream) -> None:
    try:
        stream.close()
    except Exception as exc:
        _log.warning("closing the XID event set failed", extra={"error": str(exc)})


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` or ``wake`` is set."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
