"""Resource types, ``metav1.Status`` errors, and realistic Node and Pod objects.

Every object here is plain JSON (dicts) in the shape the API server sends, with
every field the ``kubernetes_asyncio`` models insist on when they deserialize
(``V1NodeSystemInfo`` and ``V1ContainerStatus`` refuse ``None`` for several).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tests.doubles.kubeapi._dra import convert_resource_slice

JsonObject = dict[str, Any]

Converter = Callable[[JsonObject, str, str], JsonObject]
"""``convert(obj, source_version, target_version)``: one object as another version shows it."""

Admit = Callable[[JsonObject], JsonObject]
"""``admit(obj)``: the object as the server stores it (pruned), or a 422 ``ApiError``."""


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One served resource: where it lives in the URL space and what its objects are."""

    plural: str
    kind: str
    group: str
    version: str
    namespaced: bool
    subresources: tuple[str, ...] = ()
    convert: Converter | None = None
    """For a resource served at several versions: between its versions and the stored one."""
    storage_version: str | None = None
    """The version the store keeps, when this one is another served version of it."""
    custom: bool = False
    """Declared by a CustomResourceDefinition (no strategic merge patch, status reset on create)."""
    admit: Admit | None = dataclasses.field(default=None, compare=False)
    """Checks (and may prune) an object about to be stored; raises a 422 ``ApiError``."""
    verbs: tuple[str, ...] = ("get", "list", "watch", "create", "update", "patch", "delete")

    @property
    def api_version(self) -> str:
        """``v1`` for the core group, ``group/version`` otherwise."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``pods`` or ``leases.coordination.k8s.io``, as the server names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """``Pod`` or ``GKMCache.gkm.io``, as the server names the kind in 422 messages."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def stored(self) -> ResourceType:
        """This resource at the version the store keeps (itself when that is this version)."""
        if self.storage_version is None:
            return self
        return dataclasses.replace(self, version=self.storage_version, storage_version=None)

    def served_as(self, version: str) -> ResourceType:
        """This resource as served at another version of its group."""
        if version != self.version and self.convert is None:
            raise ValueError(f"{self.qualified} is served at {self.version} only")
        keeps = self.storage_version or self.version
        return dataclasses.replace(self, version=version, storage_version=keeps)


PODS = ResourceType("pods", "Pod", "", "v1", namespaced=True, subresources=("exec", "status"))
NODES = ResourceType("nodes", "Node", "", "v1", namespaced=False, subresources=("status",))
LEASES = ResourceType("leases", "Lease", "coordination.k8s.io", "v1", namespaced=True)
RESOURCE_SLICES = ResourceType(
    "resourceslices",
    "ResourceSlice",
    "resource.k8s.io",
    "v1",
    namespaced=False,
    convert=convert_resource_slice,
)
SUBJECT_ACCESS_REVIEWS = ResourceType(
    "subjectaccessreviews",
    "SubjectAccessReview",
    "authorization.k8s.io",
    "v1",
    namespaced=False,
    verbs=("create",),
)
"""Answered, never stored (see ``_authz``)."""
RESOURCES: dict[str, ResourceType] = {
    r.qualified: r for r in (PODS, NODES, LEASES, RESOURCE_SLICES)
}
"""The built-in resources the store holds, by qualified name, at the version it stores (a
served version's view is converted on the way in and out, see `to_wire` and `from_wire`);
the kinds of ``_core``, CRDs (``_crd.CRDS``) and custom resources join them in the store."""


def to_wire(resource: ResourceType, obj: JsonObject) -> JsonObject:
    """A stored object as the served version ``resource`` shows it (the same dict if unchanged)."""
    stored = resource.storage_version or resource.version
    if resource.version == stored or resource.convert is None:
        return obj
    return resource.convert(obj, stored, resource.version)


def from_wire(resource: ResourceType, body: Any) -> Any:
    """A request body sent to the served version ``resource``, as the store keeps it."""
    stored = resource.storage_version or resource.version
    if resource.version == stored or resource.convert is None or not isinstance(body, dict):
        return body
    return resource.convert(body, resource.version, stored)


@dataclass(frozen=True, slots=True)
class Cause:
    """One field error of a 422, as ``field.Error`` renders it (``reason`` is its type)."""

    field: str
    reason: str
    """``FieldValueRequired``, ``FieldValueInvalid``, ``FieldValueTooLong`` and so on."""
    message: str
    """``Required value``, ``Invalid value: "x": …``, as the server writes it after the field."""


