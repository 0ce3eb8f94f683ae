"""How the CSI Node service answers a refusal: one gRPC code per error, one log line.

Every check of `node.NodeServicer` that fails calls `refuse` with the code the CSI spec (or
the kubelet's retry) wants; the RPC then ends in `abort`, which logs one line at a level
that says whose fault it was and answers with the code. A `VolumeError` of the node state
maps to its code through `status_code`, the table docs/kcache-cluster.md states.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
import grpc.aio

from gpufleet.kcache.errors import (
    CacheAccessDeniedError,
    CacheIncompatibleError,
    CacheNotFoundError,
    CacheNotReadyError,
    InvalidVolumeError,
    KcacheError,
    VolumeError,
)

__all__ = ["Refusal", "abort", "refuse", "status_code"]

_CODES: tuple[tuple[type[VolumeError], grpc.StatusCode], ...] = (
    (CacheNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (CacheIncompatibleError, grpc.StatusCode.FAILED_PRECONDITION),
    (CacheNotFoundError, grpc.StatusCode.NOT_FOUND),
    (CacheAccessDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidVolumeError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_code(error: VolumeError) -> grpc.StatusCode:
    """The gRPC code a `VolumeError` is answered with (INTERNAL for an unknown subclass)."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


class Refusal(Exception):
    """A request answered with `code` and `message` (raised, then turned into an abort)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refuse(code: grpc.StatusCode, message: str, *, cause: BaseException | None = None) -> NoReturn:
    """End the request being served with `code` and `message` (`abort` answers it)."""
    raise Refusal(code, message) from cause


async def abort(
    context: grpc.aio.ServicerContext,
    log: logging.Logger,
    what: str,
    volume_id: str,
    error: Exception,
) -> None:
    """Log one line for `error` on `log` and answer with its code (INTERNAL for a failure of ours).

    ``context.abort`` raises, so the RPC ends here.
    """
    if isinstance(error, Refusal):
        refusal, cause = error, error.__cause__
    else:
        refusal = Refusal(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")
        cause = error
    if refusal.code == grpc.StatusCode.INTERNAL:
        level = logging.ERROR
    elif refusal.code == grpc.StatusCode.UNAVAILABLE:
        level = logging.INFO  # still pulling: how every volume starts; the kubelet retries
    else:
        level = logging.WARNING
    log.log(
        level,
        what,
        exc_info=cause
        if isinstance(cause, Exception) and not isinstance(cause, KcacheError)
        else None,
        extra={"volume_id": volume_id[:256], "code": refusal.code.name, "reason": refusal.message},
    )
    await context.abort(refusal.code, refusal.message)
