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

The provider is four modules: this one is the process (enumeration at start,
the main loop's rounds, the XID consumer, readiness); ``tracking`` holds what it
believes about each GPU and draws the ``Healthy`` verdict (the rules above);
``registration`` writes that to the server (ownership, conflicts, re-creation);
``xid_events`` is the thread that waits for NVML's XID events. Object names and
labels come from ``naming``; the pure status merge from ``health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from gpufleet.core.retry import Backoff
from gpufleet.deviceapi.errors import DeviceApiError, UnavailableError
from gpufleet.deviceapi.health import HealthVerdict
from gpufleet.deviceapi.naming import provider_name
from gpufleet.deviceapi.registration import GpuApi, Registrar
from gpufleet.deviceapi.tracking import TrackedGpus
from gpufleet.deviceapi.xid_events import pump_xid_events
from gpufleet.gpu.model import GpuSample, XidEvent
from gpufleet.gpu.source import GpuError, GpuSource
from gpufleet.gpu.xid import DEFAULT_CATALOGUE, Severity, XidCatalogue

__all__ = ["GpuProvider"]

_log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


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
        self._source = source
        self._node = node
        self._catalogue = catalogue
        self._interval = health_interval
        self._backoff = backoff or Backoff(initial=0.5, cap=15.0)
        self._gpus = TrackedGpus(node, provider_name(source))
        self._registrar = Registrar(client, self._gpus, clock)
        self._wake = asyncio.Event()
        self._ready = False
        self._xid_stream_ready = threading.Event()

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
        return tuple(self._gpus.by_name)

    def verdict(self, name: str) -> HealthVerdict:
        """The current belief about GPU ``name``."""
        return self._gpus.by_name[name].verdict()

    # --- main loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; never dies on one GPU's or one request's failure."""
        listing = await asyncio.to_thread(self._source.devices)
        self._gpus.adopt(listing)
        _log.info(
            "provider started",
            extra={"node": self._node, "gpus": len(self._gpus), "faults": len(listing.faults)},
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[XidEvent] = asyncio.Queue()
        halt = threading.Event()
        thread = threading.Thread(
            target=pump_xid_events,
            args=(self._source, self._backoff, loop, events, halt, self._xid_stream_ready),
            name="xid-events",
            daemon=True,
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
                created_before = self._registrar.created
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
                            "gpus": len(self._gpus),
                            "gpus_created": self._registrar.created - created_before,
                        },
                    )
                    lost_server = False
                attempt = 0
                delay = self._interval
            await _wait_any(stop, self._wake, delay)

    # --- periodic health check ------------------------------------------------------

    async def check_health(self) -> None:
        """Sample every GPU (in a worker thread) and update what the provider believes."""
        if self._gpus.incomplete:
            await self._refresh_incomplete()
        uuids = [tracked.uuid for tracked in self._gpus.by_name.values()]
        results = await asyncio.to_thread(self._sample_all, uuids)
        for uuid, result in results.items():
            self._gpus.by_uuid[uuid].observe(result)

    def _sample_all(self, uuids: Sequence[str]) -> dict[str, GpuSample | GpuError]:
        results: dict[str, GpuSample | GpuError] = {}
        for uuid in uuids:
            try:
                results[uuid] = self._source.sample(uuid)
            except GpuError as exc:
                results[uuid] = exc
        return results

    async def _refresh_incomplete(self) -> None:
        """Re-enumerate while some GPU was a fault at start, to fill in its spec."""
        try:
            listing = await asyncio.to_thread(self._source.devices)
        except GpuError as exc:
            _log.warning("GPU enumeration failed", extra={"error": str(exc)})
            return
        self._gpus.refresh(listing)

    # --- XID events -----------------------------------------------------------------

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
        tracked = self._gpus.by_uuid.get(event.gpu_uuid)
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
        tracked.record_xid(event, info)
        if info.severity is Severity.CRITICAL:
            _log.warning("critical XID: GPU unhealthy", extra=context)
        else:
            _log.info("XID recorded", extra=context)
        if tracked.registered:
            await self._registrar.apply(tracked)
        else:
            self._wake.set()  # registration is pending: the main loop writes it

    # --- writing to the server ------------------------------------------------------

    async def reconcile(self) -> None:
        """Make the server agree with the provider: register what is missing, fix status."""
        self._ready = await self._registrar.reconcile()


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` or ``wake`` is set."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
