"""The contract of ``KubeApiDouble`` for the core kinds the kernel cache needs.

Secrets, Events, Namespaces, ServiceAccounts, label and annotation patches on
Nodes, generation and finalizers on built-in kinds, and SubjectAccessReviews,
each shown with the real ``kubernetes_asyncio`` client over a loopback socket.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio.client import (
    ApiClient,
    AuthorizationV1Api,
    CoreV1Api,
    CoreV1Event,
    V1ObjectMeta,
    V1ObjectReference,
    V1ResourceAttributes,
    V1Secret,
    V1SubjectAccessReview,
    V1SubjectAccessReviewSpec,
)
from kubernetes_asyncio.client.exceptions import ApiException

from tests.doubles.kubeapi import KubeApiDouble

pytestmark = pytest.mark.integration

NS = "kcache-system"
MERGE = "application/merge-patch+json"
USER = "system:serviceaccount:team-a:app"


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble(bookmark_interval=0.2) as double:
        yield double


@pytest.fixture
async def client(api: KubeApiDouble) -> AsyncIterator[ApiClient]:
    async with ApiClient(api.client_configuration()) as c:
        yield c


@pytest.fixture
def core(client: ApiClient) -> CoreV1Api:
    return CoreV1Api(client)


# --- Secrets --------------------------------------------------------------------------------


async def test_add_secret_stores_base64_that_the_client_reads(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_secret(NS, "trust", {"team.pub": b"-----BEGIN PUBLIC KEY-----\n"})
    secret = await core.read_namespaced_secret("trust", NS)

    assert secret.type == "Opaque"
    assert base64.b64decode(secret.data["team.pub"]) == b"-----BEGIN PUBLIC KEY-----\n"


async def test_string_data_is_merged_into_data(core: CoreV1Api) -> None:
    body = V1Secret(
        metadata=V1ObjectMeta(name="s"),
        data={"a": base64.b64encode(b"1").decode()},
        string_data={"b": "2"},
    )
    created = await core.create_namespaced_secret(NS, body)

    assert created.string_data is None
    assert {k: base64.b64decode(v) for k, v in created.data.items()} == {"a": b"1", "b": b"2"}


async def test_secret_data_must_be_base64(core: CoreV1Api) -> None:
    body = {"metadata": {"name": "s"}, "data": {"a": "not base64!"}}
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_secret(NS, body)
    assert caught.value.status == 400


# --- Events, Namespaces, ServiceAccounts ---------------------------------------------------


async def test_posted_events_are_kept_for_assertions(api: KubeApiDouble, core: CoreV1Api) -> None:
    event = CoreV1Event(
        metadata=V1ObjectMeta(generate_name="kopf-event-", namespace=NS),
        involved_object=V1ObjectReference(kind="GKMCache", name="c1", namespace=NS),
        reason="Verified",
        message="signed by team-a",
        type="Normal",
    )
    created = await core.create_namespaced_event(NS, event)
    await core.patch_namespaced_event(created.metadata.name, NS, {"count": 2}, _content_type=MERGE)

    events = api.events(NS)
    assert [(e["reason"], e["message"], e["count"]) for e in events] == [
        ("Verified", "signed by team-a", 2)
    ]
    assert created.metadata.name.startswith("kopf-event-")
    assert events[0]["involvedObject"]["name"] == "c1"
    assert api.count(verb="create", resource="events") == 1


async def test_namespaces_are_listed_with_their_name_label(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_namespace("team-a", labels={"tier": "gold"})
    api.add_namespace("team-b")
    listed = await core.list_namespace(label_selector="tier=gold")
    got = await core.read_namespace("team-b")

    assert [n.metadata.name for n in listed.items] == ["team-a"]
    assert got.status.phase == "Active"
    assert got.metadata.labels == {"kubernetes.io/metadata.name": "team-b"}


async def test_service_accounts_are_served(api: KubeApiDouble, core: CoreV1Api) -> None:
    api.add_service_account("team-a", "app")
    accounts = await core.list_namespaced_service_account("team-a")
    assert [a.metadata.name for a in accounts.items] == ["app"]


# --- labels, annotations, generation and finalizers on built-in kinds -------------------------


async def test_node_labels_and_annotations_by_merge_and_strategic_patch(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_node("node-1", labels={"gkm.io/cache-old": "ready"})
    await core.patch_node(  # the client's default for a dict: strategic merge patch
        "node-1",
        {"metadata": {"labels": {"gkm.io/cache-new": "ready", "gkm.io/cache-old": None}}},
    )
    node = await core.patch_node(
        "node-1", {"metadata": {"annotations": {"gkm.io/seen": "1"}}}, _content_type=MERGE
    )

    assert node.metadata.labels["gkm.io/cache-new"] == "ready"
    assert "gkm.io/cache-old" not in node.metadata.labels
    assert node.metadata.labels["kubernetes.io/hostname"] == "node-1"
    assert node.metadata.annotations == {"gkm.io/seen": "1"}
    assert api.count(verb="patch", resource="nodes") == 2


async def test_a_label_patch_leaves_the_generation_alone(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_node("node-1")
    labelled = await core.patch_node("node-1", {"metadata": {"labels": {"a": "b"}}})
    cordoned = await core.patch_node("node-1", {"spec": {"unschedulable": True}})

    assert (labelled.metadata.generation, cordoned.metadata.generation) == (1, 2)


async def test_a_pod_with_a_finalizer_is_only_marked_by_delete(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "p", node_name="node-1", labels={})
    await core.patch_namespaced_pod(
        "p", NS, {"metadata": {"finalizers": ["example.com/hold"]}}, _content_type=MERGE
    )
    await core.delete_namespaced_pod("p", NS)
    marked = await core.read_namespaced_pod("p", NS)
    await core.patch_namespaced_pod(
        "p", NS, {"metadata": {"finalizers": None}}, _content_type=MERGE
    )

    assert marked.metadata.deletion_timestamp is not None
    assert api.get("pods", NS, "p") is None


# --- SubjectAccessReviews ---------------------------------------------------------------------


def review(name: str, namespace: str = "") -> V1SubjectAccessReview:
    return V1SubjectAccessReview(
        spec=V1SubjectAccessReviewSpec(
            user=USER,
            resource_attributes=V1ResourceAttributes(
                verb="use",
                group="gkm.io",
                resource="clustergkmcaches",
                name=name,
                namespace=namespace,
            ),
        )
    )


async def test_access_reviews_are_answered_from_the_rules(
    api: KubeApiDouble, client: ApiClient
) -> None:
    api.allow(USER, "use", "gkm.io", "clustergkmcaches", name="shared")
    authz = AuthorizationV1Api(client)

    allowed = await authz.create_subject_access_review(review("shared"))
    denied = await authz.create_subject_access_review(review("private"))

    assert allowed.status.allowed is True
    assert allowed.status.reason
    assert denied.status.allowed is False
    assert denied.spec.resource_attributes.name == "private"
    assert api.count(verb="create", resource="subjectaccessreviews") == 2
    assert [r["status"]["allowed"] for r in api.access_reviews] == [True, False]


async def test_rules_match_any_name_or_namespace_when_unset(
    api: KubeApiDouble, client: ApiClient
) -> None:
    api.allow(USER, "use", "gkm.io", "clustergkmcaches")
    api.allow("*", "get", "", "pods", namespace="team-b")
    authz = AuthorizationV1Api(client)

    any_name = await authz.create_subject_access_review(review("whatever"))
    other_verb = V1SubjectAccessReview(
        spec=V1SubjectAccessReviewSpec(
            user="someone",
            resource_attributes=V1ResourceAttributes(
                verb="get", resource="pods", namespace="team-b"
            ),
        )
    )
    pods = await authz.create_subject_access_review(other_verb)

    assert any_name.status.allowed is True
    assert pods.status.allowed is True


async def test_a_review_without_user_or_attributes_is_invalid(client: ApiClient) -> None:
    authz = AuthorizationV1Api(client)
    with pytest.raises(ApiException) as caught:
        await authz.create_subject_access_review({"spec": {"resourceAttributes": {"verb": "get"}}})
    assert caught.value.status == 422


async def test_a_strategic_merge_patch_merges_finalizers_on_built_in_kinds(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    # ObjectMeta.finalizers has patchStrategy "merge": a list in the patch adds to it.
    api.add_pod(NS, "p", node_name="node-1", labels={})
    await core.patch_namespaced_pod("p", NS, {"metadata": {"finalizers": ["a.example/x"]}})
    added = await core.patch_namespaced_pod("p", NS, {"metadata": {"finalizers": ["b.example/y"]}})
    removed = await core.patch_namespaced_pod(
        "p", NS, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a.example/x"]}}
    )

    assert added.metadata.finalizers == ["a.example/x", "b.example/y"]
    assert removed.metadata.finalizers == ["b.example/y"]


async def test_events_are_selected_by_their_involved_object(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    for name in ("c1", "c2"):
        await core.create_namespaced_event(
            NS,
            CoreV1Event(
                metadata=V1ObjectMeta(generate_name="e-"),
                involved_object=V1ObjectReference(kind="GKMCache", name=name, namespace=NS),
                reason="Resolved",
            ),
        )
    selected = await core.list_namespaced_event(
        NS, field_selector="involvedObject.kind=GKMCache,involvedObject.name=c2"
    )
    assert [e.involved_object.name for e in selected.items] == ["c2"]


# --- metadata validation ---------------------------------------------------------------------


async def test_a_name_that_is_not_a_dns_subdomain_is_invalid(core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_secret(NS, {"metadata": {"name": "Trust_Keys"}})
    assert caught.value.status == 422
    assert (
        'metadata.name: Invalid value: "Trust_Keys": a lowercase RFC 1123 subdomain'
        in (json.loads(caught.value.body)["message"])
    )


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"gkm.io/digest": "sha256:" + "a" * 20}, "a valid label must be an empty string or"),
        ({"gkm.io/cache": "x" * 64}, "must be no more than 63 characters"),
        ({"bad key": "v"}, "name part must consist of alphanumeric characters"),
        ({"Bad_Prefix/k": "v"}, "prefix part a lowercase RFC 1123 subdomain"),
    ],
)
async def test_invalid_label_keys_and_values_are_refused(
    api: KubeApiDouble, core: CoreV1Api, labels: dict[str, str], expected: str
) -> None:
    api.add_node("node-1")
    with pytest.raises(ApiException) as caught:
        await core.patch_node("node-1", {"metadata": {"labels": labels}})
    assert caught.value.status == 422
    assert (
        'Node "node-1" is invalid: metadata.labels: Invalid value: '
        in (json.loads(caught.value.body)["message"])
    )
    assert expected in json.loads(caught.value.body)["message"]
