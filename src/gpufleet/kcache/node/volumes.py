"""What the CSI Node service asks of the node state: `NodeVolumes`, the `VolumeSource`.

`prepare` decides whether a pod may have a cache and which store entry it gets:

1. the cache must exist (NOT_FOUND), and before the informers have listed, an unknown cache
   may yet appear, so it is UNAVAILABLE and the kubelet retries;
2. a restricted ClusterGKMCache needs a SubjectAccessReview: may the pod's ServiceAccount
   ``use`` it? (PERMISSION_DENIED);
3. the resolved digest must be in the store (UNAVAILABLE while resolving or pulling, and while
   a failed pull waits for its retry), and compatible with a GPU of the node
   (FAILED_PRECONDITION, with every GPU's reason);
4. the pod is read (its UID must match the pod info): the containers (init and ephemeral ones
   too) that mount the volume name its mount path. They must agree, and none may mount a
   subPath (INVALID_ARGUMENT): the entry's ``__grp__`` files name absolute paths under one
   root;
5. the entry for that root: the image's own, or one derived from it (`CacheStore.derive`).

The access check comes before the state checks, so a pod that may not use a cache learns
nothing about it.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from gpufleet.kcache.cluster import (
    CLUSTER_CACHE,
    GROUP,
    CacheKey,
    PreparedVolume,
    VolumeRequest,
)
from gpufleet.kcache.errors import (
    CacheAccessDeniedError,
    CacheIncompatibleError,
    CacheNotFoundError,
    CacheNotReadyError,
    InvalidVolumeError,
    KcacheError,
)
from gpufleet.kcache.node.state import NodeState, Phase, Use
from gpufleet.kcache.store import CacheStore

__all__ = ["AccessReview", "NodeVolumes", "PodReader", "mount_paths"]

log = logging.getLogger(__name__)

USE_VERB = "use"


class PodReader(Protocol):
    """Reads one pod from the API: its JSON, or None when it does not exist."""

    async def __call__(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """GET the pod; raises on any failure but 404."""
        ...


class AccessReview(Protocol):
    """A SubjectAccessReview: may `user` do `verb` on `group`/`resource` `name`?"""

    async def __call__(self, user: str, verb: str, group: str, resource: str, name: str) -> bool:
        """True when allowed; raises when the API cannot answer."""
        ...


def mount_paths(pod: Mapping[str, Any], volume_name: str) -> dict[str, str]:
    """``{container: mountPath}`` of every container that mounts `volume_name`.

    Raises `InvalidVolumeError` for a subPath mount. Paths are normalised (``/a/b/`` is
    ``/a/b``).
    """
    spec = pod.get("spec") if isinstance(pod.get("spec"), Mapping) else {}
    assert isinstance(spec, Mapping)
    found: dict[str, str] = {}
    for group in ("initContainers", "containers", "ephemeralContainers"):
        containers = spec.get(group)
        if not isinstance(containers, list):
            continue
        for container in containers:
            if not isinstance(container, Mapping):
                continue
            name = str(container.get("name") or "?")
            mounts = container.get("volumeMounts")
            for mount in mounts if isinstance(mounts, list) else ():
                if not isinstance(mount, Mapping) or mount.get("name") != volume_name:
                    continue
                if mount.get("subPath") or mount.get("subPathExpr"):
                    raise InvalidVolumeError(
                        f"container {name} mounts volume {volume_name} with a subPath: a kernel "
                        "cache is only served whole (its files name paths under its mount root)"
                    )
                path = mount.get("mountPath")
                if isinstance(path, str) and path.startswith("/"):
                    found[name] = posixpath.normpath(path)
    return found


class NodeVolumes:
    """The node state as the CSI Node service sees it (a `cluster.VolumeSource`)."""

    def __init__(
        self,
        state: NodeState,
        *,
        store: CacheStore,
        read_pod: PodReader,
        review: AccessReview,
        on_unpublished: Callable[[], None] | None = None,
        want: Callable[[CacheKey], None] | None = None,
        to_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread,
    ) -> None:
        self._state = state
        self._store = store
        self._read_pod = read_pod
        self._review = review
        self._on_unpublished = on_unpublished
        self._want = want
        self._to_thread = to_thread
        self.published_count = 0
        """Volumes published since start (for metrics)."""

    async def prepare(self, request: VolumeRequest) -> PreparedVolume:
        """The store entry to mount for `request`; raises a `VolumeError` subclass when none."""
        key = request.cache
        spec = self._state.cache(key)
        if spec is None or spec.deleting:
            if not self._state.synced:
                raise CacheNotReadyError(f"{key}: not known yet, the node is still starting")
            why = "is being deleted" if spec is not None else "does not exist"
            raise CacheNotFoundError(f"{key} {why}")
        if key.namespace is not None and key.namespace != request.pod.namespace:
            # The CSI side refuses this already; the state never serves across namespaces.
            raise CacheAccessDeniedError(
                f"{key}: pod {request.pod.namespace}/{request.pod.name} may only mount "
                f"caches of its own namespace"
            )
        if key.resource is CLUSTER_CACHE and spec.access == "restricted":
            await self._check_access(request)
        digest = spec.resolved_digest
        if digest is None:
            raise CacheNotReadyError(f"{key}: no digest resolved yet (the operator resolves it)")
        state = self._state.digest_state(key, digest)
        if state is None or state.phase in (Phase.PENDING, Phase.DOWNLOADING):
            if self._want is not None:
                self._want(key)
            raise CacheNotReadyError(f"{key}: {digest} is still being pulled to this node")
        if state.phase is Phase.ERROR:
            raise CacheNotReadyError(f"{key}: pulling {digest} failed, retrying: {state.message}")
        if state.phase is Phase.INCOMPATIBLE:
            raise CacheIncompatibleError(f"{key}: {state.message}")
        if state.mount_root is None:
            raise CacheNotReadyError(f"{key}: {digest} is not in the store yet")
        root = await self._pod_mount_root(request, state.mount_root)
        # Reserved first: GC must not take an entry between its derivation and the mount.
        self._state.reserve(digest, root)
        path = await self._entry(key, digest, state.mount_root, root)
        return PreparedVolume(path=path, digest=digest, mount_root=root)

    async def _check_access(self, request: VolumeRequest) -> None:
        pod = request.pod
        user = f"system:serviceaccount:{pod.namespace}:{pod.service_account}"
        try:
            allowed = await self._review(
                user, USE_VERB, GROUP, CLUSTER_CACHE.plural, request.cache.name
            )
        except Exception as exc:
            raise CacheNotReadyError(
                f"{request.cache}: cannot ask the API whether {user} may use it: {exc}"
            ) from exc
        if not allowed:
            raise CacheAccessDeniedError(
                f"{request.cache} is restricted and {user} may not {USE_VERB} it "
                f"(RBAC: verb {USE_VERB} on {CLUSTER_CACHE.plural}.{GROUP} {request.cache.name})"
            )

    async def _pod_mount_root(self, request: VolumeRequest, image_root: str) -> str:
        pod = request.pod
        try:
            obj = await self._read_pod(pod.namespace, pod.name)
        except Exception as exc:
            raise CacheNotReadyError(f"cannot read pod {pod.namespace}/{pod.name}: {exc}") from exc
        if obj is None:
            raise InvalidVolumeError(f"pod {pod.namespace}/{pod.name} does not exist")
        metadata = obj.get("metadata")
        uid = metadata.get("uid") if isinstance(metadata, Mapping) else None
        if uid != pod.uid:
            raise InvalidVolumeError(
                f"pod {pod.namespace}/{pod.name} has UID {uid}, not {pod.uid} as the kubelet says"
            )
        paths = mount_paths(obj, request.volume_name)
        distinct = sorted(set(paths.values()))
        if len(distinct) > 1:
            shown = ", ".join(f"{name} at {path}" for name, path in sorted(paths.items()))
            raise InvalidVolumeError(
                f"pod {pod.namespace}/{pod.name} mounts volume {request.volume_name} at "
                f"different paths ({shown}): a kernel cache serves one mount root"
            )
        # A volume no container mounts can take any root: the image's needs no copy.
        return distinct[0] if distinct else image_root

    async def _entry(self, key: object, digest: str, image_root: str, root: str) -> Path:
        if root == image_root:
            path = self._store.installed(digest, image_root)
            if path is None:
                raise CacheNotReadyError(f"{key}: {digest} is no longer in the store")
            return path
        path = self._store.installed(digest, root)
        if path is not None:
            return path
        try:
            derived: Path = await self._to_thread(self._store.derive, digest, image_root, root)
        except KcacheError as exc:
            raise CacheNotReadyError(f"{key}: preparing {digest} for {root}: {exc}") from exc
        log.info(
            "derived a store entry for a pod's mount path",
            extra={"cache": str(key), "digest": digest, "mount_root": root},
        )
        return derived

    async def published(self, request: VolumeRequest, volume: PreparedVolume) -> None:
        """The volume is mounted at its target and recorded: the pod uses the digest."""
        self.published_count += 1
        # The last use orders GC's evictions under a disk budget, across restarts too.
        await self._to_thread(self._store.touch, volume.digest, volume.mount_root)
        self._state.add_use(
            Use(request.volume_id, request.cache, volume.digest, volume.mount_root, request.pod)
        )

    async def unpublished(self, volume_id: str) -> None:
        """The volume is unmounted and its record gone: GC may take the entry once unused."""
        if self._state.remove_use(volume_id) is not None and self._on_unpublished is not None:
            self._on_unpublished()
