"""The operator's reconciler: per cache, resolve when due, roll node objects up, write on change.

kopf delivers the watch events (`handlers.py`); this class keeps the latest objects (which
copy wins is `versions.py`'s) and runs one worker task per cache. An event only marks its
cache dirty: the worker waits a short coalescing window, then reconciles once, so a burst of
node-object changes costs at most one status write, and a reconcile whose result equals the
stored status writes nothing.

What a reconcile does, in order:

1. the first time after a start, list the cache's node objects from the API server (so the
   first roll-up never rests on a half-delivered watch);
2. a cache that is not being deleted gets GKM's finalizer, and is resolved when it is due
   (never resolved since the start, spec or signature-format label changed, the
   ``KCACHE_RESOLVE_INTERVAL`` passed, or a transient failure's backoff ran out);
3. node objects whose Node no longer exists are deleted;
4. the status (and GKM's digest annotation) is written if it differs from the stored one;
5. a cache being deleted loses the finalizer once a fresh list shows no node object left:
   each node process deletes its own once no pod there mounts the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gpufleet.core.retry import Backoff
from gpufleet.kcache.cluster import (
    ANNOTATION_RESOLVED_DIGEST,
    CLUSTER_CACHE_FINALIZER,
    NAMESPACED_CACHE,
    NAMESPACED_CACHE_FINALIZER,
    CacheKey,
)
from gpufleet.kcache.objects import CacheObject, InvalidObjectError, NodeObject
from gpufleet.kcache.operator.api import CacheApi, JsonObject
from gpufleet.kcache.operator.resolve import Resolver
from gpufleet.kcache.operator.status import Resolution, status_patch, wanted_status
from gpufleet.kcache.operator.versions import merge_listing, newer

__all__ = ["CacheController", "ControllerStats", "finalizer_of"]

log = logging.getLogger(__name__)


def finalizer_of(key: CacheKey) -> str:
    """GKM's finalizer name for `key`'s kind."""
    if key.kind == NAMESPACED_CACHE.kind:
        return NAMESPACED_CACHE_FINALIZER
    return CLUSTER_CACHE_FINALIZER


def _cache_key(obj: Mapping[str, Any]) -> CacheKey | None:
    metadata = obj.get("metadata") or {}
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if not isinstance(name, str):
        return None
    if namespace:
        return CacheKey("GKMCache", str(namespace), name)
    return CacheKey("ClusterGKMCache", None, name)


@dataclass
class ControllerStats:
    """Counters for /metrics: what the reconciler did."""

    reconciles: int = 0
    status_writes: int = 0
    resolutions: int = 0
    failures: int = 0


@dataclass
class _Slot:
    """One cache's worker and what it remembers between reconciles."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    resolution: Resolution | None = None
    resolved_for: tuple[int, str, str | None] | None = None
    resolve_at: float = 0.0
    resolve_failures: int = 0
    retry_at: float | None = None
    retry_failures: int = 0
    listed: bool = False
    posted: set[tuple[str, str]] = field(default_factory=set)
    invalid: str | None = None


