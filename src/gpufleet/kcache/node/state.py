"""The node process's one state: the caches it knows, each digest's phase, and what is mounted.

The agent (informers, pulls) and the CSI Node service (through `volumes.NodeVolumes`) share
it; both run on the one event loop, so it needs no lock. It lives in memory only: after a
restart it is rebuilt from the informers, the store's markers and the publication records.

Per cache and digest, the pull goes ``Pending → Downloading → Extracted`` or ends in
``Incompatible`` (no GPU of the node matches) or ``Error`` (retried with backoff, the message
says why). What the node object shows adds the mounts: an Extracted digest that a pod mounts is
``Running``, and one the cache no longer resolves to but that a pod still mounts is
``Outdated``. A digest that is neither resolved nor mounted is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpufleet.kcache.cluster import CLUSTER_CACHE, NAMESPACED_CACHE, CacheKey, PodInfo
from gpufleet.kcache.compat import GpuVerdict
from gpufleet.kcache.objects import DigestState as Phase

__all__ = [
    "RESERVATION_SECONDS",
    "CacheSpec",
    "DigestState",
    "NodeState",
    "Phase",
    "Use",
    "cache_key_of",
]

RESERVATION_SECONDS = 300.0
"""How long a prepared (not yet published) store entry is kept from GC."""


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """What the node reads from a GKMCache or ClusterGKMCache object."""

    key: CacheKey
    uid: str
    generation: int
    resolved_digest: str | None
    resolved_image: str | None
    access: str
    """``open`` or ``restricted`` (ClusterGKMCache: whether a SubjectAccessReview is needed)."""
    deleting: bool

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> CacheSpec:
        """Read a cache object as the API serves it; a missing or odd field reads as unset."""
        metadata = _mapping(obj.get("metadata"))
        status = _mapping(obj.get("status"))
        digest = _text(status.get("resolvedDigest"))
        image = _text(status.get("resolvedImage"))
        if digest is None or image is None:
            digest = image = None
        generation = metadata.get("generation")
        return cls(
            key=cache_key_of(obj),
            uid=str(metadata.get("uid") or ""),
            generation=generation if isinstance(generation, int) else 0,
            resolved_digest=digest,
            resolved_image=image,
            access="restricted" if status.get("access") == "restricted" else "open",
            deleting=bool(metadata.get("deletionTimestamp")),
        )


def cache_key_of(obj: Mapping[str, Any]) -> CacheKey:
    """The `CacheKey` of a cache object (by its namespace: none means a ClusterGKMCache)."""
    metadata = _mapping(obj.get("metadata"))
    name = str(metadata.get("name") or "")
    namespace = _text(metadata.get("namespace"))
    if namespace is None:
        return CacheKey(CLUSTER_CACHE.kind, None, name)  # type: ignore[arg-type]
    return CacheKey(NAMESPACED_CACHE.kind, namespace, name)  # type: ignore[arg-type]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class DigestState:
    """One digest of one cache on this node: how far its pull got."""

    digest: str
    image: str
    phase: Phase = Phase.PENDING
    """Pending, Downloading, Extracted, Incompatible or Error (never Running/Outdated)."""
    message: str = ""
    verdicts: tuple[GpuVerdict, ...] = ()
    mount_root: str | None = None
    """The image's own mount root: its store entry that needs no rewrite."""
    size: int | None = None
    path: Path | None = None


@dataclass(frozen=True, slots=True)
class Use:
    """A published volume: which cache's digest, for which mount root, in which pod."""

    volume_id: str
    cache: CacheKey
    digest: str
    mount_root: str
    pod: PodInfo


ChangeListener = Callable[[CacheKey], None]