class ApiError(Exception):
    """An error the double answers with a ``metav1.Status`` body and the same HTTP code."""

    def __init__(
        self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def status(self) -> JsonObject:
        """The ``metav1.Status`` body for this error."""
        return status_body(self.code, self.reason, self.message, self.details)

    @classmethod
    def bad_request(cls, message: str, *, reason: str = "BadRequest") -> ApiError:
        """400, for malformed queries and requests the server refuses outright."""
        return cls(400, reason, message)

    @classmethod
    def not_found(cls, resource: ResourceType, name: str) -> ApiError:
        """404 for a named object, worded as the real server words it."""
        return cls(
            404,
            "NotFound",
            f'{resource.qualified} "{name}" not found',
            {"name": name, "group": resource.group, "kind": resource.plural},
        )

    @classmethod
    def already_exists(cls, resource: ResourceType, name: str) -> ApiError:
        """409 AlreadyExists, for a create of a name in use."""
        return cls(
            409,
            "AlreadyExists",
            f'{resource.qualified} "{name}" already exists',
            {"name": name, "group": resource.group, "kind": resource.plural},
        )

    @classmethod
    def conflict(cls, resource: ResourceType, name: str) -> ApiError:
        """409 Conflict, for a write from a stale resourceVersion."""
        return cls(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {resource.qualified} "{name}": the object has '
            "been modified; please apply your changes to the latest version and try again",
            {"name": name, "group": resource.group, "kind": resource.plural},
        )

    @classmethod
    def invalid(cls, resource: ResourceType, name: str, causes: Sequence[Cause]) -> ApiError:
        """422 Invalid: the object fails validation; worded as ``errors.NewInvalid`` words it."""
        texts = [f"{c.field}: {c.message}" for c in causes]
        joined = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
        return cls(
            422,
            "Invalid",
            f'{resource.qualified_kind} "{name}" is invalid: {joined}',
            {
                "name": name,
                "group": resource.group,
                "kind": resource.kind,
                "causes": [
                    {"reason": c.reason, "message": c.message, "field": c.field} for c in causes
                ],
            },
        )

    @classmethod
    def too_large_resource_version(cls, requested: int, current: int) -> ApiError:
        """504 with cause ResourceVersionTooLarge: a version newer than the server has seen.

        The real server waits up to 3 s for its watch cache to catch up first;
        after an etcd restore it never does.
        """
        return cls(
            504,
            "Timeout",
            f"Too large resource version: {requested}, current: {current}",
            {
                "causes": [
                    {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                ],
                "retryAfterSeconds": 1,
            },
        )

    @classmethod
    def expired(cls, message: str) -> ApiError:
        """410 Gone with reason Expired: the requested history is no longer kept."""
        return cls(410, "Expired", message)


def status_body(
    code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> JsonObject:
    """A ``metav1.Status`` failure, as the API server sends it."""
    body: JsonObject = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


def timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 in UTC with second precision, as ``metav1.Time`` serializes."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def stable_seed(name: str) -> int:
    """A seed derived from ``name`` that is the same in every run and process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def new_node(
    name: str, *, provider_id: str, system_uuid: str, labels: Mapping[str, str]
) -> JsonObject:
    """A Ready node, labelled like a kubelet labels it, plus ``labels``."""
    seed = stable_seed(name)
    address = f"10.{seed >> 16 & 0xFF}.{seed >> 8 & 0xFF}.{seed & 0xFF}"
    spec: JsonObject = {"providerID": provider_id} if provider_id else {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **labels,
            },
        },
        "spec": spec,
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": address},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": timestamp(),
                    "lastTransitionTime": timestamp(),
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": f"{seed:08x}-0000-4000-8000-000000000000",
                "containerRuntimeVersion": "containerd://1.7.13",
                "kernelVersion": "5.15.0-105-generic",
                "kubeProxyVersion": "v1.30.0",
                "kubeletVersion": "v1.30.0",
                "machineID": f"{seed:032x}",
                "operatingSystem": "linux",
                "osImage": "Ubuntu 22.04.4 LTS",
                "systemUUID": system_uuid,
            },
        },
    }


def new_pod(
    namespace: str,
    name: str,
    *,
    node_name: str,
    labels: Mapping[str, str],
    ready: bool,
    phase: str,
    containers: Sequence[str],
) -> JsonObject:
    """A pod scheduled on ``node_name``, with statuses consistent with ``phase`` and ``ready``."""
    seed = stable_seed(f"{namespace}/{name}")
    pod: JsonObject = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "nodeName": node_name,
            "containers": [
                {"name": c, "image": f"registry.example/{c}:latest"} for c in containers
            ],
            "restartPolicy": "Always",
        },
        "status": {
            "phase": phase,
            "hostIP": "10.0.0.1",
            "podIP": f"10.{128 + (seed >> 16 & 0x7F)}.{seed >> 8 & 0xFF}.{seed & 0xFF}",
            "startTime": timestamp(),
            "conditions": [],
            "containerStatuses": [
                {
                    "name": c,
                    "image": f"registry.example/{c}:latest",
                    "imageID": f"registry.example/{c}@sha256:{stable_seed(c):064x}",
                    "containerID": f"containerd://{stable_seed(f'{namespace}/{name}/{c}'):064x}",
                    "restartCount": 0,
                    "ready": False,
                    "started": False,
                    "state": {},
                }
                for c in containers
            ],
        },
    }
    set_ready(pod, ready)
    return pod


def set_ready(pod: JsonObject, ready: bool) -> None:
    """Make every container and the pod's Ready conditions say ``ready`` (mutates ``pod``)."""
    status = pod.setdefault("status", {})
    running = status.get("phase") == "Running"
    now = timestamp()
    for container in status.get("containerStatuses", []):
        container["ready"] = ready and running
        container["started"] = running
        if running:
            container["state"] = {"running": {"startedAt": now}}
        elif status.get("phase") in ("Succeeded", "Failed"):
            code = 0 if status["phase"] == "Succeeded" else 1
            container["state"] = {
                "terminated": {
                    "exitCode": code,
                    "reason": "Completed" if code == 0 else "Error",
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
        else:
            container["state"] = {"waiting": {"reason": "ContainerCreating"}}
    word = "True" if ready and running else "False"
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    for kind, value in (
        ("PodScheduled", "True"),
        ("Initialized", "True"),
        ("ContainersReady", word),
        ("Ready", word),
    ):
        condition = conditions.setdefault(kind, {"type": kind, "lastTransitionTime": now})
        if condition.get("status") != value:
            condition["lastTransitionTime"] = now
        condition["status"] = value
    status["conditions"] = list(conditions.values())
