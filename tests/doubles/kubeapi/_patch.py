"""PATCH bodies: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

Strategic merge patch is applied as a JSON merge patch: lists are replaced, not
merged by key, except ``metadata.finalizers``, which is merged as the server
merges it. That is enough for labels, annotations, finalizers and status
fields, which is what gpufleet patches; a test that needs other list merging
must PUT instead.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.doubles.kubeapi._objects import ApiError, JsonObject

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def apply_patch(content_type: str, current: JsonObject, body: bytes) -> JsonObject:
    """A new object: ``current`` (left untouched) with the patch in ``body`` applied."""
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        patch = json.loads(body or b"null")
    except ValueError as exc:
        raise ApiError.bad_request(
            f"the body of the request was in an unknown format: {exc}"
        ) from exc
    if media in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
        if not isinstance(patch, dict):
            raise ApiError.bad_request("a merge patch must be a JSON object")
        if media == STRATEGIC_MERGE_PATCH:
            patch = _merge_finalizers(current, patch)
        result = merge_patch(current, patch)
        assert isinstance(result, dict)
        return result
    if media == JSON_PATCH:
        if not isinstance(patch, list):
            raise ApiError.bad_request("a JSON patch must be a JSON array of operations")
        return _json_patch(current, patch)
    raise ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f"{JSON_PATCH}, {MERGE_PATCH}, {STRATEGIC_MERGE_PATCH} (got {media!r})",
    )


def _merge_finalizers(current: JsonObject, patch: JsonObject) -> JsonObject:
    """``metadata.finalizers`` has patch strategy "merge": the patch's list adds to the
    current one, and ``$deleteFromPrimitiveList/finalizers`` removes from it."""
    meta = patch.get("metadata")
    if not isinstance(meta, dict):
        return patch
    directive = "$deleteFromPrimitiveList/finalizers"
    if "finalizers" not in meta and directive not in meta:
        return patch
    merged = list(current.get("metadata", {}).get("finalizers") or [])
    added = meta.get("finalizers")
    if isinstance(added, list):
        merged += [f for f in added if f not in merged]
    elif "finalizers" in meta:  # null: the list goes, as with a merge patch
        merged = []
    removed = meta.get(directive) or []
    merged = [f for f in merged if f not in removed]
    rest = {k: v for k, v in meta.items() if k not in ("finalizers", directive)}
    return {**patch, "metadata": {**rest, "finalizers": merged or None}}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _json_patch(current: JsonObject, operations: list[Any]) -> JsonObject:
    doc: Any = copy.deepcopy(current)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError.bad_request(f"invalid JSON patch operation: {op!r}")
        kind = op["op"]
        if kind == "test":
            if _get(doc, op["path"]) != op.get("value"):
                raise ApiError(422, "Invalid", f"JSON patch test failed at {op['path']}")
        elif kind == "remove":
            doc = _remove(doc, op["path"])
        elif kind in ("add", "replace"):
            if kind == "replace":
                _get(doc, op["path"])  # must exist
                doc = _remove(doc, op["path"])
            doc = _add(doc, op["path"], copy.deepcopy(op.get("value")))
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_get(doc, op["from"]))
            if kind == "move":
                doc = _remove(doc, op["from"])
            doc = _add(doc, op["path"], value)
        else:
            raise ApiError.bad_request(f"unknown JSON patch operation {kind!r}")
    if not isinstance(doc, dict):
        raise ApiError(422, "Invalid", "a JSON patch must leave an object")
    return doc


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError.bad_request(f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _index(container: Any, token: str, *, for_add: bool = False) -> Any:
    if isinstance(container, list):
        if for_add and token == "-":
            return len(container)
        try:
            index = int(token)
        except ValueError:
            raise ApiError(422, "Invalid", f"invalid list index {token!r}") from None
        if not 0 <= index <= len(container) - (0 if for_add else 1):
            raise ApiError(422, "Invalid", f"list index {index} out of range")
        return index
    if isinstance(container, dict):
        if not for_add and token not in container:
            raise ApiError(422, "Invalid", f"no such key {token!r}")
        return token
    raise ApiError(422, "Invalid", f"cannot index into {type(container).__name__}")


def _get(doc: Any, path: str) -> Any:
    for token in _tokens(path):
        doc = doc[_index(doc, token)]
    return doc


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    tokens = _tokens(path)
    if not tokens:
        raise ApiError(422, "Invalid", "cannot patch the whole document")
    parent = doc
    for token in tokens[:-1]:
        parent = parent[_index(parent, token)]
    return parent, tokens[-1]


def _add(doc: Any, path: str, value: Any) -> Any:
    if path == "":
        return value
    parent, last = _parent(doc, path)
    key = _index(parent, last, for_add=True)
    if isinstance(parent, list):
        parent.insert(key, value)
    else:
        parent[key] = value
    return doc


def _remove(doc: Any, path: str) -> Any:
    parent, last = _parent(doc, path)
    del parent[_index(parent, last)]
    return doc
