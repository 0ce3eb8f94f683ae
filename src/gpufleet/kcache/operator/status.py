"""A cache's wanted status, and the patch from its stored status (None: nothing to write).

Pure. The status is built from two sources: the last `Resolution` of the cache's image
(digest, Resolved and Verified conditions; carried over from the stored status until the
operator has resolved the cache since it started) and the node objects' roll-up. Writing
only when the result differs is what keeps an idle cluster free of writes: nothing in
the wanted status depends on the clock except ``lastTransitionTime`` (kept while a
condition's status holds) and ``lastUpdated`` (set only on writes that happen anyway).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gpufleet.kcache.cluster import CacheKey, node_label_key
from gpufleet.kcache.objects import (
    CacheCounts,
    CacheObject,
    CacheStatus,
    Condition,
    NodeObject,
    make_condition,
    rfc3339,
    set_condition,
    status_dict,
)
from gpufleet.kcache.operator.rollup import Verdict, roll_up
from gpufleet.kcache.patches import merge_patch

__all__ = ["Resolution", "status_patch", "wanted_status"]

_CONDITION_ORDER = ("Resolved", "Verified", "Ready")


@dataclass(frozen=True, slots=True)
class Resolution:
    """What resolving a cache's ``spec.image`` (and checking its signature) came to."""

    generation: int
    """The ``metadata.generation`` whose spec was resolved."""
    digest: str | None
    """The digest nodes may pull: the new one once verified, else the one before (or None)."""
    resolved_image: str | None
    """``<registry>/<repository>@<digest>`` for `digest`."""
    resolved: Verdict
    verified: Verdict


def _verdict(condition: Condition | None) -> Verdict | None:
    if condition is None:
        return None
    return Verdict(condition.type, condition.status == "True", condition.reason, condition.message)


def wanted_status(
    cache: CacheObject,
    resolution: Resolution | None,
    node_objects: Iterable[NodeObject],
    *,
    access: str | None,
    now: datetime,
) -> CacheStatus:
    """The status the operator wants `cache` to have (``lastUpdated`` as stored).

    `resolution` None means "not resolved since the operator started": the digest and its
    conditions stay as stored. `access` is written for a ClusterGKMCache only.
    """
    key: CacheKey = cache.key
    stored = cache.status
    verdicts: list[Verdict] = []
    observed: int | None
    if resolution is not None:
        digest, image, observed = (
            resolution.digest, resolution.resolved_image, resolution.generation,
        )  # fmt: skip
        verdicts += [resolution.resolved, resolution.verified]
    else:
        digest, image = stored.resolved_digest, stored.resolved_image
        observed = stored.observed_generation
        for kind in ("Resolved", "Verified"):
            carried = _verdict(stored.condition(kind))
            if carried is not None:
                verdicts.append(carried)
    rollup = roll_up(node_objects, key.name, digest)
    verdicts.append(rollup.condition)
    conditions = list(stored.conditions)
    for verdict in verdicts:
        conditions = set_condition(
            conditions,
            make_condition(
                verdict.type, verdict.status, str(verdict.reason), verdict.message,
                now=now, observed_generation=cache.generation,
            ),
        )  # fmt: skip
    known = [c for c in conditions if c.type in _CONDITION_ORDER]
    known.sort(key=lambda c: _CONDITION_ORDER.index(c.type))
    return CacheStatus(
        resolved_digest=digest,
        resolved_image=image,
        observed_generation=observed,
        previous_digests=rollup.previous_digests,
        access=access if key.namespace is None else None,  # type: ignore[arg-type]
        node_selector={node_label_key(key): "ready"},
        ready=rollup.ready,
        counts=CacheCounts.model_validate(rollup.counts),
        conditions=known,
        last_updated=stored.last_updated,
    )


def status_patch(
    stored: Mapping[str, Any] | None, wanted: CacheStatus, *, now: datetime
) -> dict[str, Any] | None:
    """The merge patch of ``status`` that makes `stored` `wanted`, or None when they agree.

    A patch also sets ``lastUpdated`` to `now`; fields `wanted` lacks are nulled.
    """
    old = dict(stored or {})
    new = status_dict(wanted)
    old.pop("lastUpdated", None)
    new.pop("lastUpdated", None)
    patch = merge_patch(old, new)
    if not patch:
        return None
    patch["lastUpdated"] = rfc3339(now)
    return patch
