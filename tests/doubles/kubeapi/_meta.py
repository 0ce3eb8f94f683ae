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
- a write that changes nothing is not a write: no new resourceVersion, no event.
"""

from __future__ import annotations

from typing import Any

from tests.doubles.kubeapi._objects import ApiError, Cause, JsonObject, ResourceType, timestamp

_IDENTITY = ("name", "namespace", "uid", "creationTimestamp", "generation")
_DELETION = ("deletionTimestamp", "deletionGracePeriodSeconds")


def prepare_create(obj: JsonObject) -> None:
    """Set what the server sets on create (mutates ``obj``, a fresh copy)."""
    meta = obj["metadata"]
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
