"""The ``gkm.io/v1alpha1`` API objects as pydantic models: parsing, conditions, serialization.

The operator and the node process parse what the API server sends with
`CacheObject.from_api` / `NodeObject.from_api` (unknown fields are ignored, so a newer
GKM field never breaks them), keep conditions with `make_condition` / `set_condition`,
and write a status as the API stores it with `status_dict` (`kcache.patches` turns two
such dicts into the merge patch between them). The field constraints here are also the
CRDs' schema: `kcache.crds` generates the ``CustomResourceDefinition`` objects from
these models, so the API server itself refuses a bad image reference.

Field names are GKM's (camelCase on the wire, snake_case in Python). See
docs/kcache-cluster.md, "API objects".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from gpufleet.kcache.cluster import (
    API_VERSION,
    CLUSTER_CACHE,
    CLUSTER_CACHE_NODE,
    LABEL_CACHE,
    LABEL_HOSTNAME,
    LABEL_SIGNATURE_FORMAT,
    NAMESPACED_CACHE,
    NAMESPACED_CACHE_NODE,
    CacheKey,
    Resource,
    node_object_name,
)
from gpufleet.kcache.errors import KcacheError

__all__ = [
    "DIGEST_PATTERN",
    "IMAGE_MAX_LENGTH",
    "IMAGE_PATTERN",
    "ROLLUP_ORDER",
    "CacheConditionType",
    "CacheCounts",
    "CacheObject",
    "CacheSpec",
    "CacheStatus",
    "Condition",
    "DigestState",
    "DigestStatus",
    "GpuGroup",
    "GpuRef",
    "IncompatibleGpu",
    "InvalidObjectError",
    "NodeObject",
    "NodeStatus",
    "ObjectMeta",
    "PodRef",
    "make_condition",
    "new_node_object",
    "rfc3339",
    "rollup_state",
    "set_condition",
    "status_dict",
]


class InvalidObjectError(KcacheError):
    """An API object is not a valid GKMCache/ClusterGKMCache/node object; the message says why."""


# --- Patterns. RE2 (the API server's) and Python `re` read them alike: no lookaround, no
# backreferences; anchored, because OpenAPI patterns match anywhere.

IMAGE_MAX_LENGTH = 525
"""GKM's limit on ``spec.image``."""

_DIGEST = r"sha256:[0-9a-f]{64}"
DIGEST_PATTERN = rf"^{_DIGEST}$"
"""``sha256:<64 lowercase hex>``: the only digest shape the store and the URLs accept."""

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PORT = r"(?::[0-9]{1,5})?"
# Docker's rule: the first component names a registry only when it has a dot, a port or
# is localhost; otherwise it is the first component of a Docker Hub repository.
_REGISTRY = (
    rf"(?:localhost{_PORT}|{_LABEL}(?:\.[A-Za-z0-9-]+)+{_PORT}|{_LABEL}:[0-9]{{1,5}}"
    rf"|\[[0-9A-Fa-f:.]+\]{_PORT})"
)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
IMAGE_PATTERN = rf"^(?:{_REGISTRY}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?$"
"""An OCI reference ``[registry/]repository[:tag][@sha256:<64 hex>]`` (see `Reference.parse`)."""
_PINNED_IMAGE_PATTERN = rf"^(?:{_REGISTRY}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?@{_DIGEST}$"

# metav1.Condition's own validation.
_CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
_CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
_READY_PATTERN = r"^[0-9]+/[0-9]+$"

_DATE_TIME: dict[str, Any] = {"format": "date-time"}
_INT64: dict[str, Any] = {"format": "int64"}
_LIST_MAP_BY_TYPE: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}

_GPU_ID_MAX = 1024
_LIST_MAX = 1024


