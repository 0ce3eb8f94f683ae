"""The provider's health logic on its own: facts about one GPU in, a verdict out."""

from __future__ import annotations

from datetime import UTC, datetime

from gpufleet.deviceapi.tracking import TrackedGpu
from gpufleet.deviceapi.v1alpha1.gpu_pb2 import GpuSpec
from gpufleet.gpu.model import GpuSample, XidEvent
from gpufleet.gpu.source import GpuError, GpuLostError
from gpufleet.gpu.xid import DEFAULT_CATALOGUE, Action

UUID = "GPU-5b9a2e6c-0d47-4c5e-9f0a-3e1c2b7d8a91"


def _tracked() -> TrackedGpu:
    return TrackedGpu(name="gpu-x", uuid=UUID, spec=GpuSpec(uuid=UUID), labels={})


def _xid(tracked: TrackedGpu, xid: int) -> None:
    event = XidEvent(gpu_uuid=UUID, xid=xid, timestamp=datetime(2026, 1, 2, tzinfo=UTC))
    tracked.record_xid(event, DEFAULT_CATALOGUE.lookup(xid))


def test_a_gpu_with_no_problem_is_healthy() -> None:
    assert _tracked().verdict().status == "True"


def test_lost_is_the_first_reason_and_the_action_is_the_most_disruptive() -> None:
    tracked = _tracked()
    tracked.observe(GpuSample(uuid=UUID, retired_pages_pending=True))
    tracked.observe(GpuLostError("fell off the bus"))
    verdict = tracked.verdict()
    assert (verdict.status, verdict.reason, verdict.action) == (
        "False",
        "GpuLost",
        Action.REBOOT_NODE,
    )


def test_a_failed_read_keeps_what_was_known() -> None:
    tracked = _tracked()
    tracked.observe(GpuSample(uuid=UUID, remapped_rows_failure=True))
    tracked.observe(GpuError("nvmlDeviceGetRemappedRows: Unknown Error"))
    assert tracked.verdict().reason == "RowRemapFailure"


def test_a_critical_xid_latches_and_a_good_sample_does_not_clear_it() -> None:
    tracked = _tracked()
    _xid(tracked, 79)
    tracked.observe(GpuSample(uuid=UUID))
    assert tracked.verdict().reason == "XidCritical"
    assert [record.xid for record in tracked.xids] == [79]


def test_a_warning_xid_is_recorded_without_changing_the_verdict() -> None:
    tracked = _tracked()
    _xid(tracked, 92)
    assert (tracked.verdict().status, [record.xid for record in tracked.xids]) == ("True", [92])
