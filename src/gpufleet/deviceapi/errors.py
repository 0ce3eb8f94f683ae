"""The device API's errors, shared by the store, the server and the client.

Each maps to one gRPC status code, so the server turns a store error into a
status and the client turns the status back into the same class: a caller
catches ``ConflictError`` on either side of the socket.

Every error class has the same shape (a docstring, a status ``code`` and a
``reason``), so the shape is written once: ``DeviceApiError.__init_subclass__``
takes ``code`` and ``reason`` as class keywords and records each class that
names a reason in ``ERRORS_BY_REASON``. A subclass that names neither (such as
the store's ``WatcherClosedError``) inherits both and is not recorded: its
parent's reason already stands for it on the wire.
"""

from __future__ import annotations

from typing import Any

import grpc

from gpufleet.core.errors import GpufleetError

ERRORS_BY_REASON: dict[str, type[DeviceApiError]] = {}
"""The server sends ``reason`` in the trailing metadata key ``gpufleet-reason``."""


class DeviceApiError(GpufleetError):
    """Base class; ``code`` is the gRPC status it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "Unknown"

    def __init_subclass__(
        cls,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Give the subclass its ``code`` and ``reason``; one with a reason is looked up by it."""
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if reason is not None:
            if reason in ERRORS_BY_REASON:
                raise TypeError(f"{cls.__name__}: reason {reason!r} is taken")
            cls.reason = reason
            ERRORS_BY_REASON[reason] = cls


class NotFoundError(DeviceApiError, code=grpc.StatusCode.NOT_FOUND, reason="NotFound"):
    """No GPU by that name."""


class AlreadyExistsError(
    DeviceApiError, code=grpc.StatusCode.ALREADY_EXISTS, reason="AlreadyExists"
):
    """Create of a name that exists."""


class ConflictError(DeviceApiError, code=grpc.StatusCode.ABORTED, reason="Conflict"):
    """A write carried a stale resourceVersion (or failed a precondition)."""


class InvalidError(DeviceApiError, code=grpc.StatusCode.INVALID_ARGUMENT, reason="Invalid"):
    """A malformed request: bad name, selector, resourceVersion or field."""


class ExpiredError(DeviceApiError, code=grpc.StatusCode.OUT_OF_RANGE, reason="Expired"):
    """A watch asked to resume from a resourceVersion older than the history window."""


class CapacityError(DeviceApiError, code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="Capacity"):
    """MAX_GPUS reached, or too many watchers or streams."""


class WatcherEvictedError(
    DeviceApiError, code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="Evicted"
):
    """A watcher fell behind its bounded queue and was closed; relist or resume."""


class UnavailableError(DeviceApiError, code=grpc.StatusCode.UNAVAILABLE, reason="Unavailable"):
    """The server cannot be reached (client side)."""
