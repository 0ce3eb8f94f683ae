"""The kernel cache's cluster side as its parts see each other: GKM names, the volume contract.

The operator, the node agent and the CSI plugin are separate modules; this one holds what
they must agree on so that none imports another's internals:

- the GKM-compatible API names (group, kinds, plurals, finalizers, annotations, labels) and
  the CSI volume attributes a pod writes;
- `CacheKey`, the one way to name a cache (namespaced or cluster-scoped);
- the names the node process gives its per-node status objects and its Node labels;
- `VolumeSource`, what the CSI Node service asks of the node state when the kubelet publishes
  a volume, and the errors it answers with (``kcache.errors``; each maps to one gRPC code).

See docs/kcache-cluster.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "ANNOTATION_RESOLVED_DIGEST",
    "API_VERSION",
    "ATTR_CLUSTER_CACHE",
    "ATTR_NAMESPACE",
    "ATTR_NAMESPACED_CACHE",
    "CACHE_RESOURCES",
    "CLUSTER_CACHE",
    "CLUSTER_CACHE_FINALIZER",
    "CLUSTER_CACHE_NODE",
    "CSI_DRIVER",
    "GROUP",
    "LABEL_CACHE",
    "LABEL_HOSTNAME",
    "LABEL_SIGNATURE_FORMAT",
    "NAMESPACED_CACHE",
    "NAMESPACED_CACHE_FINALIZER",
    "NAMESPACED_CACHE_NODE",
    "NODE_RESOURCES",
    "POD_INFO_NAME",
    "POD_INFO_NAMESPACE",
    "POD_INFO_SERVICE_ACCOUNT",
    "POD_INFO_UID",
    "RESOURCES",
    "VERSION",
    "VOLUME_EPHEMERAL",
    "CacheKey",
    "PodInfo",
    "PreparedVolume",
    "Resource",
    "VolumeRequest",
    "VolumeSource",
    "node_label_key",
    "node_object_name",
]

GROUP = "gkm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True, slots=True)
class Resource:
    """One custom resource of ``gkm.io/v1alpha1``."""

    kind: str
    plural: str
    namespaced: bool

    @property
    def singular(self) -> str:
        """The lower-case kind, as the CRD's ``names.singular``."""
        return self.kind.lower()


NAMESPACED_CACHE = Resource("GKMCache", "gkmcaches", namespaced=True)
CLUSTER_CACHE = Resource("ClusterGKMCache", "clustergkmcaches", namespaced=False)
NAMESPACED_CACHE_NODE = Resource("GKMCacheNode", "gkmcachenodes", namespaced=True)
"""One per (GKMCache, node), in the cache's namespace; written by the node process only."""
CLUSTER_CACHE_NODE = Resource("ClusterGKMCacheNode", "clustergkmcachenodes", namespaced=False)
"""One per (ClusterGKMCache, node); written by the node process only."""
RESOURCES: tuple[Resource, ...] = (
    NAMESPACED_CACHE,
    CLUSTER_CACHE,
    NAMESPACED_CACHE_NODE,
    CLUSTER_CACHE_NODE,
)
"""Every kind of the API group, in the order the CRDs are rendered."""
CACHE_RESOURCES = (NAMESPACED_CACHE, CLUSTER_CACHE)
"""The kinds users write; the operator resolves them."""
NODE_RESOURCES = (NAMESPACED_CACHE_NODE, CLUSTER_CACHE_NODE)
"""The kinds the node process writes; the operator rolls them up."""

NAMESPACED_CACHE_FINALIZER = "gkm.io.gkmcachenode/finalizer"
"""The operator's finalizer on a GKMCache (GKM's name)."""
CLUSTER_CACHE_FINALIZER = "gkm.io.clustergkmcachenode/finalizer"
"""The operator's finalizer on a ClusterGKMCache (GKM's name)."""

ANNOTATION_RESOLVED_DIGEST = "gkm.io/resolvedDigest"
"""GKM's annotation of the digest; the operator writes it beside ``status.resolvedDigest``."""
LABEL_SIGNATURE_FORMAT = "gkm.io/signature-format"
"""On a cache: ``cosign-v2`` (the ``.sig`` tag) or ``cosign-v3`` (an OCI 1.1 bundle referrer)."""
LABEL_HOSTNAME = "kubernetes.io/hostname"
"""On a node object: the node it describes (GKM's label)."""
LABEL_CACHE = "gkm.io/cache"
"""On a node object: the name of the cache it describes, so the operator can select them."""

