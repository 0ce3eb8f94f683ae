"""`GpuInformer`: a local, event-driven cache of the device API, in client-go style.

It lists, then watches from the list's resourceVersion, so no event between
the two is lost. When the server says the version is too old (Expired) or
closed the watch because this informer fell behind (Evicted), it relists and
tells its handlers only what really changed. When the server is unreachable it
backs off and resumes from its last resourceVersion once the server is back; a
restarted server answers Expired (its resourceVersion counter starts at the
clock, state file or not), so that ends in a relist that tells handlers only
what changed. Each outage is logged twice: a warning when the server is lost
(the retries log at debug) and an info line when it answers again (a resumed
watch knows that at its first event or bookmark).

Cached objects are shared with handlers and other readers: treat them as
read-only, and copy before modifying (``gpu_pb2.Gpu(); copy.CopyFrom(gpu)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gpufleet.core.retry import Backoff
from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.errors import (
    DeviceApiError,
    ExpiredError,
    UnavailableError,
    WatcherEvictedError,
)
from gpufleet.deviceapi.v1alpha1 import gpu_pb2

__all__ = ["AddHandler", "DeleteHandler", "GpuInformer", "UpdateHandler"]

log = logging.getLogger(__name__)

AddHandler = Callable[[gpu_pb2.Gpu], object]
UpdateHandler = Callable[[gpu_pb2.Gpu, gpu_pb2.Gpu], object]
DeleteHandler = Callable[[gpu_pb2.Gpu], object]
H = TypeVar("H")

_ADDED = gpu_pb2.WatchEvent.ADDED
_MODIFIED = gpu_pb2.WatchEvent.MODIFIED
_DELETED = gpu_pb2.WatchEvent.DELETED
_BOOKMARK = gpu_pb2.WatchEvent.BOOKMARK


class GpuInformer:
    """Keeps a cache of the GPUs matching `label_selector` and calls handlers on changes.

    Register handlers with `on_add`, `on_update`, `on_delete` (usable as
    decorators) before `run()`. Handlers run on the event loop and must not
    block; one that raises is logged and the informer carries on.
    """

    def __init__(
        self,
        client: DeviceApiClient,
        *,
        label_selector: str = "",
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._selector = label_selector
        self._backoff = backoff if backoff is not None else Backoff(initial=0.1, cap=5.0)
        self._sleep = sleep
        self._cache: dict[str, gpu_pb2.Gpu] = {}
        self._rv = ""
        self._synced = asyncio.Event()
        self._stopping = asyncio.Event()
        self._add: list[AddHandler] = []
        self._update: list[UpdateHandler] = []
        self._delete: list[DeleteHandler] = []
        self.relists = 0
        """Lists taken, the first included."""
        self.evictions = 0
        """Watches the server closed because this informer fell behind."""
        self.expirations = 0
        """Watches refused because the resourceVersion had left the history window."""
        self.outages = 0
        """Times the server became unreachable (each logged once, however many retries)."""
        self._lost = False

    # -- registration and reading ------------------------------------------

    def on_add(self, handler: AddHandler) -> AddHandler:
        """Call `handler(gpu)` for each GPU that appears."""
        self._add.append(handler)
        return handler

    def on_update(self, handler: UpdateHandler) -> UpdateHandler:
        """Call `handler(old, new)` for each change of a cached GPU."""
        self._update.append(handler)
        return handler

    def on_delete(self, handler: DeleteHandler) -> DeleteHandler:
        """Call `handler(gpu)` for each GPU that disappears (its last known state)."""
        self._delete.append(handler)
        return handler

    def has_synced(self) -> bool:
        """True once the first list has filled the cache."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        """Return once `has_synced()`; wrap in ``asyncio.timeout`` to bound the wait."""
        await self._synced.wait()

    def get(self, name: str) -> gpu_pb2.Gpu | None:
        """The cached GPU called `name`, or None (read-only)."""
        return self._cache.get(name)

    def items(self) -> list[gpu_pb2.Gpu]:
        """Every cached GPU (read-only objects)."""
        return list(self._cache.values())

    def names(self) -> list[str]:
        """The names of every cached GPU."""
        return list(self._cache)

    @property
    def resource_version(self) -> str:
        """The resourceVersion the cache reflects (of the last list, event or bookmark)."""
        return self._rv

    # -- running ---------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until `stop()` (or cancellation)."""
        self._stopping.clear()
        loop_task = asyncio.create_task(self._loop())
        stop_task = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (loop_task, stop_task):
                task.cancel()
            for task in (loop_task, stop_task):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def stop(self) -> None:
        """Ask `run()` to return; the open watch is cancelled."""
        self._stopping.set()

    async def _loop(self) -> None:
        attempt = 0
        need_list = True
        self._lost = False
        while True:
            try:
                if need_list:
                    listed = await self._client.list(self._selector)
                    self._answered("relist")
                    self._replace(listed)
                    need_list = False
                    attempt = 0
                async for event in self._client.watch(
                    self._rv, self._selector, allow_bookmarks=True
                ):
                    attempt = 0
                    self._answered("resume")
                    self._apply(event)
                # A cleanly ended stream: resume from where we are.
                continue
            except (ExpiredError, WatcherEvictedError) as error:
                if isinstance(error, ExpiredError):
                    self.expirations += 1
                else:
                    self.evictions += 1
                if not self._answered("relist", error.reason):
                    log.info(
                        "GPU watch must relist",
                        extra={"reason": error.reason, "resource_version": self._rv},
                    )
                need_list = True
                if attempt == 0:
                    # The first relist is immediate; repeated ones back off.
                    attempt += 1
                    continue
            except UnavailableError as error:
                # Resume from our version once it is back: a restarted server
                # answers Expired, and then we relist.
                extra = {"error": str(error), "resource_version": self._rv}
                if self._lost:
                    log.debug("device API still unavailable", extra=extra)
                else:
                    self._lost = True
                    self.outages += 1
                    log.warning("device API unavailable; reconnecting", extra=extra)
            except DeviceApiError as error:
                self._answered("relist", error.reason)
                need_list = True
                log.warning("GPU watch failed", extra={"reason": error.reason, "error": str(error)})
            await self._sleep(self._backoff.delay(attempt))
            attempt += 1

    def _answered(self, then: str, reason: str = "") -> bool:
        """The server answered: after an outage, say so (once) and return True."""
        if not self._lost:
            return False
        self._lost = False
        extra = {"then": then, "resource_version": self._rv}
        if reason:
            extra["reason"] = reason
        log.info("device API reconnected", extra=extra)
        return True

    # -- the cache ---------------------------------------------------------------

    def _replace(self, listed: gpu_pb2.GpuList) -> None:
        """Swap in a fresh list, telling handlers only what differs from the cache."""
        fresh = {gpu.metadata.name: gpu for gpu in listed.items}
        old_cache, self._cache = self._cache, fresh
        self._rv = listed.resource_version
        self.relists += 1
        for name, old in old_cache.items():
            if name not in fresh:
                self._notify_delete(old)
        for name, gpu in fresh.items():
            old_gpu = old_cache.get(name)
            if old_gpu is None:
                self._notify_add(gpu)
            elif old_gpu != gpu:
                self._notify_update(old_gpu, gpu)
        self._synced.set()

    def _apply(self, event: gpu_pb2.WatchEvent) -> None:
        gpu = event.object
        kind = event.type
        if kind == _BOOKMARK:
            self._rv = gpu.metadata.resource_version
            return
        if kind not in (_ADDED, _MODIFIED, _DELETED):
            raise DeviceApiError(f"watch sent an {event.type} event: {event.error}")
        self._rv = gpu.metadata.resource_version
        name = gpu.metadata.name
        if kind == _DELETED:
            gone = self._cache.pop(name, None)
            if gone is not None:
                self._notify_delete(gpu)
            return
        old = self._cache.get(name)
        self._cache[name] = gpu
        if old is None:
            self._notify_add(gpu)
        else:
            self._notify_update(old, gpu)

    def _notify_add(self, gpu: gpu_pb2.Gpu) -> None:
        for handler in self._add:
            self._call(handler, gpu)

    def _notify_update(self, old: gpu_pb2.Gpu, new: gpu_pb2.Gpu) -> None:
        for handler in self._update:
            self._call(handler, old, new)

    def _notify_delete(self, gpu: gpu_pb2.Gpu) -> None:
        for handler in self._delete:
            self._call(handler, gpu)

    def _call(self, handler: Callable[..., object], *args: gpu_pb2.Gpu) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception(
                "GPU informer handler failed",
                extra={"gpu": args[-1].metadata.name, "handler": getattr(handler, "__name__", "")},
            )
