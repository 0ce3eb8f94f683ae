"""The node's per-cache status objects and its Node labels, written only when they change.

`node_status` computes what a GKMCacheNode / ClusterGKMCacheNode says (GKM's shape, see
docs/kcache-cluster.md), without timestamps. `NodeObjects` compares it with what it last wrote
(after a restart: with the object as the API has it) and writes a merge patch of the
difference only, carrying each condition's ``lastTransitionTime`` over while its type stays,
so a steady node makes no writes at all. `NodeLabels` does the same for the Node's
``gkm.io/cache-<hash>`` labels.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from gpufleet.kcache.cluster import (
    CLUSTER_CACHE,
    CLUSTER_CACHE_NODE,
    LABEL_CACHE,
    LABEL_HOSTNAME,
    NAMESPACED_CACHE,
    NAMESPACED_CACHE_NODE,
    CacheKey,
    node_label_key,
    node_object_name,
)
from gpufleet.kcache.node.gpus import NodeGpus
from gpufleet.kcache.node.kubeapi import NodeApi
from gpufleet.kcache.node.state import NodeState, Phase
from gpufleet.kcache.objects import new_node_object
from gpufleet.kcache.patches import merge_patch
from gpufleet.kube.client import api_status

__all__ = ["LABEL_PREFIX", "NodeLabels", "NodeObjects", "node_status"]

log = logging.getLogger(__name__)

LABEL_PREFIX = "gkm.io/cache-"
"""Every label `cluster.node_label_key` makes starts with this."""

Json = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_status(state: NodeState, key: CacheKey, *, node_name: str, gpus: NodeGpus) -> Json | None:
    """What the node object of `key` on this node says; None when there should be none.

    There is one while the cache exists (and is not being deleted) or a pod here still
    mounts one of its digests. No timestamps: `NodeObjects` adds them.
    """
    spec = state.cache(key)
    digests = state.digests.get(key, {})
    if (spec is None or spec.deleting) and not digests:
        return None
    by_digest: Json = {}
    for digest, entry in sorted(digests.items()):
        phase = state.phase(key, digest) or Phase.PENDING
        message = entry.message or _message(phase, digest)
        by_digest[digest] = {
            "compatibleGPUs": [
                {"id": v.index, "uuid": v.uuid} for v in entry.verdicts if v.matches
            ],
            "incompatibleGPUs": [
                {"id": v.index, "uuid": v.uuid, "reason": v.reason}
                for v in entry.verdicts
                if not v.matches
            ],
            "conditions": [
                {"type": phase.value, "status": "True", "reason": phase.value, "message": message}
            ],
            "volumeSize": entry.size or 0,
            "pods": [
                {"podNamespace": u.pod.namespace, "podName": u.pod.name, "volumeId": u.volume_id}
                for u in state.uses_of(key)
                if u.digest == digest
            ],
        }
    return {
        "nodeName": node_name,
        "observedCacheGeneration": 0 if spec is None else spec.generation,
        "gpus": gpus.groups(),
        "caches": {key.name: by_digest},
    }


def _message(phase: Phase, digest: str) -> str:
    return {
        Phase.PENDING: f"{digest} waits to be pulled",
        Phase.DOWNLOADING: f"pulling {digest}",
        Phase.EXTRACTED: f"{digest} is in the store",
        Phase.RUNNING: f"{digest} is mounted by a pod",
        Phase.OUTDATED: f"{digest} is no longer resolved but a pod still mounts it",
    }.get(phase, phase.value)


def _without_times(status: Mapping[str, Any]) -> Json:
    """A written status as `node_status` computes it: no lastUpdated, no transition times."""
    content = copy.deepcopy(dict(status))
    content.pop("lastUpdated", None)
    content.pop("counts", None)
    for digests in (content.get("caches") or {}).values():
        for entry in (digests or {}).values() if isinstance(digests, Mapping) else ():
            for condition in entry.get("conditions") or () if isinstance(entry, Mapping) else ():
                if isinstance(condition, dict):
                    condition.pop("lastTransitionTime", None)
    return content


def _with_times(content: Json, before: Mapping[str, Any] | None, now: str) -> Json:
    """`content` with transition times: kept from `before` while a condition's type stays."""
    status = copy.deepcopy(content)
    old_caches = (before or {}).get("caches") or {}
    for cache, digests in status["caches"].items():
        old_digests = old_caches.get(cache) if isinstance(old_caches, Mapping) else None
        for digest, entry in digests.items():
            old_entry = old_digests.get(digest) if isinstance(old_digests, Mapping) else None
            old_conditions = (old_entry or {}).get("conditions") or []
            for condition in entry["conditions"]:
                since = next(
                    (
                        c.get("lastTransitionTime")
                        for c in old_conditions
                        if isinstance(c, Mapping) and c.get("type") == condition["type"]
                    ),
                    None,
                )
                condition["lastTransitionTime"] = since or now
    status["lastUpdated"] = now
    return status