def _wire_name(name: str) -> str:
    # GKM spells GPU in capitals; everything else is plain camelCase.
    return to_camel(name).replace("Gpus", "GPUs")


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields ignored."""

    model_config = ConfigDict(
        alias_generator=_wire_name, populate_by_name=True, extra="ignore", frozen=False
    )


# --- Conditions


class CacheConditionType(enum.StrEnum):
    """The condition types of a cache's status (each kept once, standard semantics)."""

    RESOLVED = "Resolved"
    """True once the tag resolved to a digest. False reasons: RegistryError, NotFound."""
    VERIFIED = "Verified"
    """True: Verified or NotRequired. False: Unsigned, WrongKey, DigestMismatch, Error."""
    READY = "Ready"
    """True when every compatible node has the resolved digest Extracted or Running."""


class DigestState(enum.StrEnum):
    """How one digest of one cache stands on one node (the one GKM-style node condition)."""

    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    EXTRACTED = "Extracted"
    RUNNING = "Running"
    """Extracted and at least one pod mounts it."""
    OUTDATED = "Outdated"
    """No longer the resolved digest, but still mounted."""
    ERROR = "Error"
    INCOMPATIBLE = "Incompatible"


ROLLUP_ORDER: tuple[DigestState, ...] = (
    DigestState.ERROR,
    DigestState.OUTDATED,
    DigestState.RUNNING,
    DigestState.EXTRACTED,
    DigestState.DOWNLOADING,
    DigestState.PENDING,
)
"""GKM's roll-up: the first state here that any node is in names the cache's Ready reason."""


class Condition(_Model):
    """A standard ``metav1.Condition``; ``observedGeneration`` only on a cache's conditions."""

    type: str = Field(max_length=316, pattern=_CONDITION_TYPE_PATTERN)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=1024, pattern=_CONDITION_REASON_PATTERN)
    message: str = Field(default="", max_length=32768)
    last_transition_time: str = Field(json_schema_extra=_DATE_TIME)
    observed_generation: int | None = Field(default=None, ge=0, json_schema_extra=_INT64)


