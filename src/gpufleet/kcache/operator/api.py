"""The operator's calls to the API server: exactly the writes its RBAC grants, and its reads.

Writes: a cache's ``status`` (the ``/status`` subresource), its resolved-digest annotation,
its finalizer, Events, and deleting node objects whose Node is gone. Reads: node objects
(a fresh list where the decision must not rest on the watch: the first roll-up after a
start, and before a finalizer is released), Nodes, the trust Secret. Everything goes
through `gpufleet.kube.Kube`, so it shares the process's rate limiter.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kubernetes_asyncio.client import CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from gpufleet.kcache.cluster import (
    ANNOTATION_RESOLVED_DIGEST,
    GROUP,
    LABEL_CACHE,
    VERSION,
    CacheKey,
    Resource,
)
from gpufleet.kcache.objects import rfc3339
from gpufleet.kube.client import Kube, api_status, call_json

__all__ = ["MERGE_PATCH", "CacheApi", "JsonObject"]

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
JsonObject = dict[str, Any]


class CacheApi:
    """The API calls of the operator, on one `Kube` connection."""

    def __init__(self, kube: Kube, *, event_namespace: str) -> None:
        self._kube = kube
        self._custom: Any = CustomObjectsApi(kube.api_client)
        self._event_namespace = event_namespace

    # --- caches --------------------------------------------------------------------

    async def _patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        status: bool = False,
        content_type: str = MERGE_PATCH,
    ) -> JsonObject:
        method: Any
        if resource.namespaced:
            method = (
                self._custom.patch_namespaced_custom_object_status
                if status
                else self._custom.patch_namespaced_custom_object
            )
            args: tuple[Any, ...] = (GROUP, VERSION, namespace, resource.plural, name, body)
        else:
            method = (
                self._custom.patch_cluster_custom_object_status
                if status
                else self._custom.patch_cluster_custom_object
            )
            args = (GROUP, VERSION, resource.plural, name, body)
        result: JsonObject = await call_json(method, *args, _content_type=content_type)
        return result

    async def patch_status(self, key: CacheKey, patch: Mapping[str, Any]) -> JsonObject:
        """Merge `patch` into the cache's status; the object as stored after."""
        return await self._patch(
            key.resource, key.namespace, key.name, {"status": dict(patch)}, status=True
        )

    async def annotate_digest(self, key: CacheKey, digest: str | None) -> JsonObject:
        """Set (None: remove) GKM's ``gkm.io/resolvedDigest`` annotation."""
        body = {"metadata": {"annotations": {ANNOTATION_RESOLVED_DIGEST: digest}}}
        return await self._patch(key.resource, key.namespace, key.name, body)

    async def add_finalizer(
        self, key: CacheKey, finalizer: str, finalizers: list[str], resource_version: str | None
    ) -> JsonObject:
        """Append `finalizer` to the cache's `finalizers` (as last read), atomically.

        A JSON patch: appending leaves finalizers others add meanwhile alone; with none
        there yet, the list is created only if the object is still at `resource_version`.
        """
        ops: list[JsonObject]
        if finalizers:
            ops = [{"op": "add", "path": "/metadata/finalizers/-", "value": finalizer}]
        else:
            ops = [
                {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
                {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]},
            ]
        return await self._patch(
            key.resource, key.namespace, key.name, ops, content_type=JSON_PATCH
        )

    async def remove_finalizer(
        self, key: CacheKey, finalizer: str, finalizers: list[str]
    ) -> JsonObject:
        """Remove `finalizer` from the cache, if it is still where it was read (else 422)."""
        index = finalizers.index(finalizer)
        path = f"/metadata/finalizers/{index}"
        ops = [{"op": "test", "path": path, "value": finalizer}, {"op": "remove", "path": path}]
        return await self._patch(
            key.resource, key.namespace, key.name, ops, content_type=JSON_PATCH
        )

    # --- node objects ------------------------------------------------------------------

    async def list_node_objects(self, key: CacheKey) -> tuple[list[JsonObject], str | None]:
        """The cache's node objects read from the API server now (not the watch), and the
        list's resourceVersion."""
        resource = key.node_resource
        selector = f"{LABEL_CACHE}={key.name}"
        if key.namespace is not None:
            body = await call_json(
                self._custom.list_namespaced_custom_object, GROUP, VERSION, key.namespace,
                resource.plural, label_selector=selector,
            )  # fmt: skip
        else:
            body = await call_json(
                self._custom.list_cluster_custom_object, GROUP, VERSION, resource.plural,
                label_selector=selector,
            )  # fmt: skip
        items = body.get("items") or []
        kind = resource.kind
        version = (body.get("metadata") or {}).get("resourceVersion")
        listed = [{**item, "kind": item.get("kind") or kind} for item in items]
        return listed, version if isinstance(version, str) else None

    async def delete_node_object(self, key: CacheKey, name: str) -> None:
        """Delete one node object of the cache; already gone is fine."""
        resource = key.node_resource
        try:
            if key.namespace is not None:
                await call_json(
                    self._custom.delete_namespaced_custom_object, GROUP, VERSION,
                    key.namespace, resource.plural, name,
                )  # fmt: skip
            else:
                await call_json(
                    self._custom.delete_cluster_custom_object, GROUP, VERSION, resource.plural,
                    name,
                )  # fmt: skip
        except ApiException as exc:
            if api_status(exc) != 404:
                raise

    async def list_node_names(self) -> set[str]:
        """The names of every Node, from one list."""
        body = await call_json(self._kube.core.list_node)
        names = ((item.get("metadata") or {}).get("name") for item in body.get("items") or [])
        return {name for name in names if isinstance(name, str)}

    async def node_exists(self, name: str) -> bool:
        """Whether the Node `name` exists (asked of the API server, not the watch)."""
        try:
            await call_json(self._kube.core.read_node, name)
        except ApiException as exc:
            if api_status(exc) == 404:
                return False
            raise
        return True

    # --- the trust Secret ------------------------------------------------------------------

    async def read_secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's ``data``, base64-decoded; None when there is no such Secret."""
        try:
            secret = await call_json(self._kube.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if api_status(exc) == 404:
                return None
            raise
        data: dict[str, bytes] = {}
        for item, encoded in (secret.get("data") or {}).items():
            try:
                data[str(item)] = base64.b64decode(str(encoded), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(
                    f"Secret {namespace}/{name}: data[{item!r}] is not base64"
                ) from None
        return data

    # --- Events ------------------------------------------------------------------------

    async def post_event(
        self, key: CacheKey, obj: Mapping[str, Any], kind: str, reason: str, message: str,
        *, now: datetime,
    ) -> None:  # fmt: skip
        """Record a core/v1 Event about the cache (best effort: a failure is only logged)."""
        metadata = obj.get("metadata") or {}
        namespace = key.namespace or self._event_namespace
        stamp = rfc3339(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{key.name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": key.kind,
                "name": key.name,
                "namespace": key.namespace,
                "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "gpufleet-kcache-operator"},
            "reportingComponent": "gpufleet-kcache-operator",
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await call_json(self._kube.core.create_namespaced_event, namespace, body)
        except Exception as exc:
            log.warning(
                "could not record an event",
                extra={
                    "cache": str(key),
                    "reason": reason,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