class NodeObjects:
    """Create, patch and delete this node's node objects; a write only for a real change."""

    def __init__(self, api: NodeApi, node_name: str, *, now: Callable[[], str] = _now) -> None:
        self._api = api
        self._node = node_name
        self._now = now
        self._written: dict[CacheKey, Json | None] = {}
        """Per cache, the status last written or found (with times); None: no object."""
        self.writes = 0
        """API writes made (creates, status patches, deletes), for metrics."""

    async def sync(self, key: CacheKey, content: Json | None) -> None:
        """Make the node object of `key` say `content` (None: there is none)."""
        resource = key.node_resource
        name = node_object_name(key, self._node)
        if key not in self._written:
            found = await self._api.get_object(resource, key.namespace, name)
            self._written[key] = None if found is None else dict(found.get("status") or {})
        before = self._written[key]
        if content is None:
            if before is not None:
                self._written.pop(key)  # unknown until the delete succeeds
                await self._api.delete_object(resource, key.namespace, name)
                self.writes += 1
            self._written[key] = None
            return
        if before is not None and _without_times(before) == content:
            return
        status = _with_times(content, before, self._now())
        self._written.pop(key)  # unknown until the writes succeed: the next sync reads it
        if before is None:
            await self._create(key)
            patch = status
        else:
            patch = merge_patch(before, status)
        await self._api.patch_status(resource, key.namespace, name, patch)
        self.writes += 1
        self._written[key] = status
        log.info(
            "node object written",
            extra={"cache": str(key), "object": name, "states": _states(content)},
        )

    async def _create(self, key: CacheKey) -> None:
        try:
            await self._api.create_object(
                key.node_resource, key.namespace, new_node_object(key, self._node)
            )
        except Exception as exc:
            if api_status(exc) != 409:  # there already: the status patch makes it ours
                raise
        self.writes += 1

    async def prune(self, keep: Collection[CacheKey]) -> list[CacheKey]:
        """Delete this node's node objects of caches not in `keep`; returns their caches.

        For objects left by a cache that went while the process was down without its
        finalizer waiting for us (removed by hand), which nothing else would delete.
        """
        gone: list[CacheKey] = []
        selector = f"{LABEL_HOSTNAME}={self._node}"
        for resource in (NAMESPACED_CACHE_NODE, CLUSTER_CACHE_NODE):
            for obj in await self._api.list_objects(resource, selector):
                metadata = obj.get("metadata") or {}
                cache = (metadata.get("labels") or {}).get(LABEL_CACHE)
                if not cache:
                    continue
                namespace = metadata.get("namespace") if resource.namespaced else None
                key = CacheKey(
                    NAMESPACED_CACHE.kind if resource.namespaced else CLUSTER_CACHE.kind,  # type: ignore[arg-type]
                    namespace,
                    str(cache),
                )
                if key in keep or metadata.get("name") != node_object_name(key, self._node):
                    continue
                await self._api.delete_object(resource, namespace, str(metadata["name"]))
                self.writes += 1
                self._written[key] = None
                gone.append(key)
        if gone:
            log.info("deleted node objects of caches that are gone", extra={
                "caches": [str(key) for key in gone],
            })  # fmt: skip
        return gone

    def forget(self, key: CacheKey) -> None:
        """Drop what is known of `key`'s object (the next sync reads it again)."""
        self._written.pop(key, None)


def _states(content: Mapping[str, Any]) -> dict[str, str]:
    return {
        digest: entry["conditions"][0]["type"]
        for digests in content["caches"].values()
        for digest, entry in digests.items()
    }


class NodeLabels:
    """This Node's ``gkm.io/cache-*`` labels: patched only when a value changes."""

    def __init__(self, api: NodeApi, node_name: str) -> None:
        self._api = api
        self._node = node_name
        self._labels: dict[str, str] | None = None
        self.writes = 0

    async def _current(self) -> dict[str, str]:
        if self._labels is None:
            labels = await self._api.node_labels(self._node)
            self._labels = {k: v for k, v in labels.items() if k.startswith(LABEL_PREFIX)}
        return self._labels

    async def set(self, key: CacheKey, value: str | None) -> None:
        """Label the Node for `key` with `value` (``ready``/``incompatible``), or unlabel it."""
        await self.apply({node_label_key(key): value})

    async def apply(self, wanted: Mapping[str, str | None]) -> None:
        """Patch the labels of `wanted` that differ from the Node's, in one request."""
        labels = await self._current()
        patch = {k: v for k, v in wanted.items() if labels.get(k) != v}
        if not patch:
            return
        self._labels = None  # unknown until the patch succeeds
        await self._api.patch_node_labels(self._node, patch)
        self.writes += 1
        for name, value in patch.items():
            if value is None:
                labels.pop(name, None)
            else:
                labels[name] = value
        self._labels = labels

    async def prune(self, keep: Collection[str]) -> None:
        """Remove every cache label of this Node not in `keep` (caches deleted meanwhile)."""
        labels = await self._current()
        await self.apply({name: None for name in labels if name not in keep})
