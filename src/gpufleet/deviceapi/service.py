"""The ``GpuService`` gRPC servicer: the store's operations on the wire.

Each RPC calls the store directly on the event loop (its methods are
synchronous and fast), turns a store error into a status with the error's
reason in the ``gpufleet-reason`` trailing metadata, and turns anything
unexpected into a generic ``internal error`` whose details stay in the log.

WatchGpus streams a store `Watcher`'s events. A watch event is the same for
every watcher that receives it, so its encoding is cached by (type,
resourceVersion) and a hundred watchers cost one serialization, not a hundred.
"""

from __future__ import annotations

import asyncio
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
from gpufleet.deviceapi.metrics import DeviceApiMetrics
from gpufleet.deviceapi.store import GpuStore, Watcher
from gpufleet.deviceapi.v1alpha1 import gpu_pb2

__all__ = ["SERVICE_NAME", "GpuService"]

log = logging.getLogger(__name__)

SERVICE_NAME: str = gpu_pb2.DESCRIPTOR.services_by_name["GpuService"].full_name

_INTERNAL_REASON = "Internal"
_SERIALIZED_CACHE = 8192

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
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._bookmark_interval = bookmark_interval
        self._max_watches = max_watches
        self._on_create = on_create
        self._clock = clock
        self._watchers: set[Watcher] = set()
        self._closing = False
        self._encoded: dict[tuple[int, str], bytes] = {}

    @property
    def active_watches(self) -> int:
        """Open WatchGpus streams."""
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
        handlers["WatchGpus"] = grpc.unary_stream_rpc_method_handler(
            self._watch,
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

    # -- WatchGpus ------------------------------------------------------------

    async def _watch(
        self, request: gpu_pb2.WatchGpusRequest, context: grpc.aio.ServicerContext[Any, Any]
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
                async for encoded in self._stream(watcher, request.allow_bookmarks):
                    yield encoded
            except DeviceApiError as error:
                code = error.code.name
                await _abort(context, error)
            except Exception:
                if self._closing:
                    code = grpc.StatusCode.UNAVAILABLE.name
                    await _abort(context, UnavailableError("server is shutting down"))
                code = grpc.StatusCode.INTERNAL.name
                log.exception("device API WatchGpus failed", extra={"method": "WatchGpus"})
                await context.abort(grpc.StatusCode.INTERNAL, "internal error", _INTERNAL_TRAILER)
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away (or the server is stopping): just let go.
            code = grpc.StatusCode.CANCELLED.name
            raise
        finally:
            if watcher is not None:
                self._watchers.discard(watcher)
                watcher.close()
            self._metrics.observe("WatchGpus", code, time.perf_counter() - start)

    async def _stream(self, watcher: Watcher, bookmarks: bool) -> AsyncIterator[bytes]:
        """Encoded events of one watcher, with a bookmark when idle past the interval."""
        interval = self._bookmark_interval
        next_bookmark = self._clock() + interval
        metrics = self._metrics
        while True:
            timeout = max(0.0, next_bookmark - self._clock()) if bookmarks else None
            # Eviction and expiry raise their DeviceApiError, which `_watch` sends on.
            event = await watcher.get(timeout)
            if self._closing:
                raise UnavailableError("server is shutting down")
            if event is None:
                if bookmarks and self._clock() >= next_bookmark:
                    yield watcher.bookmark().SerializeToString()
                    metrics.watch_event("BOOKMARK")
                    next_bookmark = self._clock() + interval
                continue
            kind = _EVENT_TYPE_NAMES.get(event.type, "ERROR")
            yield self._encode(event)
            metrics.watch_event(kind)

    def _encode(self, event: gpu_pb2.WatchEvent) -> bytes:
        rv = event.object.metadata.resource_version
        if not rv:
            plain: bytes = event.SerializeToString()
            return plain
        key = (int(event.type), rv)
        encoded: bytes | None = self._encoded.get(key)
        if encoded is None:
            encoded = event.SerializeToString()
            if len(self._encoded) >= _SERIALIZED_CACHE:
                # Oldest first: dicts keep insertion order, and watchers lag little.
                del self._encoded[next(iter(self._encoded))]
            self._encoded[key] = encoded
        return encoded