def rfc3339(when: datetime | None = None) -> str:
    """``when`` (default now) as the API server writes times: ``2026-01-02T03:04:05Z``."""
    moment = (when or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_condition(
    type_: str,
    status: bool | Literal["True", "False", "Unknown"],
    reason: str,
    message: str = "",
    *,
    now: datetime | None = None,
    observed_generation: int | None = None,
) -> Condition:
    """A condition, its transition time `now` (pass the clock's time; default: now)."""
    text: Literal["True", "False", "Unknown"] = (
        ("True" if status else "False") if isinstance(status, bool) else status
    )
    return Condition(
        type=type_,
        status=text,
        reason=reason,
        message=message,
        last_transition_time=rfc3339(now),
        observed_generation=observed_generation,
    )


def set_condition(conditions: Sequence[Condition], new: Condition) -> list[Condition]:
    """`conditions` with `new` in place of its type's entry (appended when absent).

    ``lastTransitionTime`` changes only when the status does, as Kubernetes does it: a
    condition that says the same thing again leaves the list equal, so the status does
    not change and nothing is written.
    """
    out: list[Condition] = []
    found = False
    for old in conditions:
        if old.type != new.type:
            out.append(old)
            continue
        found = True
        if old.status == new.status:
            out.append(new.model_copy(update={"last_transition_time": old.last_transition_time}))
        else:
            out.append(new)
    if not found:
        out.append(new)
    return out


def rollup_state(states: Iterable[DigestState | str]) -> DigestState | None:
    """The roll-up of the nodes' states (`ROLLUP_ORDER`); Incompatible nodes do not count."""
    present = {DigestState(state) for state in states}
    return next((state for state in ROLLUP_ORDER if state in present), None)


# --- GKMCache / ClusterGKMCache


class CacheSpec(_Model):
    """What the user writes. Only ``image`` is used; GKM's PVC-era fields are accepted, ignored."""

    image: str = Field(
        min_length=1,
        max_length=IMAGE_MAX_LENGTH,
        pattern=IMAGE_PATTERN,
        description=(
            "The kernel-cache image, [registry/]repository[:tag][@sha256:<64 hex>]. The "
            "operator resolves a tag to a digest; every node pulls that digest."
        ),
    )
    pod_template: dict[str, Any] | None = Field(
        default=None,
        description="GKM's PVC mode only: accepted and ignored.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    storage_class_name: str | None = Field(
        default=None, max_length=253, description="GKM's PVC mode only: accepted and ignored."
    )
    access_modes: list[str] | None = Field(
        default=None,
        max_length=8,
        description="GKM's PVC mode only: accepted and ignored.",
        json_schema_extra={"items": {"maxLength": 64}},
    )
    workload_namespaces: list[str] | None = Field(
        default=None,
        max_length=_LIST_MAX,
        description="GKM's PVC mode only: accepted and ignored.",
        json_schema_extra={"items": {"maxLength": 63}},
    )


class CacheCounts(_Model):
    """GKM's counts, rolled up from the node objects (nodes, and pods mounting the cache)."""

    node_cnt: int = Field(default=0, ge=0, json_schema_extra=_INT64)
    node_ready_cnt: int = Field(default=0, ge=0, json_schema_extra=_INT64)
    node_incompatible_cnt: int = Field(default=0, ge=0, json_schema_extra=_INT64)
    node_in_use_cnt: int = Field(default=0, ge=0, json_schema_extra=_INT64)
    node_not_in_use_cnt: int = Field(default=0, ge=0, json_schema_extra=_INT64)
    node_error_cnt: int = Field(default=0, ge=0, json_schema_extra=_INT64)
    pod_running_cnt: int = Field(default=0, ge=0, json_schema_extra=_INT64)
    pod_outdated_cnt: int = Field(default=0, ge=0, json_schema_extra=_INT64)


class CacheStatus(_Model):
    """Written by the operator only (RBAC: the node process cannot write it)."""

    resolved_digest: str | None = Field(
        default=None,
        pattern=DIGEST_PATTERN,
        description="The digest every node pulls; written only after the signature policy passed.",
    )
    resolved_image: str | None = Field(
        default=None,
        max_length=IMAGE_MAX_LENGTH + 72,
        pattern=_PINNED_IMAGE_PATTERN,
        description="repository@resolvedDigest: what the nodes pull.",
    )
    observed_generation: int | None = Field(default=None, ge=0, json_schema_extra=_INT64)
    previous_digests: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Digests the cache resolved to before that some pod still mounts.",
        json_schema_extra={"items": {"pattern": DIGEST_PATTERN}},
    )
    access: Literal["open", "restricted"] | None = Field(
        default=None,
        description="ClusterGKMCache only: restricted = a SubjectAccessReview per pod.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="The Node label a pod selects to land where the cache is ready.",
        json_schema_extra={"maxProperties": 1, "additionalProperties": {"maxLength": 63}},
    )
    ready: str | None = Field(
        default=None,
        max_length=32,
        pattern=_READY_PATTERN,
        description="Nodes ready / compatible nodes.",
    )
    counts: CacheCounts | None = None
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=_LIST_MAP_BY_TYPE
    )
    last_updated: str | None = Field(default=None, json_schema_extra=_DATE_TIME)

    def condition(self, type_: str) -> Condition | None:
        """The condition of `type_`, if set."""
        return next((c for c in self.conditions if c.type == type_), None)


