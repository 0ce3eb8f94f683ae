"""The device API's errors, shared by the store, the server and the client.

Each maps to one gRPC status code, so the server turns a store error into a
status and the client turns the status back into the same class: a caller
catches ``ConflictError`` on either side of the socket.
"""

from __future__ import annotations

import grpc

from gpufleet.core.errors import GpufleetError


class DeviceApiError(GpufleetError):
    """Base class; ``code`` is the gRPC status it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "Unknown"


class NotFoundError(DeviceApiError):
    """No GPU by that name."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NotFound"


class AlreadyExistsError(DeviceApiError):
    """Create of a name that exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "AlreadyExists"


class ConflictError(DeviceApiError):
    """A write carried a stale resourceVersion (or failed a precondition)."""

    code = grpc.StatusCode.ABORTED
    reason = "Conflict"


class InvalidError(DeviceApiError):
    """A malformed request: bad name, selector, resourceVersion or field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "Invalid"


class ExpiredError(DeviceApiError):
    """A watch asked to resume from a resourceVersion older than the history window."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "Expired"


class CapacityError(DeviceApiError):
    """MAX_GPUS reached, or too many watchers or streams."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "Capacity"


class WatcherEvictedError(DeviceApiError):
    """A watcher fell behind its bounded queue and was closed; relist or resume."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "Evicted"


class UnavailableError(DeviceApiError):
    """The server cannot be reached (client side)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "Unavailable"


ERRORS_BY_REASON: dict[str, type[DeviceApiError]] = {
    cls.reason: cls
    for cls in (
        NotFoundError,
        AlreadyExistsError,
        ConflictError,
        InvalidError,
        ExpiredError,
        CapacityError,
        WatcherEvictedError,
        UnavailableError,
    )
}
"""The server sends ``reason`` in the trailing metadata key ``gpufleet-reason``."""
