"""The ``GpuService`` gRPC servicer: the store's operations on the wire.

Each RPC calls the store directly on the event loop (its methods are
synchronous and fast), turns a store error into a status with the error's
reason in the ``gpufleet-reason`` trailing metadata, and turns anything
unexpected into a generic ``internal error`` whose details stay in the log.

WatchGpus and WatchGpuBatches stream a store `Watcher`'s events. The store
encodes each event once, and both send those bytes as they are (the response
serializer passes bytes through), so a hundred watchers cost one
serialization, not a hundred. WatchGpus sends one event per message.
WatchGpuBatches sends everything queued (up to a cap) as one
``WatchEventBatch``, built by concatenating the events' pre-encoded entries:
while one message is being written more events queue up, so batches grow with
the load by themselves and stay at one event when the watch is idle. gRPC's
per-message cost, not encoding, is what limits a Python server's watch
throughput; batches only form when events arrive faster than a watcher's
sender runs (bursts, replays, concurrent writers), see docs/device-api.md.
An optional linger (``WATCH_LINGER``, off by default) makes a batched sender
wait until that long after its first event was written, so that a steady
stream of writes leaves in fewer, larger messages; WatchGpus never lingers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import Message

from gpufleet.deviceapi.client import REASON_KEY
from gpufleet.deviceapi.errors import (
    CapacityError,
    DeviceApiError,
    InvalidError,
    UnavailableError,
)
from gpufleet.deviceapi.events import WatchItem, watch_item
from gpufleet.deviceapi.metrics import DeviceApiMetrics
from gpufleet.deviceapi.store import GpuStore
from gpufleet.deviceapi.v1alpha1 import gpu_pb2
from gpufleet.deviceapi.watcher import Watcher

__all__ = ["BATCH_MAX_BYTES", "BATCH_MAX_EVENTS", "SERVICE_NAME", "GpuService"]

log = logging.getLogger(__name__)

SERVICE_NAME: str = gpu_pb2.DESCRIPTOR.services_by_name["GpuService"].full_name

_INTERNAL_REASON = "Internal"
BATCH_MAX_EVENTS = 256
"""The most events WatchGpuBatches puts in one message."""
BATCH_MAX_BYTES = 1024 * 1024
"""The most bytes of one WatchGpuBatches message, unless a single event is larger."""

_EVENT_TYPE_NAMES: dict[int, str] = {value: name for name, value in gpu_pb2.WatchEvent.Type.items()}
_INTERNAL_TRAILER = ((REASON_KEY, _INTERNAL_REASON),)


def _check_gpu(request: Any) -> gpu_pb2.Gpu:
    # The store validates the object itself; an absent one is a malformed request.
    if not request.HasField("gpu"):
        raise InvalidError("gpu is required")
    gpu: gpu_pb2.Gpu = request.gpu
    return gpu


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: DeviceApiError) -> NoReturn:
    await context.abort(error.code, str(error) or error.reason, ((REASON_KEY, error.reason),))
    raise AssertionError("unreachable")  # pragma: no cover - abort always raises


def _serialize(message: bytes | Message) -> bytes:
    # Watch events arrive pre-encoded (bytes); everything else is a message.
    return message if isinstance(message, bytes) else message.SerializeToString()


class GpuService:
    """The gRPC face of a `GpuStore`; register it with `handler()`."""

    def __init__(
        self,
        store: GpuStore,
        *,
        metrics: DeviceApiMetrics,
        bookmark_interval: float = 30.0,
        max_watches: int = 256,
        on_create: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch_max_events: int = BATCH_MAX_EVENTS,
        batch_max_bytes: int = BATCH_MAX_BYTES,
        watch_linger: float = 0.0,
    ) -> None:
        if batch_max_events < 1 or batch_max_bytes < 1:
            raise ValueError("batch_max_events and batch_max_bytes must be >= 1")
        if watch_linger < 0:
            raise ValueError("watch_linger must be >= 0")
        self._store = store
        self._metrics = metrics
        self._bookmark_interval = bookmark_interval
        self._max_watches = max_watches
        self._on_create = on_create
        self._clock = clock
        self._watchers: set[Watcher] = set()
        self._closing = False
        self._batch_max_events = batch_max_events
        self._batch_max_bytes = batch_max_bytes
        self._watch_linger = watch_linger

    @property
    def active_watches(self) -> int:
        """Open WatchGpus and WatchGpuBatches streams."""
        return len(self._watchers)

    def handler(self) -> grpc.GenericRpcHandler:
        """The method handlers to pass to ``server.add_generic_rpc_handlers``."""
        unary: dict[str, tuple[Any, Callable[[Any], Message]]] = {
            "CreateGpu": (gpu_pb2.CreateGpuRequest, self._create),
            "GetGpu": (gpu_pb2.GetGpuRequest, self._get),
            "ListGpus": (gpu_pb2.ListGpusRequest, self._list),
            "UpdateGpu": (gpu_pb2.UpdateGpuRequest, self._update),
            "UpdateGpuStatus": (gpu_pb2.UpdateGpuStatusRequest, self._update_status),
            "DeleteGpu": (gpu_pb2.DeleteGpuRequest, self._delete),
        }
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(
                self._unary(name, call),
                request_deserializer=request_type.FromString,
                response_serializer=_serialize,
            )
            for name, (request_type, call) in unary.items()
        }
        for name, batched in (("WatchGpus", False), ("WatchGpuBatches", True)):
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                # A partial, not a closure: grpc.aio recognises async generators
                # (and partials of them) to stream their yields.
                functools.partial(self._watch, name, batched),
                request_deserializer=gpu_pb2.WatchGpusRequest.FromString,
                response_serializer=_serialize,
            )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def close(self) -> None:
        """Close every open watch (server shutdown); their streams end with UNAVAILABLE."""
        self._closing = True
        for watcher in list(self._watchers):
            watcher.close()

    # -- unary RPCs -----------------------------------------------------------

    def _unary(
        self, method: str, call: Callable[[Any], Message]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            start = time.perf_counter()
            code = "OK"
            try:
                try:
                    return call(request)
                except DeviceApiError as error:
                    code = error.code.name
                    await _abort(context, error)
                except Exception:
                    code = grpc.StatusCode.INTERNAL.name
                    log.exception("device API %s failed", method, extra={"method": method})
                    await context.abort(
                        grpc.StatusCode.INTERNAL, "internal error", _INTERNAL_TRAILER
                    )
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED.name
                raise
            finally:
                self._metrics.observe(method, code, time.perf_counter() - start)
            raise AssertionError("unreachable")  # pragma: no cover - abort always raises

        return handle

    def _create(self, request: gpu_pb2.CreateGpuRequest) -> gpu_pb2.Gpu:
        created = self._store.create(_check_gpu(request))
        if self._on_create is not None:
            self._on_create()
        return created

    def _get(self, request: gpu_pb2.GetGpuRequest) -> gpu_pb2.Gpu:
        return self._store.get(request.name)

    def _list(self, request: gpu_pb2.ListGpusRequest) -> gpu_pb2.GpuList:
        return self._store.list(label_selector=request.label_selector)

    def _update(self, request: gpu_pb2.UpdateGpuRequest) -> gpu_pb2.Gpu:
        return self._store.update(_check_gpu(request))

    def _update_status(self, request: gpu_pb2.UpdateGpuStatusRequest) -> gpu_pb2.Gpu:
        return self._store.update_status(_check_gpu(request))

    def _delete(self, request: gpu_pb2.DeleteGpuRequest) -> gpu_pb2.Gpu:
        return self._store.delete(
            request.name, resource_version=request.resource_version, uid=request.uid
        )

    # -- WatchGpus and WatchGpuBatches -----------------------------------------

    async def _watch(
        self,
        method: str,
        batched: bool,
        request: gpu_pb2.WatchGpusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        start = time.perf_counter()
        code = "OK"
        watcher: Watcher | None = None
        try:
            try:
                if self._closing:
                    raise UnavailableError("server is shutting down")
                if len(self._watchers) >= self._max_watches:
                    raise CapacityError(f"too many watches (MAX_STREAMS={self._max_watches})")
                watcher = self._store.watch(
                    resource_version=request.resource_version,
                    label_selector=request.label_selector,
                )
                self._watchers.add(watcher)
                async for encoded in self._stream(watcher, request.allow_bookmarks, batched):
                    yield encoded
            except DeviceApiError as error:
                code = error.code.name
                await _abort(context, error)
            except Exception:
                if self._closing:
                    code = grpc.StatusCode.UNAVAILABLE.name
                    await _abort(context, UnavailableError("server is shutting down"))
                code = grpc.StatusCode.INTERNAL.name
                log.exception("device API %s failed", method, extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, "internal error", _INTERNAL_TRAILER)
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away (or the server is stopping): just let go.
            code = grpc.StatusCode.CANCELLED.name
            raise
        finally:
            if watcher is not None:
                self._watchers.discard(watcher)
                watcher.close()
            self._metrics.observe(method, code, time.perf_counter() - start)

    async def _stream(
        self, watcher: Watcher, bookmarks: bool, batched: bool
    ) -> AsyncIterator[bytes]:
        """One watcher's messages, with a bookmark when idle past the interval.

        Batched: a ``WatchEventBatch`` of everything queued (up to the caps);
        otherwise one ``WatchEvent`` per message. Either way the bytes are the
        store's encodings, joined, never re-serialized.
        """
        interval = self._bookmark_interval
        next_bookmark = self._clock() + interval
        metrics = self._metrics
        messages = metrics.watch_messages
        max_events = self._batch_max_events if batched else 1
        max_bytes = self._batch_max_bytes
        # Only batches linger: a one-event message gains nothing from waiting.
        linger = self._watch_linger if batched else 0.0
        while True:
            timeout = max(0.0, next_bookmark - self._clock()) if bookmarks else None
            # Eviction and expiry raise their DeviceApiError, which `_watch` sends on.
            items = await watcher.take(max_events, max_bytes, timeout, linger)
            if self._closing:
                raise UnavailableError("server is shutting down")
            if not items:
                if bookmarks and self._clock() >= next_bookmark:
                    event = watcher.bookmark()
                    item = watch_item(int(event.object.metadata.resource_version), event)
                    yield item.head + item.wire if batched else item.wire
                    metrics.watch_event("BOOKMARK")
                    messages.inc()
                    next_bookmark = self._clock() + interval
                continue
            if batched:
                yield b"".join([part for item in items for part in (item.head, item.wire)])
            else:
                yield items[0].wire
            _count_events(metrics, items)
            messages.inc()


def _count_events(metrics: DeviceApiMetrics, items: list[WatchItem]) -> None:
    """Count events (not messages), one counter increment per type per message."""
    if len(items) == 1:
        metrics.watch_event(_EVENT_TYPE_NAMES.get(items[0].event.type, "ERROR"))
        return
    counts: dict[int, int] = {}
    for item in items:
        kind = item.event.type
        counts[kind] = counts.get(kind, 0) + 1
    for kind_value, count in counts.items():
        metrics.watch_event(_EVENT_TYPE_NAMES.get(kind_value, "ERROR"), count)
