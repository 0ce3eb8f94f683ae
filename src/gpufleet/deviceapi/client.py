"""The async device API client: every RPC as a method, errors as `errors.py` classes.

A failed call raises the same class the store raised on the server (the server
sends its ``reason`` in trailing metadata); statuses without a reason map by
code, so an unreachable server is an `UnavailableError` and a too-large
request a `CapacityError`.

`watch` reads WatchGpuBatches (several events per stream message, see
``service.py``) and yields the events one by one, so callers never see the
batching. Each event is parsed on its own rather than as part of its batch:
protobuf sub-messages share their parent's memory, so one cached
``event.object`` would otherwise keep its whole batch alive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from gpufleet.deviceapi.errors import (
    ERRORS_BY_REASON,
    AlreadyExistsError,
    CapacityError,
    ConflictError,
    DeviceApiError,
    ExpiredError,
    InvalidError,
    NotFoundError,
    UnavailableError,
)
from gpufleet.deviceapi.v1alpha1 import gpu_pb2, gpu_pb2_grpc

__all__ = ["REASON_KEY", "DeviceApiClient", "channel_target", "split_batch", "translate_error"]

REASON_KEY = "gpufleet-reason"
"""Trailing metadata key in which the server sends a DeviceApiError's ``reason``."""

# The server may answer a List of thousands of GPUs with more than gRPC's
# default 4 MiB receive limit.
_MAX_RECEIVE_BYTES = 64 * 1024 * 1024

_WATCH_BATCHES = f"/{gpu_pb2.DESCRIPTOR.services_by_name['GpuService'].full_name}/WatchGpuBatches"

