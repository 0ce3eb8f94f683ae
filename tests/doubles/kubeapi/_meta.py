"""Server-managed metadata: generation, status subresource, finalizers and deletion.

These are the rules the generic registry of the real API server applies to
every write, whatever the kind (``rest.BeforeCreate``/``BeforeUpdate``, the
custom resource strategy, and the finalizer handling of the generic store):

- ``metadata.generation`` is 1 on create and goes up by one on every write that
  changes anything but ``metadata`` (and ``status``, where status is a
  subresource);
- the main endpoint ignores ``status`` where it is a subresource, and
  ``/status`` changes nothing but status;
- a DELETE of an object with finalizers only sets ``deletionTimestamp`` (and
  ``deletionGracePeriodSeconds: 0``); the object goes once a write leaves it
  without finalizers; no finalizer may be added while it is being deleted;
- a write that changes nothing is not a write: no new resourceVersion, no event;
- names are DNS-1123 subdomains (labels for Namespaces), label keys and values and
  annotation keys are qualified names, as ``ValidateObjectMeta`` checks them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.doubles.kubeapi._objects import ApiError, Cause, JsonObject, ResourceType, timestamp

_IDENTITY = ("name", "namespace", "uid", "creationTimestamp", "generation")
_DELETION = ("deletionTimestamp", "deletionGracePeriodSeconds")


_OMITTED_WHEN_EMPTY = ("labels", "annotations", "finalizers", "ownerReferences")


def _drop_empty(meta: JsonObject) -> None:
    # ObjectMeta's maps and lists are omitempty: an empty one is stored as no field.
    for key in _OMITTED_WHEN_EMPTY:
        if key in meta and not meta[key]:
            del meta[key]


_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
_SUBDOMAIN_TEXT = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    f"used for validation is '{_SUBDOMAIN}')"
)
_DNS_LABEL_TEXT = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    f"used for validation is '{_DNS_LABEL}')"
)
_QUALIFIED_TEXT = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used "
    f"for validation is '{_QUALIFIED}')"
)
_LABEL_VALUE_TEXT = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    f"'my_value',  or '12345', regex used for validation is '{_LABEL_VALUE}')"
)
_ANNOTATIONS_MAX = 256 * 1024


def _invalid(field: str, value: str, why: str) -> Cause:
    return Cause(field, "FieldValueInvalid", f"Invalid value: {json.dumps(value)}: {why}")


def _qualified_name(field: str, key: str) -> list[Cause]:
    prefix, _, name = key.rpartition("/")
    causes: list[Cause] = []
    if "/" in key and (len(prefix) > 253 or not re.fullmatch(_SUBDOMAIN, prefix)):
        causes.append(_invalid(field, key, f"prefix part {_SUBDOMAIN_TEXT}"))
    if not name or len(name) > 63 or not re.fullmatch(_QUALIFIED, name):
        why = "name part must be no more than 63 characters" if len(name) > 63 else None
        causes.append(_invalid(field, key, why or _QUALIFIED_TEXT))
    return causes


def _check_meta(resource: ResourceType, meta: JsonObject, *, created: bool) -> None:
    causes: list[Cause] = []
    name = str(meta.get("name", ""))
    if created:
        label_only = resource.plural == "namespaces"
        pattern, limit = (_DNS_LABEL, 63) if label_only else (_SUBDOMAIN, 253)
        if len(name) > limit:
            causes.append(
                _invalid("metadata.name", name, f"must be no more than {limit} characters")
            )
        elif not re.fullmatch(pattern, name):
            text = _DNS_LABEL_TEXT if label_only else _SUBDOMAIN_TEXT
            causes.append(_invalid("metadata.name", name, text))
    for key, value in (meta.get("labels") or {}).items():
        causes += _qualified_name("metadata.labels", str(key))
        if not isinstance(value, str):
            causes.append(_invalid("metadata.labels", str(value), "must be a string"))
        elif len(value) > 63:
            causes.append(_invalid("metadata.labels", value, "must be no more than 63 characters"))
        elif not re.fullmatch(_LABEL_VALUE, value):
            causes.append(_invalid("metadata.labels", value, _LABEL_VALUE_TEXT))
    annotations = meta.get("annotations") or {}
    for key in annotations:
        causes += _qualified_name("metadata.annotations", str(key).lower())
    if sum(len(str(k)) + len(str(v)) for k, v in annotations.items()) > _ANNOTATIONS_MAX:
        causes.append(
            Cause(
                "metadata.annotations",
                "FieldValueTooLong",
                f"Too long: may not be more than {_ANNOTATIONS_MAX} bytes",
            )
        )
    if causes:
        raise ApiError.invalid(resource, name, causes)


def prepare_create(resource: ResourceType, obj: JsonObject) -> None:
    """Set what the server sets on create (mutates ``obj``, a fresh copy); 422 if invalid."""
    meta = obj["metadata"]
    _drop_empty(meta)
    _check_meta(resource, meta, created=True)
    meta["generation"] = 1
    for key in _DELETION:
        meta.pop(key, None)


def prepare_update(
    resource: ResourceType, current: JsonObject, new: JsonObject, subresource: str | None
) -> JsonObject:
    """The object a write of ``new`` over ``current`` stores (``new`` is a fresh copy).

    ``subresource`` is ``"status"`` for the status endpoint, ``None`` for the
    main one and ``"*"`` for test-side writes, which may change everything.
    """
    old_meta = current["metadata"]
    if subresource == "status":  # the status endpoint changes nothing but status
        stored: JsonObject = {k: v for k, v in current.items() if k != "status"}
        if "status" in new:
            stored["status"] = new["status"]
        return stored
    meta = new["metadata"]
    _drop_empty(meta)
    # Identity and server-managed fields are the server's, whatever the client sent.
    for key in _IDENTITY + _DELETION:
        if key in old_meta:
            meta[key] = old_meta[key]
        else:
            meta.pop(key, None)
    status_is_sub = "status" in resource.subresources
    if subresource is None and status_is_sub:  # the main endpoint ignores status
        if "status" in current:
            new["status"] = current["status"]
        else:
            new.pop("status", None)
    _check_meta(resource, meta, created=False)
    if _content(current, status_is_sub) != _content(new, status_is_sub):
        meta["generation"] = int(old_meta.get("generation") or 0) + 1
    if old_meta.get("deletionTimestamp"):
        added = [f for f in meta.get("finalizers") or [] if f not in old_meta.get("finalizers", [])]
        if added:
            quoted = ", ".join(f'"{f}"' for f in added)
            raise ApiError.invalid(
                resource,
                old_meta["name"],
                [
                    Cause(
                        "metadata.finalizers",
                        "FieldValueForbidden",
                        "Forbidden: no new finalizers can be added if the object is being "
                        f"deleted, found new finalizers []string{{{quoted}}}",
                    )
                ],
            )
    return new


def _content(obj: JsonObject, without_status: bool) -> dict[str, Any]:
    skip = ("metadata", "status") if without_status else ("metadata",)
    return {k: v for k, v in obj.items() if k not in skip and k not in ("apiVersion", "kind")}


def unchanged(current: JsonObject, new: JsonObject) -> bool:
    """Whether storing ``new`` would store the same object (the server then writes nothing)."""
    meta = {k: v for k, v in new.get("metadata", {}).items() if k != "resourceVersion"}
    old_meta = {k: v for k, v in current["metadata"].items() if k != "resourceVersion"}
    if meta != old_meta:
        return False
    strip = ("metadata",)
    return {k: v for k, v in new.items() if k not in strip} == {
        k: v for k, v in current.items() if k not in strip
    }


def finalized(obj: JsonObject) -> bool:
    """Whether ``obj`` is being deleted and has no finalizer left: the server removes it."""
    meta = obj["metadata"]
    return bool(meta.get("deletionTimestamp")) and not meta.get("finalizers")


def held_by_finalizers(obj: JsonObject) -> bool:
    """Whether a DELETE of ``obj`` only marks it (it has finalizers)."""
    return bool(obj["metadata"].get("finalizers"))


def marked_deleting(obj: JsonObject) -> JsonObject:
    """``obj`` as a DELETE leaves it while finalizers hold it (a new dict)."""
    meta = dict(obj["metadata"])
    meta.setdefault("deletionTimestamp", timestamp())
    meta.setdefault("deletionGracePeriodSeconds", 0)
    return {**obj, "metadata": meta}