CSI_DRIVER = "csi.gkm.io"
ATTR_NAMESPACED_CACHE = "csi.gkm.io/GKMCache"
ATTR_CLUSTER_CACHE = "csi.gkm.io/ClusterGKMCache"
ATTR_NAMESPACE = "csi.gkm.io/namespace"
POD_INFO_NAME = "csi.storage.k8s.io/pod.name"
POD_INFO_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_INFO_UID = "csi.storage.k8s.io/pod.uid"
POD_INFO_SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
VOLUME_EPHEMERAL = "csi.storage.k8s.io/ephemeral"

_NAME_MAX = 253
_HASH_CHARS = 8


@dataclass(frozen=True, slots=True, order=True)
class CacheKey:
    """A cache by kind, namespace and name: ``namespace`` is None for a ClusterGKMCache."""

    kind: Literal["GKMCache", "ClusterGKMCache"]
    namespace: str | None
    name: str

    def __post_init__(self) -> None:
        if (self.kind == NAMESPACED_CACHE.kind) != (self.namespace is not None):
            raise ValueError(f"{self.kind} {self.name}: a namespace iff namespaced")

    @property
    def resource(self) -> Resource:
        """The cache's resource."""
        return NAMESPACED_CACHE if self.namespace is not None else CLUSTER_CACHE

    @property
    def node_resource(self) -> Resource:
        """The resource of the cache's per-node status objects."""
        return NAMESPACED_CACHE_NODE if self.namespace is not None else CLUSTER_CACHE_NODE

    def __str__(self) -> str:
        if self.namespace is None:
            return f"{self.kind} {self.name}"
        return f"{self.kind} {self.namespace}/{self.name}"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_CHARS]


def node_object_name(cache: CacheKey, node_name: str) -> str:
    """``<cache>-<8 hex of sha256(node name)>``: the node object of `cache` on `node_name`.

    GKM's scheme. A cache name too long to take the suffix is cut and gets a hash of its
    own, so two long names never share a node object.
    """
    suffix = f"-{_short_hash(node_name)}"
    name = cache.name
    if len(name) + len(suffix) > _NAME_MAX:
        keep = _NAME_MAX - len(suffix) - _HASH_CHARS - 1
        name = f"{name[:keep]}-{_short_hash(name)}"
    return f"{name}{suffix}"


def node_label_key(cache: CacheKey) -> str:
    """The Node label that says how `cache` stands on that node.

    ``gkm.io/cache-<20 hex>`` where the hash is of ``<namespace>/<name>`` (``/<name>`` for a
    ClusterGKMCache): a label name holds at most 63 characters, fewer than a namespace and a
    cache name together. Its value is ``ready`` when the cache is in the store and
    compatible with the node's GPUs, ``incompatible`` when no GPU of the node can use it;
    it is absent otherwise. The operator shows the key in ``status.nodeSelector``.
    """
    scope = cache.namespace or ""
    digest = hashlib.sha256(f"{scope}/{cache.name}".encode()).hexdigest()[:20]
    return f"gkm.io/cache-{digest}"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """The pod the kubelet publishes a volume for (``podInfoOnMount``)."""

    namespace: str
    name: str
    uid: str
    service_account: str


@dataclass(frozen=True, slots=True)
class VolumeRequest:
    """One ``NodePublishVolume``, checked: which cache, for which pod, where."""

    volume_id: str
    target_path: Path
    """Under ``<kubelet dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume name>/mount``."""
    volume_name: str
    """The pod's name for the volume (from the target path): finds the container mount paths."""
    cache: CacheKey
    pod: PodInfo


@dataclass(frozen=True, slots=True)
class PreparedVolume:
    """What to bind-mount at the target: a complete store entry, made for the pod's mount path."""

    path: Path
    digest: str
    mount_root: str


class VolumeSource(Protocol):
    """What the CSI Node service asks of the node state. Implemented by the node process.

    `prepare` raises ``kcache.errors.VolumeError`` subclasses, each answered with one gRPC
    code: `CacheNotReadyError` UNAVAILABLE, `CacheIncompatibleError` FAILED_PRECONDITION,
    `CacheNotFoundError` NOT_FOUND, `CacheAccessDeniedError` PERMISSION_DENIED,
    `InvalidVolumeError` INVALID_ARGUMENT.
    """

    async def prepare(self, request: VolumeRequest) -> PreparedVolume:
        """The store entry to mount for `request`, once the cache is ready for its pod."""
        ...

    async def published(self, request: VolumeRequest, volume: PreparedVolume) -> None:
        """Told after the bind mount is in place and recorded: `volume` is now in use."""
        ...

    async def unpublished(self, volume_id: str) -> None:
        """Told after the target of `volume_id` is unmounted and its record removed."""
        ...
