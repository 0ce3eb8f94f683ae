"""JSON merge patches (RFC 7386): only what changed is sent, and nothing when nothing did.

The node process patches its node objects' status and the operator its caches'
with the difference between what the API server stores and what they want
(`merge_patch`; `status_patch` for a model's status). ``{}`` means equal: the
caller then makes no API call at all. See docs/kcache-cluster.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpufleet.kcache.objects import CacheStatus, NodeStatus, status_dict

__all__ = ["merge_patch", "plain_json", "status_patch"]


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`; ``{}`` when equal.

    Keys gone from `new` become ``null`` (a merge patch only removes what it names, so a
    digest or node label dropped from a map must be named); lists are replaced whole.
    """
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key, _MISSING)
        if before == value:
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            patch[key] = merge_patch(before, value)
        else:
            patch[key] = plain_json(value)
    return patch


_MISSING = object()


def plain_json(value: Any) -> Any:
    """`value` with every mapping made a dict and every tuple a list, recursively.

    What ``json`` and ``yaml.safe_dump`` write as-is, and a fresh copy: a patch or a
    schema built from it shares no container with the model it came from.
    """
    if isinstance(value, Mapping):
        return {key: plain_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(item) for item in value]
    return value


def status_patch(
    status: CacheStatus | NodeStatus, old: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The merge patch ``{"status": ...}`` from the stored status `old` to `status`.

    ``{}`` when nothing changed: the caller then makes no API call at all.
    """
    diff = merge_patch(old or {}, status_dict(status))
    return {"status": diff} if diff else {}
