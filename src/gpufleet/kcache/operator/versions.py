"""Which copy of a watched object is the newer: resourceVersion order, and a fresh list merged.

The operator keeps the latest objects the watch delivered. A late watch event, a write's
answer and a list served while events arrived can each carry an older copy than the one
held; these functions decide which copy stays, apart from the reconcile that reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpufleet.kcache.operator.api import JsonObject

__all__ = ["merge_listing", "newer"]


def _version(obj: Mapping[str, Any]) -> int | None:
    text = (obj.get("metadata") or {}).get("resourceVersion")
    return int(text) if isinstance(text, str) and text.isdigit() else None


def newer(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether `new` may replace `old`: not an older version of it (a late watch event).

    resourceVersions are opaque, but every server gpufleet meets (etcd, the test double)
    hands out increasing integers; anything else is taken as newer.
    """
    if old is None:
        return True
    new_version, old_version = _version(new), _version(old)
    if new_version is None or old_version is None:
        return True
    return new_version >= old_version


def merge_listing(
    known: Mapping[str, JsonObject],
    items: list[JsonObject],
    version: str | None,
    gone: Mapping[str, JsonObject],
) -> dict[str, JsonObject]:
    """The node objects of a cache after a fresh list at `version`, by name.

    The list replaces what the watch delivered, except that an object the watch saw at a
    version after the list's (changed or created while the list was served) stays as the
    watch has it, and one the watch saw deleted since (`gone`) is not revived.
    """
    merged: dict[str, JsonObject] = {}
    for obj in items:
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str):
            continue
        if name in gone and newer(gone[name], obj):
            continue
        old = known.get(name)
        merged[name] = obj if old is None or newer(obj, old) else dict(old)
    at = {"metadata": {"resourceVersion": version}}
    for name, obj in known.items():
        if name not in merged and name not in gone and version is not None and not newer(at, obj):
            merged[name] = dict(obj)
    return merged