class ObjectMeta(_Model):
    """The part of ``metadata`` the kcache code reads."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)
    deletion_timestamp: str | None = None


def _parse_meta(obj: Mapping[str, Any], what: str) -> ObjectMeta:
    try:
        return ObjectMeta.model_validate(obj.get("metadata") or {})
    except ValidationError as exc:
        raise InvalidObjectError(f"{what} without a valid metadata: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(object)"
    return f"{where}: {error['msg']}"


class CacheObject(_Model):
    """A GKMCache or a ClusterGKMCache, as the API server sends it."""

    api_version: str = API_VERSION
    kind: Literal["GKMCache", "ClusterGKMCache"]
    metadata: ObjectMeta
    spec: CacheSpec
    status: CacheStatus = Field(default_factory=CacheStatus)

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> Self:
        """Parse an API object; InvalidObjectError (naming the object and field) if invalid.

        A list response's items carry no ``kind``: a namespace then means GKMCache, none
        ClusterGKMCache. A null/absent status is an empty one.
        """
        meta = _parse_meta(obj, "a cache object")
        kind = obj.get("kind") or (NAMESPACED_CACHE.kind if meta.namespace else CLUSTER_CACHE.kind)
        where = f"{kind} {meta.namespace}/{meta.name}" if meta.namespace else f"{kind} {meta.name}"
        if kind not in (NAMESPACED_CACHE.kind, CLUSTER_CACHE.kind):
            raise InvalidObjectError(f"{where}: not a cache kind")
        if (kind == NAMESPACED_CACHE.kind) != bool(meta.namespace):
            raise InvalidObjectError(f"{where}: a namespace iff GKMCache")
        data = {**obj, "kind": kind, "status": obj.get("status") or {}}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidObjectError(f"{where}: {_first_error(exc)}") from None

    @property
    def key(self) -> CacheKey:
        """The cache's `CacheKey`."""
        return CacheKey(self.kind, self.metadata.namespace, self.metadata.name)

    @property
    def resource(self) -> Resource:
        """GKMCache's or ClusterGKMCache's `Resource`."""
        return NAMESPACED_CACHE if self.kind == NAMESPACED_CACHE.kind else CLUSTER_CACHE

    @property
    def generation(self) -> int:
        """``metadata.generation`` (1 when the server sent none)."""
        return self.metadata.generation or 1

    @property
    def signature_format(self) -> str | None:
        """GKM's ``gkm.io/signature-format`` label: cosign-v2, cosign-v3, or None (try both)."""
        return self.metadata.labels.get(LABEL_SIGNATURE_FORMAT)

    @property
    def deleting(self) -> bool:
        """Whether the user deleted it and a finalizer holds it."""
        return self.metadata.deletion_timestamp is not None


# --- GKMCacheNode / ClusterGKMCacheNode


class GpuGroup(_Model):
    """GPUs of one type and driver on the node (GKM's ``gpus`` entry)."""

    gpu_type: str = Field(max_length=256)
    driver_version: str = Field(default="", max_length=64)
    ids: list[int] = Field(default_factory=list, max_length=_GPU_ID_MAX)


class GpuRef(_Model):
    """One GPU by index and UUID."""

    id: int = Field(ge=0)
    uuid: str = Field(default="", max_length=128)


class IncompatibleGpu(GpuRef):
    """A GPU that cannot use the cache, and why (names the GPU's and the cache's targets)."""

    reason: str = Field(default="", max_length=1024)


class PodRef(_Model):
    """A pod that mounts the digest, through which volume."""

    pod_namespace: str = Field(max_length=63)
    pod_name: str = Field(max_length=253)
    volume_id: str = Field(max_length=256)


class DigestStatus(_Model):
    """One digest of one cache on this node."""

    compatible_gpus: list[GpuRef] = Field(default_factory=list, max_length=_GPU_ID_MAX)
    incompatible_gpus: list[IncompatibleGpu] = Field(default_factory=list, max_length=_GPU_ID_MAX)
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=4,
        description="One condition, GKM style: type = reason = the DigestState, status True.",
    )
    volume_size: int | None = Field(default=None, ge=0, json_schema_extra=_INT64)
    pods: list[PodRef] = Field(default_factory=list, max_length=_LIST_MAX)

    @property
    def state(self) -> DigestState | None:
        """The digest's state: the type of its (one) True condition."""
        for condition in self.conditions:
            if condition.status == "True" and condition.type in DigestState.__members__.values():
                return DigestState(condition.type)
        return None


