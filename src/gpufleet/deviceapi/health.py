"""The provider's ``Healthy`` verdict and how it is merged into a GPU's status.

One job, with no I/O: given the status on the server and what the provider
believes (a ``HealthVerdict`` and the recent XIDs), compute the status to
write. Only the provider's own fields change (its condition type,
``recommended_action``, ``last_xids``); other providers' conditions are kept,
and a condition's ``last_transition_time`` moves only when its status does.
Deciding *what* the verdict is stays with ``GpuProvider``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from gpufleet.deviceapi.v1alpha1.gpu_pb2 import Condition, GpuStatus, XidRecord
from gpufleet.gpu.xid import Action

__all__ = [
    "CONDITION_HEALTHY",
    "HEALTHY",
    "MAX_LAST_XIDS",
    "HealthVerdict",
    "copy_xid",
    "merge_conditions",
    "merged_status",
    "to_timestamp",
]

CONDITION_HEALTHY = "Healthy"
"""The one condition type this provider owns."""
MAX_LAST_XIDS = 10


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    """What the provider believes about one GPU: its ``Healthy`` condition and action."""

    status: str
    """``True``, ``False`` or ``Unknown``."""
    reason: str
    message: str = ""
    action: Action = Action.NONE

    def condition(self, observed_generation: int) -> Condition:
        """The ``Healthy`` condition (its transition time is set by ``merge_conditions``)."""
        return Condition(
            type=CONDITION_HEALTHY,
            status=self.status,
            reason=self.reason,
            message=self.message,
            observed_generation=observed_generation,
        )


HEALTHY = HealthVerdict("True", "Healthy", "", Action.NONE)


def merge_conditions(
    current: Iterable[Condition], own: Iterable[Condition], now: datetime
) -> list[Condition]:
    """``current`` with each condition of ``own`` put in place of the one of the same type.

    Conditions of other types (other providers') are kept untouched, in order;
    new types are appended. ``last_transition_time`` is kept from the current
    condition when the status did not change, and set to ``now`` when it did.
    """
    mine = {condition.type: condition for condition in own}
    merged: list[Condition] = []
    seen: set[str] = set()
    for existing in current:
        replacement = mine.get(existing.type)
        if replacement is None:
            merged.append(_copy(existing))
            continue
        if existing.type in seen:
            continue  # a duplicate of an owned type: the owner's single copy wins
        seen.add(existing.type)
        merged.append(_with_transition(replacement, existing, now))
    for kind, condition in mine.items():
        if kind not in seen:
            merged.append(_with_transition(condition, None, now))
    return merged


def merged_status(
    current: GpuStatus,
    verdict: HealthVerdict,
    xids: Sequence[XidRecord],
    generation: int,
    now: datetime,
) -> GpuStatus:
    """The status to write: ``current`` with the provider's fields replaced, the rest kept."""
    status = GpuStatus()
    status.CopyFrom(current)
    del status.conditions[:]
    status.conditions.extend(
        merge_conditions(current.conditions, [verdict.condition(generation)], now)
    )
    status.recommended_action = verdict.action.value
    del status.last_xids[:]
    status.last_xids.extend(copy_xid(record) for record in xids[-MAX_LAST_XIDS:])
    return status


def copy_xid(record: XidRecord) -> XidRecord:
    """A copy of ``record`` that shares nothing with it."""
    copied = XidRecord()
    copied.CopyFrom(record)
    return copied


def to_timestamp(moment: datetime) -> Timestamp:
    """``moment`` as a protobuf ``Timestamp`` (in UTC)."""
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def _copy(condition: Condition) -> Condition:
    copied = Condition()
    copied.CopyFrom(condition)
    return copied


def _with_transition(condition: Condition, previous: Condition | None, now: datetime) -> Condition:
    result = _copy(condition)
    if previous is not None and previous.status == condition.status:
        result.last_transition_time.CopyFrom(previous.last_transition_time)
    else:
        result.last_transition_time.CopyFrom(to_timestamp(now))
    return result
