"""The test-side face of custom resources, core kinds and access reviews.

`ClusterObjects` is a mixin of `KubeApiDouble`: CRDs (and the resources they
declare, which are served from the moment the CRD is stored, however it got
there), any object by ``apiVersion``/``kind``, Secrets, Namespaces,
ServiceAccounts, the Events clients posted, and SubjectAccessReview rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from tests.doubles.kubeapi._authz import AccessRule, Authorizer
from tests.doubles.kubeapi._core import (
    EVENTS,
    NAMESPACES,
    SECRETS,
    SERVICE_ACCOUNTS,
    new_namespace,
    new_secret,
    new_service_account,
)
from tests.doubles.kubeapi._crd import CRDS, crd_resources
from tests.doubles.kubeapi._discovery import KmockHandler, discovery_info
from tests.doubles.kubeapi._http import ApiFront
from tests.doubles.kubeapi._objects import JsonObject, ResourceType, from_wire
from tests.doubles.kubeapi._selectors import Selector
from tests.doubles.kubeapi._store import Store

_ALIASES = {
    "leases": "leases.coordination.k8s.io",
    "resourceslices": "resourceslices.resource.k8s.io",
}


class ClusterObjects:
    """Custom resources, core kinds and access reviews of `KubeApiDouble` (a mixin)."""

    _store: Store
    _front: ApiFront
    _authorizer: Authorizer
    kmock: KmockHandler
    _crd_served: dict[str, list[ResourceType]]

    def _on_commit(self, resource: ResourceType, event_type: str, obj: JsonObject) -> None:
        """Serve a CRD's resources once it is stored; stop when it is deleted."""
        if resource.qualified != CRDS.qualified:
            return
        name = obj["metadata"]["name"]
        for old in self._crd_served.pop(name, []):
            self._front.unserve(old)
            key = f"{old.api_version}/{old.plural}"
            if key in self.kmock.resources:
                del self.kmock.resources[key]
        if event_type == "DELETED":
            self._store.unregister(crd_resources(obj)[0])
            return
        served = crd_resources(obj)
        self._store.register(served[0])
        for wire in served:
            self._front.serve(wire)
            self.kmock.resources[f"{wire.api_version}/{wire.plural}"] = discovery_info(wire, obj)
        self._crd_served[name] = served

    # --- custom resources and any object ------------------------------------------

    def add_crd(self, crd: Mapping[str, object]) -> JsonObject:
        """Store an ``apiextensions.k8s.io/v1`` CRD; its resources are served from now on.

        The same happens when a client POSTs it. A malformed CRD raises the
        422 ``ApiError`` the server would answer.
        """
        return _copy(self._store.create(CRDS, None, json.loads(json.dumps(crd))))

    def _resource(self, kind: str) -> ResourceType:
        resource = self._store.resource(_ALIASES.get(kind, kind))
        if resource is None:
            raise KeyError(f"the double stores no {kind!r} (give plural or plural.group)")
        return resource

    def _resource_of(self, obj: Mapping[str, object]) -> ResourceType:
        for wire in self._front.served():
            if wire.api_version == obj.get("apiVersion") and wire.kind == obj.get("kind"):
                return wire
        raise KeyError(f"the double serves no {obj.get('kind')} at {obj.get('apiVersion')}")

    def add_object(self, obj: Mapping[str, object]) -> JsonObject:
        """Create any served object from its ``apiVersion``/``kind``; returns the stored copy.

        Unlike a client's create, ``status`` is kept (a test may start from any state).
        """
        wire = self._resource_of(obj)
        body = from_wire(wire, json.loads(json.dumps(obj)))
        namespace = body.get("metadata", {}).get("namespace") if wire.namespaced else None
        stored = self._store.create(wire.stored, namespace, body)
        return _copy(stored)

    def update_object(
        self, kind: str, namespace: str | None, name: str, mutate: Callable[[JsonObject], None]
    ) -> JsonObject:
        """Apply ``mutate`` to a copy of any object and store it (status included)."""
        return _copy(self._store.mutate(self._resource(kind), namespace, name, mutate))

    def delete_object(self, kind: str, namespace: str | None, name: str) -> JsonObject:
        """DELETE as a client would: with finalizers the object is only marked deleting."""
        return _copy(self._store.delete(self._resource(kind), namespace, name))

    def objects(self, kind: str, namespace: str | None = None) -> list[JsonObject]:
        """Copies of every stored object of ``kind`` (``plural`` or ``plural.group``)."""
        listed = self._store.list_objects(self._resource(kind), namespace, Selector())
        return [_copy(o) for o in listed["items"]]

    # --- core kinds ----------------------------------------------------------------

    def add_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, bytes],
        *,
        secret_type: str = "Opaque",
    ) -> JsonObject:
        """Create a Secret; ``data`` is stored base64-encoded, as the server stores it."""
        secret = new_secret(namespace, name, data, secret_type=secret_type)
        return _copy(self._store.create(SECRETS, namespace, secret))

    def add_namespace(self, name: str, *, labels: Mapping[str, str] | None = None) -> JsonObject:
        """Create an Active Namespace."""
        return _copy(self._store.create(NAMESPACES, None, new_namespace(name, labels or {})))

    def add_service_account(self, namespace: str, name: str) -> JsonObject:
        """Create a ServiceAccount."""
        account = new_service_account(namespace, name)
        return _copy(self._store.create(SERVICE_ACCOUNTS, namespace, account))

    def events(self, namespace: str | None = None) -> list[JsonObject]:
        """Copies of the core ``v1`` Events clients posted, oldest first."""
        listed = self._store.list_objects(EVENTS, namespace, Selector())["items"]
        ordered = sorted(listed, key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [_copy(e) for e in ordered]

    # --- access reviews --------------------------------------------------------------

    def allow(
        self,
        user: str,
        verb: str,
        group: str,
        resource: str,
        name: str | None = None,
        namespace: str | None = None,
    ) -> None:
        """Let SubjectAccessReviews for ``user`` doing ``verb`` on ``group``/``resource`` pass.

        ``"*"`` matches any user, verb, group or resource; ``name`` and
        ``namespace`` ``None`` match any. Reviews no rule matches are denied.
        """
        self._authorizer.allow(AccessRule(user, verb, group, resource, name, namespace))

    @property
    def access_reviews(self) -> list[JsonObject]:
        """Every SubjectAccessReview answered, with its ``status``, in arrival order."""
        return [_copy(r) for r in self._authorizer.reviews]


def _copy(obj: JsonObject) -> JsonObject:
    copied: JsonObject = json.loads(json.dumps(obj))
    return copied