_ERRORS_BY_CODE: dict[grpc.StatusCode, type[DeviceApiError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidError,
    grpc.StatusCode.OUT_OF_RANGE: ExpiredError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    # A stream the *server* cancelled: it is shutting down. (A cancel of our own
    # surfaces as asyncio.CancelledError, never as an AioRpcError.)
    grpc.StatusCode.CANCELLED: UnavailableError,
}


def channel_target(target: str | Path) -> str:
    """A gRPC target from a socket path, ``unix:...`` URI or ``host:port``."""
    text = str(target)
    if text.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        return text
    if isinstance(target, Path) or text.startswith(("/", ".", "~")) or text.endswith(".sock"):
        return "unix:" + str(Path(text).expanduser().absolute())
    return text


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("WatchEventBatch: truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def split_batch(data: bytes) -> list[gpu_pb2.WatchEvent]:
    """The events of an encoded ``WatchEventBatch``, each parsed as its own message.

    Fields other than ``events`` (from a newer server) are skipped.
    """
    events: list[gpu_pb2.WatchEvent] = []
    parse = gpu_pb2.WatchEvent.FromString
    view = memoryview(data)
    end = len(data)
    pos = 0
    while pos < end:
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 2:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError("WatchEventBatch: truncated field")
            if key == 0x0A:  # field 1, events
                events.append(parse(view[pos : pos + size]))
            pos += size
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"WatchEventBatch: unexpected wire type {wire_type}")
    if pos != end:
        raise ValueError("WatchEventBatch: truncated field")
    return events


def translate_error(error: grpc.aio.AioRpcError) -> DeviceApiError:
    """The `errors.py` exception for a failed call: by reason first, then by status code."""
    reason = ""
    for key, value in error.trailing_metadata() or ():
        if key == REASON_KEY:
            reason = value.decode() if isinstance(value, bytes) else str(value)
            break
    code = error.code()
    cls = ERRORS_BY_REASON.get(reason) or _ERRORS_BY_CODE.get(code, DeviceApiError)
    translated = cls(error.details() or code.name)
    if cls is DeviceApiError:
        # The base class stands for "anything else": keep what actually happened.
        translated.code = code
        translated.reason = reason or code.name
    return translated


class DeviceApiClient:
    """An async client of one device API server; use as ``async with``.

    `target` is a unix socket path, ``unix:///path`` or ``host:port``; for a
    remote TLS server pass `credentials`. `timeout` bounds every unary call
    (watches run until cancelled).
    """

    def __init__(
        self,
        target: str | Path,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = 30.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = channel_target(target)
        channel_options = [("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES), *options]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, credentials, options=channel_options
            )
        self._stub: Any = gpu_pb2_grpc.GpuServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._watch_batches = self._channel.unary_stream(
            _WATCH_BATCHES,
            request_serializer=gpu_pb2.WatchGpusRequest.SerializeToString,
            response_deserializer=split_batch,
        )
        # False once a server answered UNIMPLEMENTED (it predates WatchGpuBatches).
        self._batched = True
        self._timeout = timeout

    async def __aenter__(self) -> DeviceApiClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; open watches end."""
        await self._channel.close()

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise translate_error(error) from None

    async def create(self, gpu: gpu_pb2.Gpu) -> gpu_pb2.Gpu:
        """Create `gpu`; AlreadyExistsError if the name is taken."""
        result: gpu_pb2.Gpu = await self._unary("CreateGpu", gpu_pb2.CreateGpuRequest(gpu=gpu))
        return result

    async def get(self, name: str) -> gpu_pb2.Gpu:
        """The GPU called `name`; NotFoundError if none."""
        result: gpu_pb2.Gpu = await self._unary("GetGpu", gpu_pb2.GetGpuRequest(name=name))
        return result

    async def list(self, label_selector: str = "") -> gpu_pb2.GpuList:
        """Every GPU matching `label_selector`, with the resourceVersion to watch from."""
        result: gpu_pb2.GpuList = await self._unary(
            "ListGpus", gpu_pb2.ListGpusRequest(label_selector=label_selector)
        )
        return result

    async def update(self, gpu: gpu_pb2.Gpu) -> gpu_pb2.Gpu:
        """Apply `gpu`'s spec, labels and annotations; ConflictError on a stale resourceVersion."""
        result: gpu_pb2.Gpu = await self._unary("UpdateGpu", gpu_pb2.UpdateGpuRequest(gpu=gpu))
        return result

    async def update_status(self, gpu: gpu_pb2.Gpu) -> gpu_pb2.Gpu:
        """Apply only `gpu`'s status; ConflictError on a stale resourceVersion."""
        result: gpu_pb2.Gpu = await self._unary(
            "UpdateGpuStatus", gpu_pb2.UpdateGpuStatusRequest(gpu=gpu)
        )
        return result

    async def delete(self, name: str, *, resource_version: str = "", uid: str = "") -> gpu_pb2.Gpu:
        """Delete `name`, optionally only at `resource_version` / `uid`; returns the object."""
        result: gpu_pb2.Gpu = await self._unary(
            "DeleteGpu",
            gpu_pb2.DeleteGpuRequest(name=name, resource_version=resource_version, uid=uid),
        )
        return result

    async def watch(
        self,
        resource_version: str = "",
        label_selector: str = "",
        allow_bookmarks: bool = True,
    ) -> AsyncIterator[gpu_pb2.WatchEvent]:
        """Events after `resource_version` ("" or "0": ADDED for every GPU first).

        Ends by raising: ExpiredError (relist), WatcherEvictedError (fell
        behind; relist), UnavailableError (server gone or shutting down).
        Leaving the loop early cancels the stream.
        """
        request = gpu_pb2.WatchGpusRequest(
            resource_version=resource_version,
            label_selector=label_selector,
            allow_bookmarks=allow_bookmarks,
        )
        while True:
            batched = self._batched
            call = self._watch_batches(request) if batched else self._stub.WatchGpus(request)
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        return
                    if batched:
                        for event in message:
                            yield event
                    else:
                        yield message
            except grpc.aio.AioRpcError as error:
                if batched and error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # A server older than WatchGpuBatches (nothing was delivered):
                    # the same watch, one event per message.
                    self._batched = False
                    continue
                raise translate_error(error) from None
            finally:
                call.cancel()