@dataclass
class NodeState:
    """Every cache this node knows, by key; the digests of each; the published volumes."""

    clock: Callable[[], float] = time.monotonic
    caches: dict[CacheKey, CacheSpec] = field(default_factory=dict)
    digests: dict[CacheKey, dict[str, DigestState]] = field(default_factory=dict)
    uses: dict[str, Use] = field(default_factory=dict)
    synced: bool = False
    """Set once both informers have listed: before that an unknown cache may yet exist."""
    _reserved: dict[tuple[str, str], float] = field(default_factory=dict)
    _listeners: list[ChangeListener] = field(default_factory=list)

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener(key)` whenever what the node object or label of `key` shows may change."""
        self._listeners.append(listener)

    def _changed(self, key: CacheKey) -> None:
        for listener in self._listeners:
            listener(key)

    # The caches -------------------------------------------------------------------------

    def set_cache(self, spec: CacheSpec) -> str | None:
        """Take the cache object's new state; returns a digest to pull when there is a new one.

        A digest the cache no longer resolves to stays while a pod mounts it (Outdated) and is
        dropped otherwise.
        """
        key = spec.key
        before = self.caches.get(key)
        if before is not None and before.uid != spec.uid:
            # Deleted and created again: another cache under the same name.
            self.digests.pop(key, None)
        self.caches[key] = spec
        digests = self.digests.setdefault(key, {})
        pull: str | None = None
        wanted = spec.resolved_digest
        if wanted is not None and spec.resolved_image is not None and not spec.deleting:
            known = digests.get(wanted)
            if known is None or known.image != spec.resolved_image:
                digests[wanted] = DigestState(wanted, spec.resolved_image)
                pull = wanted
        self._drop_unused(key)
        self._changed(key)
        return pull

    def forget_cache(self, key: CacheKey) -> None:
        """The cache object is gone: forget it, but keep its mounted digests (Outdated)."""
        self.caches.pop(key, None)
        self._drop_unused(key)
        self._changed(key)

    def _drop_unused(self, key: CacheKey) -> None:
        spec = self.caches.get(key)
        resolved = None if spec is None or spec.deleting else spec.resolved_digest
        mounted = {use.digest for use in self.uses.values() if use.cache == key}
        digests = self.digests.get(key, {})
        for digest in list(digests):
            if digest != resolved and digest not in mounted:
                del digests[digest]
        if not digests and spec is None:
            self.digests.pop(key, None)

    def cache(self, key: CacheKey) -> CacheSpec | None:
        """The cache as last seen, or None."""
        return self.caches.get(key)

    def digest_state(self, key: CacheKey, digest: str) -> DigestState | None:
        """One digest of one cache, or None."""
        return self.digests.get(key, {}).get(digest)

    def update(self, key: CacheKey, digest: str, **changes: Any) -> DigestState | None:
        """Change fields of a digest's state (a pull's progress); None if it was dropped."""
        digests = self.digests.get(key)
        current = None if digests is None else digests.get(digest)
        if digests is None or current is None:
            return None
        new = replace(current, **changes)
        if new != current:
            digests[digest] = new
            self._changed(key)
        return new

    def keys(self) -> list[CacheKey]:
        """Every cache known, or still mounted after it went away, sorted."""
        return sorted(set(self.caches) | set(self.digests))

    # What the node object and label show --------------------------------------------------

    def phase(self, key: CacheKey, digest: str) -> Phase | None:
        """The digest's state with the mounts folded in: Running or Outdated while mounted."""
        state = self.digest_state(key, digest)
        if state is None:
            return None
        # A live mount decides first: the pull's phase is about the image's own entry, which
        # GC may have collected while a pod still mounts an entry derived for its path.
        if any(use.cache == key and use.digest == digest for use in self.uses.values()):
            spec = self.caches.get(key)
            resolved = None if spec is None else spec.resolved_digest
            return Phase.RUNNING if digest == resolved else Phase.OUTDATED
        return state.phase

    def label(self, key: CacheKey) -> str | None:
        """The Node label's value: ``ready``, ``incompatible``, or None (no label)."""
        spec = self.caches.get(key)
        if spec is None or spec.deleting or spec.resolved_digest is None:
            return None
        state = self.digest_state(key, spec.resolved_digest)
        if state is None:
            return None
        if state.phase is Phase.EXTRACTED:
            return "ready"
        if state.phase is Phase.INCOMPATIBLE:
            return "incompatible"
        return None

    # Mounts -----------------------------------------------------------------------------

    def add_use(self, use: Use) -> None:
        """A volume was published (or found mounted after a restart)."""
        self.uses[use.volume_id] = use
        digests = self.digests.setdefault(use.cache, {})
        if use.digest not in digests:
            # Found mounted after a restart: it was in the store whole when it was mounted.
            digests[use.digest] = DigestState(use.digest, "", Phase.EXTRACTED)
        self._reserved.pop((use.digest, use.mount_root), None)
        self._changed(use.cache)

    def remove_use(self, volume_id: str) -> Use | None:
        """A volume was unpublished; returns what it was, None if unknown."""
        use = self.uses.pop(volume_id, None)
        if use is not None:
            self._drop_unused(use.cache)
            self._changed(use.cache)
        return use

    def uses_of(self, key: CacheKey) -> list[Use]:
        """The published volumes of a cache, by volume id."""
        return sorted(
            (use for use in self.uses.values() if use.cache == key), key=lambda u: u.volume_id
        )

    def reserve(self, digest: str, mount_root: str) -> None:
        """Keep a prepared entry from GC until it is published (or the reservation expires)."""
        self._reserved[(digest, mount_root)] = self.clock() + RESERVATION_SECONDS

    # What GC may not touch ----------------------------------------------------------------

    def wanted(self) -> set[str]:
        """The digests some cache (not being deleted) resolves to."""
        return {
            spec.resolved_digest
            for spec in self.caches.values()
            if spec.resolved_digest is not None and not spec.deleting
        }

    def in_use(self) -> set[tuple[str, str]]:
        """(digest, mount root) of every mounted or just prepared store entry."""
        now = self.clock()
        for entry, until in list(self._reserved.items()):
            if until <= now:
                del self._reserved[entry]
        return {(use.digest, use.mount_root) for use in self.uses.values()} | set(self._reserved)

    def pulls(self) -> Iterator[tuple[CacheKey, DigestState]]:
        """Every digest state, for metrics."""
        for key, digests in self.digests.items():
            for state in digests.values():
                yield key, state