class CacheController:
    """Keeps the caches' status true to their image and their node objects."""

    def __init__(
        self,
        api: CacheApi,
        resolver: Resolver,
        *,
        resolve_interval: float,
        cluster_access: str,
        coalesce: float = 0.5,
        resolve_backoff: Backoff | None = None,
        retry_backoff: Backoff | None = None,
        stats: ControllerStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._api = api
        self._resolver = resolver
        self._interval = resolve_interval
        self._access = cluster_access
        self._coalesce = coalesce
        self._resolve_backoff = resolve_backoff or Backoff(
            initial=min(2.0, resolve_interval), cap=resolve_interval, jitter=0.5
        )
        self._retry_backoff = retry_backoff or Backoff(initial=0.5, cap=30.0, jitter=0.5)
        self._clock = clock
        self._wall_clock = wall_clock
        self._caches: dict[CacheKey, JsonObject] = {}
        self._node_objects: dict[CacheKey, dict[str, JsonObject]] = {}
        self._gone: dict[CacheKey, dict[str, JsonObject]] = {}
        self._listing: set[CacheKey] = set()
        self._nodes: set[str] = set()
        self._nodes_listed: asyncio.Lock | None = None  # made on the loop, at first use
        self._nodes_seeded = False
        self._slots: dict[CacheKey, _Slot] = {}
        self._closed = False
        self.stats = stats if stats is not None else ControllerStats()

    # --- events (from kopf) ------------------------------------------------------------

    def cache_event(self, kind: str | None, obj: Mapping[str, Any]) -> None:
        """A watch event of a GKMCache/ClusterGKMCache (`kind` None: the initial list)."""
        key = _cache_key(obj)
        if key is None:
            return
        if kind == "DELETED":
            self._caches.pop(key, None)
        elif newer(obj, self._caches.get(key)):
            self._caches[key] = dict(obj)
        else:
            return
        self._touch(key)

    def node_object_event(self, kind: str | None, obj: Mapping[str, Any]) -> None:
        """A watch event of a GKMCacheNode/ClusterGKMCacheNode."""
        try:
            node_object = NodeObject.from_api(obj)
        except InvalidObjectError as exc:
            log.warning("ignoring an invalid node object", extra={"error": str(exc)})
            return
        key = node_object.cache_key
        if key is None:
            return
        name = node_object.metadata.name
        objects = self._node_objects.setdefault(key, {})
        if kind == "DELETED":
            if key in self._listing:
                # Remembered, so that a list served just before this cannot revive it.
                self._gone.setdefault(key, {})[name] = dict(obj)
            if objects.pop(name, None) is None:
                return
        elif newer(obj, objects.get(name)):
            objects[name] = dict(obj)
        else:
            return
        if key in self._caches:
            self._touch(key)

    def node_event(self, kind: str | None, obj: Mapping[str, Any]) -> None:
        """A watch event of a Node: a deleted Node's node objects are stale."""
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str):
            return
        if kind != "DELETED":
            self._nodes.add(name)
            return
        self._nodes.discard(name)
        for key, objects in self._node_objects.items():
            if key in self._caches and any(_node_of(o) == name for o in objects.values()):
                self._touch(key)

    # --- workers -----------------------------------------------------------------------

    def _touch(self, key: CacheKey) -> None:
        if self._closed:
            return
        slot = self._slots.get(key)
        if slot is None:
            if key not in self._caches:
                return
            slot = self._slots[key] = _Slot()
        slot.wake.set()
        if slot.task is None or slot.task.done():
            slot.task = asyncio.create_task(self._work(key, slot), name=f"reconcile {key}")

    async def close(self) -> None:
        """Stop every worker (leadership lost, or shutting down)."""
        self._closed = True
        tasks = [slot.task for slot in self._slots.values() if slot.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._slots.clear()

    @property
    def caches(self) -> int:
        """How many caches the controller knows."""
        return len(self._caches)

    @property
    def workers(self) -> int:
        """How many caches have a worker now."""
        return len(self._slots)

    async def _work(self, key: CacheKey, slot: _Slot) -> None:
        while True:
            woken = await self._wait(key, slot)
            if woken and self._coalesce > 0:
                await asyncio.sleep(self._coalesce)  # let a burst of events pile up
            slot.wake.clear()
            if key not in self._caches:
                self._slots.pop(key, None)
                self._node_objects.pop(key, None)
                self._resolver.forget(key)
                return
            try:
                await self._reconcile(key, slot)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failures += 1
                delay = self._retry_backoff.delay(slot.retry_failures)
                slot.retry_failures += 1
                slot.retry_at = self._clock() + delay
                log.warning(
                    "reconcile failed; retrying",
                    extra={"cache": str(key), "error": f"{type(exc).__name__}: {exc}",
                           "retry_in_s": round(delay, 2)},
                )  # fmt: skip
            else:
                slot.retry_failures = 0
                slot.retry_at = None

    async def _wait(self, key: CacheKey, slot: _Slot) -> bool:
        """Until woken (True) or a timer is due (False)."""
        if slot.wake.is_set():
            return True
        deadlines = [slot.retry_at] if slot.retry_at is not None else []
        raw = self._caches.get(key)
        if raw is not None and not (raw.get("metadata") or {}).get("deletionTimestamp"):
            deadlines.append(slot.resolve_at)
        timeout = max(0.0, min(deadlines) - self._clock()) if deadlines else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await slot.wake.wait()
                return True
        return False

    # --- one reconcile -----------------------------------------------------------------

    def _store(self, key: CacheKey, obj: JsonObject) -> JsonObject:
        """Keep the object a write returned (newer than the watch may have delivered).

        Unless the watch said DELETED meanwhile: a write's answer must not revive it.
        """
        current = self._caches.get(key)
        if current is None:
            return obj
        if newer(obj, current):
            self._caches[key] = current = obj
        return current

    async def _relist(self, key: CacheKey) -> None:
        """Read the cache's node objects from the API server and merge them in."""
        self._listing.add(key)
        try:
            self._merge_listed(key, await self._api.list_node_objects(key))
        finally:
            self._listing.discard(key)
            self._gone.pop(key, None)

    def _merge_listed(self, key: CacheKey, listing: tuple[list[JsonObject], str | None]) -> None:
        items, version = listing
        self._node_objects[key] = merge_listing(
            self._node_objects.get(key, {}), items, version, self._gone.get(key, {})
        )

    async def _reconcile(self, key: CacheKey, slot: _Slot) -> None:
        self.stats.reconciles += 1
        raw = self._caches[key]
        try:
            cache = CacheObject.from_api(raw)
        except InvalidObjectError as exc:
            if slot.invalid != str(exc):
                slot.invalid = str(exc)
                log.warning(
                    "ignoring an invalid cache", extra={"cache": str(key), "error": str(exc)}
                )
            return
        slot.invalid = None
        if not slot.listed:
            await self._relist(key)
            slot.listed = True
        finalizer = finalizer_of(key)
        if not cache.deleting and finalizer not in cache.metadata.finalizers:
            raw = self._store(
                key,
                await self._api.add_finalizer(
                    key, finalizer, list(cache.metadata.finalizers), cache.metadata.resource_version
                ),
            )
            cache = CacheObject.from_api(raw)
        if not cache.deleting and self._resolve_due(slot, cache):
            await self._resolve(key, slot, cache, raw)
        await self._drop_stale_node_objects(key)
        node_objects = self._parsed_node_objects(key)
        now = self._wall_clock()
        wanted = wanted_status(
            cache, slot.resolution, node_objects,
            access=self._access if key.namespace is None else None, now=now,
        )  # fmt: skip
        patch = status_patch(raw.get("status"), wanted, now=now)
        if patch is not None:
            raw = self._store(key, await self._api.patch_status(key, patch))
            self.stats.status_writes += 1
            log.info(
                "status written",
                extra={"cache": str(key), "digest": wanted.resolved_digest, "ready": wanted.ready},
            )
        digest = wanted.resolved_digest
        annotations = cache.metadata.annotations
        if digest is not None and annotations.get(ANNOTATION_RESOLVED_DIGEST) != digest:
            raw = self._store(key, await self._api.annotate_digest(key, digest))
        if cache.deleting:
            await self._release(key, CacheObject.from_api(raw))

    def _resolve_due(self, slot: _Slot, cache: CacheObject) -> bool:
        wanted = (cache.generation, cache.spec.image, cache.signature_format)
        return (
            slot.resolution is None
            or slot.resolved_for != wanted
            or self._clock() >= slot.resolve_at
        )

    async def _resolve(
        self, key: CacheKey, slot: _Slot, cache: CacheObject, raw: JsonObject
    ) -> None:
        self.stats.resolutions += 1
        outcome = await self._resolver.resolve(cache)
        slot.resolution = outcome.resolution
        slot.resolved_for = (cache.generation, cache.spec.image, cache.signature_format)
        if outcome.transient:
            delay = self._resolve_backoff.delay(slot.resolve_failures)
            slot.resolve_failures += 1
        else:
            delay = self._interval
            slot.resolve_failures = 0
        slot.resolve_at = self._clock() + delay
        for kind, reason, message in outcome.events:
            if (reason, message) in slot.posted:
                continue  # said once already; a retry every backoff must not spam Events
            slot.posted = {(reason, message)}
            await self._api.post_event(key, raw, kind, reason, message, now=self._wall_clock())

    def _parsed_node_objects(self, key: CacheKey) -> list[NodeObject]:
        parsed = []
        for obj in self._node_objects.get(key, {}).values():
            try:
                parsed.append(NodeObject.from_api(obj))
            except InvalidObjectError:
                continue  # logged when it arrived
        return parsed

    async def _list_nodes_once(self) -> None:
        """Seed the known Nodes with one list, so a start costs no GET per node object."""
        if self._nodes_listed is None:
            self._nodes_listed = asyncio.Lock()
        async with self._nodes_listed:
            if not self._nodes_seeded:
                self._nodes |= await self._api.list_node_names()
                self._nodes_seeded = True

    async def _drop_stale_node_objects(self, key: CacheKey) -> None:
        """Delete node objects of Nodes that are gone (their node process cannot)."""
        if not self._node_objects.get(key):
            return
        await self._list_nodes_once()
        for name, obj in list(self._node_objects.get(key, {}).items()):
            node = _node_of(obj)
            if not node or node in self._nodes:
                continue
            if await self._api.node_exists(node):
                self._nodes.add(node)
                continue
            log.info(
                "deleting the node object of a gone Node", extra={"cache": str(key), "node": node}
            )
            await self._api.delete_node_object(key, name)
            self._node_objects.get(key, {}).pop(name, None)

    async def _release(self, key: CacheKey, cache: CacheObject) -> None:
        """Drop the finalizer once no node object of the cache is left (a fresh list says)."""
        finalizer = finalizer_of(key)
        if finalizer not in cache.metadata.finalizers or self._node_objects.get(key):
            return
        await self._relist(key)
        if self._node_objects.get(key):
            return
        await self._api.remove_finalizer(key, finalizer, list(cache.metadata.finalizers))
        log.info("finalizer released", extra={"cache": str(key)})


def _node_of(obj: Mapping[str, Any]) -> str | None:
    status = obj.get("status") or {}
    name = status.get("nodeName") if isinstance(status, Mapping) else None
    if isinstance(name, str) and name:
        return name
    labels = (obj.get("metadata") or {}).get("labels") or {}
    hostname = labels.get("kubernetes.io/hostname")
    return hostname if isinstance(hostname, str) and hostname else None
