"""The async device API client: every RPC as a method, errors as `errors.py` classes.

A failed call raises the same class the store raised on the server (the server
sends its ``reason`` in trailing metadata); statuses without a reason map by
code, so an unreachable server is an `UnavailableError` and a too-large
request a `CapacityError`.
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

__all__ = ["REASON_KEY", "DeviceApiClient", "channel_target", "translate_error"]

REASON_KEY = "gpufleet-reason"
"""Trailing metadata key in which the server sends a DeviceApiError's ``reason``."""

# The server may answer a List of thousands of GPUs with more than gRPC's
# default 4 MiB receive limit.
_MAX_RECEIVE_BYTES = 64 * 1024 * 1024

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
        call = self._stub.WatchGpus(
            gpu_pb2.WatchGpusRequest(
                resource_version=resource_version,
                label_selector=label_selector,
                allow_bookmarks=allow_bookmarks,
            )
        )
        try:
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    return
                yield event
        except grpc.aio.AioRpcError as error:
            raise translate_error(error) from None
        finally:
            call.cancel()
