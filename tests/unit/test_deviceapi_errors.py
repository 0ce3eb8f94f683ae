"""The device API's error classes: one shape, the same codes and reasons on both sides."""

from __future__ import annotations

import grpc
import pytest

from gpufleet.deviceapi import errors
from gpufleet.deviceapi.watcher import WatcherClosedError


def test_every_error_class_keeps_its_code_and_reason() -> None:
    assert {
        reason: (cls.__name__, cls.code, cls.reason)
        for reason, cls in errors.ERRORS_BY_REASON.items()
    } == {
        "NotFound": ("NotFoundError", grpc.StatusCode.NOT_FOUND, "NotFound"),
        "AlreadyExists": ("AlreadyExistsError", grpc.StatusCode.ALREADY_EXISTS, "AlreadyExists"),
        "Conflict": ("ConflictError", grpc.StatusCode.ABORTED, "Conflict"),
        "Invalid": ("InvalidError", grpc.StatusCode.INVALID_ARGUMENT, "Invalid"),
        "Expired": ("ExpiredError", grpc.StatusCode.OUT_OF_RANGE, "Expired"),
        "Capacity": ("CapacityError", grpc.StatusCode.RESOURCE_EXHAUSTED, "Capacity"),
        "Evicted": ("WatcherEvictedError", grpc.StatusCode.RESOURCE_EXHAUSTED, "Evicted"),
        "Unavailable": ("UnavailableError", grpc.StatusCode.UNAVAILABLE, "Unavailable"),
    }


def test_a_subclass_without_a_reason_travels_as_its_parent() -> None:
    assert (WatcherClosedError.code, WatcherClosedError.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "Unavailable",
    )
    assert errors.ERRORS_BY_REASON["Unavailable"] is errors.UnavailableError


def test_two_classes_cannot_share_a_reason() -> None:
    with pytest.raises(TypeError, match="'Conflict' is taken"):

        class _Again(errors.DeviceApiError, reason="Conflict"):
            """A second class for one reason."""