class NodeStatus(_Model):
    """Written by the node process only (RBAC: the operator cannot write it)."""

    node_name: str | None = Field(default=None, max_length=253)
    observed_cache_generation: int | None = Field(default=None, ge=0, json_schema_extra=_INT64)
    gpus: list[GpuGroup] = Field(default_factory=list, max_length=64)
    caches: dict[str, dict[str, DigestStatus]] = Field(
        default_factory=dict,
        description="cache name -> digest -> how that digest stands on this node.",
        json_schema_extra={
            "maxProperties": 1,
            "additionalProperties": {"maxProperties": 64},
        },
    )
    counts: CacheCounts | None = None
    last_updated: str | None = Field(default=None, json_schema_extra=_DATE_TIME)


class NodeObject(_Model):
    """A GKMCacheNode or ClusterGKMCacheNode: one cache on one node (status only)."""

    api_version: str = API_VERSION
    kind: Literal["GKMCacheNode", "ClusterGKMCacheNode"]
    metadata: ObjectMeta
    spec: dict[str, Any] = Field(default_factory=dict)
    status: NodeStatus = Field(default_factory=NodeStatus)

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> Self:
        """Parse an API object, like `CacheObject.from_api`."""
        meta = _parse_meta(obj, "a node object")
        kind = obj.get("kind") or (
            NAMESPACED_CACHE_NODE.kind if meta.namespace else CLUSTER_CACHE_NODE.kind
        )
        where = f"{kind} {meta.namespace}/{meta.name}" if meta.namespace else f"{kind} {meta.name}"
        if kind not in (NAMESPACED_CACHE_NODE.kind, CLUSTER_CACHE_NODE.kind):
            raise InvalidObjectError(f"{where}: not a cache node kind")
        if (kind == NAMESPACED_CACHE_NODE.kind) != bool(meta.namespace):
            raise InvalidObjectError(f"{where}: a namespace iff GKMCacheNode")
        data = {
            **obj,
            "kind": kind,
            "spec": obj.get("spec") or {},
            "status": obj.get("status") or {},
        }
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidObjectError(f"{where}: {_first_error(exc)}") from None

    @property
    def cache_name(self) -> str | None:
        """The cache it describes (label ``gkm.io/cache``; else the one key of status.caches)."""
        name = self.metadata.labels.get(LABEL_CACHE)
        if name:
            return name
        return next(iter(self.status.caches), None)

    @property
    def cache_key(self) -> CacheKey | None:
        """The `CacheKey` of the cache it describes, if known."""
        name = self.cache_name
        if name is None:
            return None
        if self.kind == NAMESPACED_CACHE_NODE.kind:
            return CacheKey("GKMCache", self.metadata.namespace, name)
        return CacheKey("ClusterGKMCache", None, name)

    @property
    def node_name(self) -> str | None:
        """The node it describes (``status.nodeName``, else label ``kubernetes.io/hostname``)."""
        return self.status.node_name or self.metadata.labels.get(LABEL_HOSTNAME)


def new_node_object(cache: CacheKey, node_name: str) -> dict[str, Any]:
    """The body to create the node object of `cache` on `node_name` (status is patched after)."""
    resource = cache.node_resource
    metadata: dict[str, Any] = {
        "name": node_object_name(cache, node_name),
        "labels": {LABEL_HOSTNAME: node_name, LABEL_CACHE: cache.name},
    }
    if cache.namespace is not None:
        metadata["namespace"] = cache.namespace
    return {"apiVersion": API_VERSION, "kind": resource.kind, "metadata": metadata, "spec": {}}


# --- Serialization


def status_dict(status: CacheStatus | NodeStatus) -> dict[str, Any]:
    """`status` as the API stores it: camelCase, unset (None) fields left out."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
