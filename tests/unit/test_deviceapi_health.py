"""The provider's status merge: own conditions replaced, others kept (``deviceapi.health``)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from gpufleet.deviceapi.health import (
    CONDITION_HEALTHY,
    HealthVerdict,
    merge_conditions,
    merged_status,
)
from gpufleet.deviceapi.v1alpha1.gpu_pb2 import Condition, GpuStatus, XidRecord
from gpufleet.gpu.xid import Action

EARLIER = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _condition(kind: str, status: str, reason: str = "", when: datetime = EARLIER) -> Condition:
    return Condition(type=kind, status=status, reason=reason, last_transition_time=_stamp(when))


def test_merge_replaces_own_types_and_keeps_others_in_place() -> None:
    current = [
        _condition("ThermalOk", "True", "Cool"),
        _condition(CONDITION_HEALTHY, "True", "Healthy"),
        _condition("NvlinkOk", "False", "LinkDown"),
    ]
    own = [Condition(type=CONDITION_HEALTHY, status="False", reason="XidCritical")]
    merged = merge_conditions(current, own, NOW)
    assert [(c.type, c.status, c.reason) for c in merged] == [
        ("ThermalOk", "True", "Cool"),
        (CONDITION_HEALTHY, "False", "XidCritical"),
        ("NvlinkOk", "False", "LinkDown"),
    ]


def test_merge_keeps_other_providers_conditions_byte_for_byte() -> None:
    theirs = _condition("ThermalOk", "Unknown", "NoSensor")
    theirs.message = "their words"
    theirs.observed_generation = 7
    merged = merge_conditions([theirs], [Condition(type=CONDITION_HEALTHY, status="True")], NOW)
    assert merged[0] == theirs


def test_merge_appends_an_own_type_that_is_new() -> None:
    merged = merge_conditions(
        [_condition("ThermalOk", "True")], [Condition(type=CONDITION_HEALTHY, status="True")], NOW
    )
    assert [c.type for c in merged] == ["ThermalOk", CONDITION_HEALTHY]
    assert merged[1].last_transition_time.ToDatetime(tzinfo=UTC) == NOW


def test_merge_keeps_transition_time_when_status_is_unchanged() -> None:
    current = [_condition(CONDITION_HEALTHY, "False", "GpuLost", when=EARLIER)]
    own = [Condition(type=CONDITION_HEALTHY, status="False", reason="XidCritical")]
    (merged,) = merge_conditions(current, own, NOW)
    assert merged.last_transition_time.ToDatetime(tzinfo=UTC) == EARLIER


def test_merge_sets_transition_time_when_status_changes() -> None:
    current = [_condition(CONDITION_HEALTHY, "True", "Healthy", when=EARLIER)]
    own = [Condition(type=CONDITION_HEALTHY, status="False", reason="XidCritical")]
    (merged,) = merge_conditions(current, own, NOW)
    assert merged.last_transition_time.ToDatetime(tzinfo=UTC) == NOW


def test_merged_status_of_an_unchanged_verdict_equals_the_current_status() -> None:
    verdict = HealthVerdict("True", "Healthy", "", Action.NONE)
    first = merged_status(GpuStatus(), verdict, [], 1, EARLIER)
    assert merged_status(first, verdict, [], 1, NOW) == first


def test_merged_status_writes_action_and_keeps_the_newest_ten_xids() -> None:
    xids = [XidRecord(xid=n, description=f"x{n}") for n in range(1, 13)]
    verdict = HealthVerdict("False", "XidCritical", "XID 79", Action.REBOOT_NODE)
    status = merged_status(GpuStatus(), verdict, xids, 3, NOW)
    assert status.recommended_action == "RebootNode"
    assert [record.xid for record in status.last_xids] == list(range(3, 13))
    assert status.conditions[0].observed_generation == 3
