"""Label and field selectors, parsed as the API server parses them.

Label selectors support ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
``k notin (a,b)``, ``k`` (exists) and ``!k`` (does not exist). Field selectors
support ``=``, ``==`` and ``!=`` on the fields the real server indexes for our
resources; any other field is refused with 400, as the real server refuses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tests.doubles.kubeapi._objects import ApiError

JsonObject = dict[str, Any]

_SET_TERM = re.compile(r"^\s*(!?)([A-Za-z0-9._/-]+)\s*(?:(in|notin)\s*\((.*)\))?\s*$")
_EQ_TERM = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s*(==|!=|=)\s*([A-Za-z0-9._-]*)\s*$")

_FIELDS: dict[str, dict[str, Callable[[JsonObject], str]]] = {
    "pods": {
        "metadata.name": lambda o: o["metadata"].get("name", ""),
        "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
        "spec.nodeName": lambda o: o.get("spec", {}).get("nodeName", ""),
        "status.phase": lambda o: o.get("status", {}).get("phase", ""),
    },
    "nodes": {
        "metadata.name": lambda o: o["metadata"].get("name", ""),
        "spec.unschedulable": lambda o: str(o.get("spec", {}).get("unschedulable", False)).lower(),
    },
    "leases": {
        "metadata.name": lambda o: o["metadata"].get("name", ""),
        "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
    },
    # resource.k8s.io ResourceSlices; nodeName is unset on slices for many nodes.
    "resourceslices": {
        "metadata.name": lambda o: o["metadata"].get("name", ""),
        "spec.nodeName": lambda o: o.get("spec", {}).get("nodeName") or "",
        "spec.driver": lambda o: o.get("spec", {}).get("driver") or "",
    },
}


_METADATA_FIELDS: dict[str, Callable[[JsonObject], str]] = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
}
"""What every other resource (custom resources, secrets, events …) can be selected by."""
_FIELDS["secrets"] = {**_METADATA_FIELDS, "type": lambda o: o.get("type", "")}
_FIELDS["events"] = {
    **_METADATA_FIELDS,
    **{
        f"involvedObject.{key}": (lambda k: lambda o: str(o.get("involvedObject", {}).get(k, "")))(
            key
        )
        for key in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion")
    },
    "involvedObject.fieldPath": lambda o: o.get("involvedObject", {}).get("fieldPath", ""),
    "reason": lambda o: o.get("reason", ""),
    "reportingComponent": lambda o: o.get("reportingComponent", ""),
    "source": lambda o: o.get("source", {}).get("component", ""),
    "type": lambda o: o.get("type", ""),
}
_FIELDS["namespaces"] = {
    **_METADATA_FIELDS,
    "status.phase": lambda o: o.get("status", {}).get("phase", ""),
}


@dataclass(frozen=True, slots=True)
class _LabelTerm:
    key: str
    op: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # notin: a missing key matches


@dataclass(frozen=True, slots=True)
class _FieldTerm:
    field: str
    getter: Callable[[JsonObject], str]
    value: str
    equal: bool

    def matches(self, obj: JsonObject) -> bool:
        return (self.getter(obj) == self.value) == self.equal


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed ``labelSelector`` plus ``fieldSelector``; the empty selector matches all."""

    labels: tuple[_LabelTerm, ...] = ()
    fields: tuple[_FieldTerm, ...] = ()

    def matches(self, obj: JsonObject) -> bool:
        """Whether ``obj`` is selected."""
        if self.labels:
            labels = obj["metadata"].get("labels") or {}
            if not all(term.matches(labels) for term in self.labels):
                return False
        return all(term.matches(obj) for term in self.fields)

    def field_equals(self, field: str) -> str | None:
        """The value ``field`` must equal, when the selector pins it (used for indexed lookups)."""
        for term in self.fields:
            if term.field == field and term.equal:
                return term.value
        return None

    @classmethod
    def parse(cls, resource: str, label_selector: str, field_selector: str) -> Selector:
        """Parse the query parameters; a malformed selector raises a 400 ``ApiError``."""
        return cls(
            tuple(_parse_label_term(t) for t in _split_terms(label_selector)),
            tuple(_parse_field_term(resource, t) for t in _split_terms(field_selector)),
        )


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside ``in (...)`` value lists."""
    terms: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(selector):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [term for term in terms if term.strip()]


def _parse_label_term(term: str) -> _LabelTerm:
    eq = _EQ_TERM.match(term)
    if eq is not None:
        key, op, value = eq.groups()
        return _LabelTerm(key, "notin" if op == "!=" else "in", frozenset({value}))
    match = _SET_TERM.match(term)
    if match is None:
        raise ApiError.bad_request(f"unable to parse requirement: {term.strip()!r}")
    negated, key, op, values = match.groups()
    if op is None:
        return _LabelTerm(key, "!exists" if negated else "exists", frozenset())
    if negated:
        raise ApiError.bad_request(f"unable to parse requirement: {term.strip()!r}")
    return _LabelTerm(key, op, frozenset(v.strip() for v in values.split(",") if v.strip()))


def _parse_field_term(resource: str, term: str) -> _FieldTerm:
    match = _EQ_TERM.match(term)
    if match is None:
        raise ApiError.bad_request(f"invalid field selector: {term.strip()!r}")
    field, op, value = match.groups()
    getter = _FIELDS.get(resource, _METADATA_FIELDS).get(field)
    if getter is None:
        raise ApiError.bad_request(f"field label not supported: {field}", reason="BadRequest")
    return _FieldTerm(field, getter, value, op != "!=")
