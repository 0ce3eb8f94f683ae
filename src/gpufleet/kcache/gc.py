"""Garbage collection of the node's cache store: unwanted digests, then a disk budget by LRU.

Two rules, in this order, and one that overrides both:

- an entry (digest and mount root) that a pod mounts is **never** removed;
- an entry whose digest no cache resolves to (not in `wanted`) is removed, every mount root
  of it: the image's own and the ones `CacheStore.derive` made for pods;
- with a budget (``KCACHE_STORE_MAX_BYTES``; the node settings read it, this module takes the
  number), least-recently-used unmounted entries are evicted until the store's total is within
  it. Unwanted entries have gone by then, so the evicted ones are wanted: the agent pulls them
  again when a pod needs them. If the mounted entries alone are over the budget, nothing more
  is evicted (it could not get under it) and the plan says so (`GcPlan.over_budget`).

`plan_gc` is pure: entries in, a `GcPlan` out, in a deterministic order (last use, digest,
mount root). `collect` carries a plan out through `CacheStore.remove`; `collect_garbage` is the
one call the node process makes. Sizes and last uses come from the store's markers
(`CacheStore.usage`), so a restart changes nothing. See docs/kcache-cluster.md.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from gpufleet.kcache.errors import KcacheError
from gpufleet.kcache.store import CacheStore, CacheUsage, StoredCache

__all__ = [
    "NOT_WANTED",
    "OVER_BUDGET",
    "GcPlan",
    "GcResult",
    "Removal",
    "collect",
    "collect_garbage",
    "plan_gc",
]

log = logging.getLogger(__name__)

NOT_WANTED = "not wanted"
"""The reason for removing an entry whose digest no cache resolves to."""
OVER_BUDGET = "over budget"
"""The reason for evicting a wanted, unmounted entry to get the store within its budget."""


@dataclass(frozen=True, slots=True)
class Removal:
    """One entry a plan removes, and why."""

    cache: StoredCache
    reason: str
    """`NOT_WANTED` or `OVER_BUDGET`."""
    size_bytes: int
    last_used: float


@dataclass(frozen=True, slots=True)
class GcPlan:
    """What one garbage collection removes, in order (unwanted first, each part by LRU)."""

    removals: tuple[Removal, ...]
    total_bytes: int
    """The store's size before the plan."""
    kept_bytes: int
    """The store's size once the plan is carried out."""
    in_use_bytes: int
    """The size of the entries pods mount (all kept)."""
    max_bytes: int | None

    @property
    def remove(self) -> tuple[StoredCache, ...]:
        """The entries to remove, in order."""
        return tuple(r.cache for r in self.removals)

    @property
    def reasons(self) -> dict[StoredCache, str]:
        """Why each entry goes."""
        return {r.cache: r.reason for r in self.removals}

    @property
    def over_budget(self) -> bool:
        """The store stays over its budget: the mounted entries alone exceed it."""
        return self.max_bytes is not None and self.kept_bytes > self.max_bytes


@dataclass(frozen=True, slots=True)
class GcResult:
    """What `collect` did: the plan, what went, what could not, what a sweep cleared."""

    plan: GcPlan
    removed: tuple[StoredCache, ...]
    failed: tuple[tuple[StoredCache, str], ...] = ()
    """Entries whose removal failed, with the error; tried again at the next collection."""
    swept: tuple[Path, ...] = ()
    """Leftovers of killed installers and removers (`CacheStore.sweep`)."""

    @property
    def freed_bytes(self) -> int:
        """The recorded sizes of the entries removed."""
        gone = set(self.removed)
        return sum(r.size_bytes for r in self.plan.removals if r.cache in gone)


def _lru(entry: CacheUsage) -> tuple[float, str, str]:
    return (entry.last_used, entry.cache.digest, entry.cache.mount_root)


