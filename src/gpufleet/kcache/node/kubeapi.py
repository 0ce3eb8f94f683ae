"""The API calls the node process makes, and nothing more (its RBAC follows this list).

- list/watch GKMCaches (all namespaces) and ClusterGKMCaches;
- get/create/patch status/delete its own GKMCacheNodes and ClusterGKMCacheNodes;
- get and patch (labels) its own Node;
- get pods (the pod a volume is published for);
- create SubjectAccessReviews (restricted ClusterGKMCaches).

Every call goes through the `Kube` connection's rate limiter; bodies are the API's JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kubernetes_asyncio.client import AuthorizationV1Api, CustomObjectsApi

from gpufleet.kcache.cluster import GROUP, VERSION, Resource
from gpufleet.kube.client import Kube, api_status, call_json

__all__ = ["NodeApi"]

MERGE_PATCH = "application/merge-patch+json"

Json = dict[str, Any]


class NodeApi:
    """The node process's view of the API server, over one rate-limited `Kube`."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.custom: Any = CustomObjectsApi(kube.api_client)
        self.authorization: Any = AuthorizationV1Api(kube.api_client)

    def lister(self, resource: Resource) -> Callable[..., Awaitable[Any]]:
        """A list function for an `Informer` of `resource`, across every namespace."""
        custom = self.custom
        if resource.namespaced:

            async def list_all_namespaces(*args: Any, **kwargs: Any) -> Any:
                return await custom.list_custom_object_for_all_namespaces(
                    GROUP, VERSION, resource.plural, *args, **kwargs
                )

            list_all_namespaces.__name__ = f"list_{resource.plural}"
            return list_all_namespaces

        async def list_cluster(*args: Any, **kwargs: Any) -> Any:
            return await custom.list_cluster_custom_object(
                GROUP, VERSION, resource.plural, *args, **kwargs
            )

        list_cluster.__name__ = f"list_{resource.plural}"
        return list_cluster

    # Node objects -----------------------------------------------------------------------

    async def get_object(self, resource: Resource, namespace: str | None, name: str) -> Json | None:
        """A custom object, or None when it does not exist."""
        try:
            if namespace is None:
                result: Json = await call_json(
                    self.custom.get_cluster_custom_object, GROUP, VERSION, resource.plural, name
                )
            else:
                result = await call_json(
                    self.custom.get_namespaced_custom_object,
                    GROUP, VERSION, namespace, resource.plural, name,
                )  # fmt: skip
        except Exception as exc:
            if api_status(exc) == 404:
                return None
            raise
        return result

    async def list_objects(self, resource: Resource, label_selector: str) -> list[Json]:
        """The custom objects of `resource` in every namespace that match `label_selector`."""
        if resource.namespaced:
            method: Any = self.custom.list_custom_object_for_all_namespaces
        else:
            method = self.custom.list_cluster_custom_object
        body = await call_json(
            method, GROUP, VERSION, resource.plural, label_selector=label_selector
        )
        return [item for item in body.get("items") or () if isinstance(item, dict)]

    async def create_object(self, resource: Resource, namespace: str | None, body: Json) -> Json:
        """Create a custom object; returns it as stored."""
        if namespace is None:
            result: Json = await call_json(
                self.custom.create_cluster_custom_object, GROUP, VERSION, resource.plural, body
            )
        else:
            result = await call_json(
                self.custom.create_namespaced_custom_object,
                GROUP, VERSION, namespace, resource.plural, body,
            )  # fmt: skip
        return result

    async def patch_status(
        self, resource: Resource, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> Json:
        """Merge-patch a custom object's ``/status``."""
        body = {"status": dict(patch)}
        if namespace is None:
            result: Json = await call_json(
                self.custom.patch_cluster_custom_object_status,
                GROUP, VERSION, resource.plural, name, body, _content_type=MERGE_PATCH,
            )  # fmt: skip
        else:
            result = await call_json(
                self.custom.patch_namespaced_custom_object_status,
                GROUP, VERSION, namespace, resource.plural, name, body, _content_type=MERGE_PATCH,
            )  # fmt: skip
        return result

    async def delete_object(self, resource: Resource, namespace: str | None, name: str) -> bool:
        """Delete a custom object; False when it was not there."""
        try:
            if namespace is None:
                await call_json(
                    self.custom.delete_cluster_custom_object, GROUP, VERSION, resource.plural, name
                )
            else:
                await call_json(
                    self.custom.delete_namespaced_custom_object,
                    GROUP, VERSION, namespace, resource.plural, name,
                )  # fmt: skip
        except Exception as exc:
            if api_status(exc) == 404:
                return False
            raise
        return True

    # The Node, pods, access reviews ------------------------------------------------------

    async def node_labels(self, node_name: str) -> dict[str, str]:
        """The labels of this node."""
        node = await call_json(self.kube.core.read_node, node_name)
        labels = (node.get("metadata") or {}).get("labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    async def patch_node_labels(self, node_name: str, labels: Mapping[str, str | None]) -> None:
        """Merge-patch this node's labels (None removes one)."""
        await call_json(
            self.kube.core.patch_node,
            node_name,
            {"metadata": {"labels": dict(labels)}},
            _content_type=MERGE_PATCH,
        )

    async def read_pod(self, namespace: str, name: str) -> Json | None:
        """A pod, or None when it does not exist."""
        try:
            pod: Json = await call_json(self.kube.core.read_namespaced_pod, name, namespace)
        except Exception as exc:
            if api_status(exc) == 404:
                return None
            raise
        return pod

    async def access_review(
        self, user: str, verb: str, group: str, resource: str, name: str
    ) -> bool:
        """Ask a SubjectAccessReview whether `user` may `verb` `resource` `name` of `group`."""
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": _service_account_groups(user),
                "resourceAttributes": {
                    "group": group, "resource": resource, "name": name, "verb": verb,
                },
            },
        }  # fmt: skip
        answer = await call_json(self.authorization.create_subject_access_review, body)
        return bool((answer.get("status") or {}).get("allowed"))


def _service_account_groups(user: str) -> list[str]:
    """The groups the API server gives ``system:serviceaccount:<ns>:<name>`` on login."""
    parts = user.split(":")
    groups = ["system:serviceaccounts"]
    if len(parts) == 4:
        groups.append(f"system:serviceaccounts:{parts[2]}")
    return [*groups, "system:authenticated"]
