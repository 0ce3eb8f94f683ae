"""Request validation for the device API store: reject a bad write before it changes anything.

One job, with no state: check what a client sends (object names, labels,
annotations, conditions, resourceVersions, the length of every string field and
the size of the whole object) against the Kubernetes rules the store promises,
and raise ``InvalidError`` saying which field is wrong and why.
Conflicts, existence and capacity depend on the stored objects and stay with
``GpuStore``.
"""

from __future__ import annotations

import re

from gpufleet.deviceapi.errors import InvalidError
from gpufleet.deviceapi.selector import label_key_problem, label_value_problem
from gpufleet.deviceapi.v1alpha1 import gpu_pb2 as pb

__all__ = [
    "CONDITION_STATUSES",
    "MAX_ANNOTATIONS_BYTES",
    "MAX_LAST_XIDS",
    "SPEC_FIELD_LIMITS",
    "check_name",
    "check_object_size",
    "parse_resource_version",
    "validate_meta_and_spec",
    "validate_status",
]

CONDITION_STATUSES = frozenset({"True", "False", "Unknown"})
MAX_ANNOTATIONS_BYTES = 256 * 1024
"""Kubernetes' limit on an object's annotations, keys and values together."""
# Each string field has a cap of its own, Kubernetes' where it has one, so that
# no single field can take the whole MAX_OBJECT_BYTES and a message names the
# field that is too long. Lengths count characters, as Kubernetes' schemas do.
SPEC_FIELD_LIMITS: dict[str, int] = {
    "uuid": 128,  # "GPU-" or "MIG-" and a UUID: 40
    "serial": 128,
    "product": 256,
    "pci_bus_id": 64,  # "00000000:07:00.0": 16
    "node": 253,  # a node name is a DNS-1123 subdomain
}
MAX_CONDITION_TYPE = 316  # a qualified name: a 253-character prefix, "/", 63 characters
MAX_CONDITION_REASON = 1024  # metav1.Condition
MAX_CONDITION_MESSAGE = 32768  # metav1.Condition
MAX_RECOMMENDED_ACTION = 64
MAX_LAST_XIDS = 64
"""The most ``status.last_xids`` entries (the provider keeps the last 10)."""
MAX_XID_DESCRIPTION = 1024
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_RV = re.compile(r"[0-9]{1,20}")  # ASCII digits only: int() would also take "+1", " 1", "1_0"


def parse_resource_version(text: str, field: str = "resource_version") -> int | None:
    """A resourceVersion string as an int; None for ``""``; ``InvalidError`` if not decimal."""
    if text == "":
        return None
    if not _RV.fullmatch(text):
        raise InvalidError(f"{field}: {text!r} is not a resourceVersion (a decimal number)")
    return int(text)


def check_name(name: str, field: str = "metadata.name") -> None:
    """``InvalidError`` unless ``name`` is a DNS-1123 label (the object name rule)."""
    if not name or len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise InvalidError(
            f"{field}: {name!r} is not a DNS-1123 label (at most 63 lower-case alphanumerics"
            " or '-', starting and ending with an alphanumeric)"
        )


def _check_length(owner: str, field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidError(
            f"{owner}{field} is {len(value)} characters long, more than the {limit} allowed"
        )


def check_object_size(gpu: pb.Gpu, limit: int) -> int:
    """``gpu``'s encoded size; ``InvalidError`` if over ``limit`` bytes (``MAX_OBJECT_BYTES``)."""
    size = int(gpu.ByteSize())
    if size > limit:
        raise InvalidError(
            f"gpu {gpu.metadata.name!r}: the object is {size} bytes encoded, more than the"
            f" {limit} allowed (MAX_OBJECT_BYTES)"
        )
    return size


def validate_meta_and_spec(gpu: pb.Gpu) -> None:
    """``InvalidError`` for a missing spec.uuid, a negative index, an overlong spec field,
    bad labels or annotations."""
    owner = f"gpu {gpu.metadata.name!r}: "
    if not gpu.spec.uuid:
        raise InvalidError(f"{owner}spec.uuid is required")
    if gpu.spec.index < 0:
        raise InvalidError(f"{owner}spec.index must be >= 0")
    for field, limit in SPEC_FIELD_LIMITS.items():
        _check_length(owner, f"spec.{field}", getattr(gpu.spec, field), limit)
    for key, value in gpu.metadata.labels.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            raise InvalidError(f"gpu {gpu.metadata.name!r}: metadata.labels: {problem}")
    size = 0
    for key, value in gpu.metadata.annotations.items():
        problem = label_key_problem(key)
        if problem:
            raise InvalidError(f"gpu {gpu.metadata.name!r}: metadata.annotations: {problem}")
        size += len(key) + len(value)
    if size > MAX_ANNOTATIONS_BYTES:
        raise InvalidError(
            f"gpu {gpu.metadata.name!r}: metadata.annotations total {size} bytes, more than"
            f" {MAX_ANNOTATIONS_BYTES}"
        )


def validate_status(status: pb.GpuStatus, max_conditions: int) -> None:
    """``InvalidError`` for too many conditions, a missing or duplicate type, or a bad status."""
    conditions = status.conditions
    if len(conditions) > max_conditions:
        raise InvalidError(
            f"status.conditions: {len(conditions)} conditions, more than the"
            f" {max_conditions} allowed per GPU"
        )
    _check_length(
        "", "status.recommended_action", status.recommended_action, MAX_RECOMMENDED_ACTION
    )
    if len(status.last_xids) > MAX_LAST_XIDS:
        raise InvalidError(
            f"status.last_xids: {len(status.last_xids)} entries, more than the {MAX_LAST_XIDS}"
            " allowed"
        )
    for i, xid in enumerate(status.last_xids):
        _check_length(
            "", f"status.last_xids[{i}].description", xid.description, MAX_XID_DESCRIPTION
        )
    seen: set[str] = set()
    for i, cond in enumerate(conditions):
        if not cond.type:
            raise InvalidError(f"status.conditions[{i}].type is required")
        _check_length("", f"status.conditions[{i}].type", cond.type, MAX_CONDITION_TYPE)
        _check_length("", f"status.conditions[{i}].reason", cond.reason, MAX_CONDITION_REASON)
        _check_length("", f"status.conditions[{i}].message", cond.message, MAX_CONDITION_MESSAGE)
        if cond.type in seen:
            raise InvalidError(f"status.conditions[{i}]: duplicate type {cond.type!r}")
        seen.add(cond.type)
        if cond.status not in CONDITION_STATUSES:
            raise InvalidError(
                f"status.conditions[{i}] ({cond.type}): status {cond.status!r} is not one of"
                " True, False, Unknown"
            )