def plan_gc(
    entries: Iterable[CacheUsage],
    *,
    wanted: Collection[str],
    in_use: Collection[tuple[str, str]],
    max_bytes: int | None,
) -> GcPlan:
    """Decide what to remove from a store holding `entries` (see the module's rules).

    `wanted`: the digests some cache resolves to (current and previous digests
    alike). `in_use`: the (digest, mount root) pairs a pod mounts now.
    `max_bytes`: the store's budget, None for none. The order of `entries`
    plays no part; `ValueError` if one is listed twice or the budget is negative.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be at least 0, not {max_bytes}")
    by_key: dict[tuple[str, str], CacheUsage] = {}
    for e in entries:
        key = (e.cache.digest, e.cache.mount_root)
        if key in by_key:
            raise ValueError(f"{key[0]} for mount root {key[1]!r} is listed twice")
        by_key[key] = e
    ordered = sorted(by_key.values(), key=_lru)
    mounted = [e for e in ordered if (e.cache.digest, e.cache.mount_root) in in_use]
    free = [e for e in ordered if (e.cache.digest, e.cache.mount_root) not in in_use]
    removals = [_removal(e, NOT_WANTED) for e in free if e.cache.digest not in wanted]
    total = sum(e.size_bytes for e in ordered)
    in_use_bytes = sum(e.size_bytes for e in mounted)
    kept = total - sum(r.size_bytes for r in removals)
    if max_bytes is not None and in_use_bytes <= max_bytes:
        for e in free:
            if kept <= max_bytes:
                break
            if e.cache.digest in wanted:
                removals.append(_removal(e, OVER_BUDGET))
                kept -= e.size_bytes
    return GcPlan(
        removals=tuple(removals),
        total_bytes=total,
        kept_bytes=kept,
        in_use_bytes=in_use_bytes,
        max_bytes=max_bytes,
    )


def _removal(entry: CacheUsage, reason: str) -> Removal:
    return Removal(entry.cache, reason, entry.size_bytes, entry.last_used)


def collect(store: CacheStore, plan: GcPlan) -> GcResult:
    """Carry out `plan` on `store`, one entry at a time, in the plan's order.

    Each removal goes through `CacheStore.remove` (marker first, under the
    entry's lock). One that fails is logged and listed in the result, and the
    rest go on. The caller must keep new publications of the planned entries
    from starting between planning and this call (the node process plans and
    collects under the lock its CSI publish takes).
    """
    removed: list[StoredCache] = []
    failed: list[tuple[StoredCache, str]] = []
    for removal in plan.removals:
        cache = removal.cache
        try:
            gone = store.remove(cache.digest, cache.mount_root)
        except (OSError, KcacheError) as exc:
            log.warning(
                "could not remove a cache from the store",
                extra=_fields(removal) | {"error": str(exc)},
            )
            failed.append((cache, str(exc)))
            continue
        if gone:
            removed.append(cache)
            log.info("removed a cache from the store", extra=_fields(removal))
    if plan.over_budget:
        log.warning(
            "the store is over its budget with mounted caches alone; nothing more removed",
            extra={
                "store_bytes": plan.kept_bytes,
                "in_use_bytes": plan.in_use_bytes,
                "max_bytes": plan.max_bytes,
            },
        )
    return GcResult(plan=plan, removed=tuple(removed), failed=tuple(failed))


def _fields(removal: Removal) -> dict[str, object]:
    return {
        "digest": removal.cache.digest,
        "mount_root": removal.cache.mount_root,
        "reason": removal.reason,
        "size_bytes": removal.size_bytes,
    }


def collect_garbage(
    store: CacheStore,
    *,
    wanted: Collection[str],
    in_use: Collection[tuple[str, str]],
    max_bytes: int | None,
) -> GcResult:
    """One garbage collection of `store`: sweep, refresh mounted entries' last use, plan, collect.

    Mounted entries are touched first, so an entry's last use is at worst the
    last collection during which a pod still mounted it, even if nobody
    touched it at unpublish; this persists in the store, so LRU survives
    restarts. Arguments as `plan_gc`.
    """
    swept = store.sweep()
    for digest, mount_root in sorted(in_use):
        try:
            store.touch(digest, mount_root)
        except (OSError, KcacheError) as exc:  # a malformed pair, a read-only store
            log.warning(
                "could not record the use of a mounted cache",
                extra={"digest": digest, "mount_root": mount_root, "error": str(exc)},
            )
    plan = plan_gc(store.usage(), wanted=wanted, in_use=in_use, max_bytes=max_bytes)
    result = collect(store, plan)
    return GcResult(plan=plan, removed=result.removed, failed=result.failed, swept=tuple(swept))
