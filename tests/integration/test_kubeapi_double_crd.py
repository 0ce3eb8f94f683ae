"""The contract of ``KubeApiDouble`` for custom resources, checked with the real client.

Each test states one behaviour of the real API server (CRDs and their
resources, the status subresource, ``metadata.generation``, finalizers and
deletion, schema validation) and shows the double reproducing it over a
loopback socket with ``kubernetes_asyncio``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import watch
from kubernetes_asyncio.client import ApiClient, ApiextensionsV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from tests.doubles.kubeapi import KubeApiDouble
from tests.integration.kubeapi_double_support import GROUP, IMAGE, VERSION, cache, cache_crd

pytestmark = pytest.mark.integration

NS = "team-a"
MERGE = "application/merge-patch+json"


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble(bookmark_interval=0.2) as double:
        double.add_crd(cache_crd())
        double.add_crd(cache_crd("ClusterGKMCache", scope="Cluster"))
        yield double


@pytest.fixture
async def client(api: KubeApiDouble) -> AsyncIterator[ApiClient]:
    async with ApiClient(api.client_configuration()) as c:
        yield c


@pytest.fixture
def custom(client: ApiClient) -> CustomObjectsApi:
    return CustomObjectsApi(client)


async def create(custom: CustomObjectsApi, name: str, **meta: Any) -> dict[str, Any]:
    body = cache(name, **meta)
    created: dict[str, Any] = await custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, "gkmcaches", body
    )
    return created


async def merge_patch(
    custom: CustomObjectsApi, name: str, patch: dict[str, Any], *, status: bool = False
) -> dict[str, Any]:
    call = (
        custom.patch_namespaced_custom_object_status
        if status
        else custom.patch_namespaced_custom_object
    )
    patched: dict[str, Any] = await call(
        GROUP, VERSION, NS, "gkmcaches", name, patch, _content_type=MERGE
    )
    return patched


def message(error: ApiException) -> str:
    """The ``metav1.Status`` message of an API error."""
    text: str = json.loads(error.body)["message"]
    return text


async def collect(stream: watch.Watch, count: int) -> list[dict[str, Any]]:
    """The next ``count`` events of ``stream``, bookmarks left out; fails after five seconds."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        async for event in stream:
            if event["type"] == "BOOKMARK":
                continue
            events.append(event)
            if len(events) == count:
                break
    return events


# --- CRDs and discovery ---------------------------------------------------------------


async def test_a_posted_crd_is_served_with_discovery(client: ApiClient) -> None:
    async with KubeApiDouble() as fresh, ApiClient(fresh.client_configuration()) as c:
        extensions = ApiextensionsV1Api(c)
        await extensions.create_custom_resource_definition(cache_crd("Widget"))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{fresh.url}/apis") as response:
                groups = await response.json()
            async with session.get(f"{fresh.url}/apis/{GROUP}/{VERSION}") as response:
                resources = await response.json()
        crd = await extensions.read_custom_resource_definition(f"widgets.{GROUP}")
        listed = await CustomObjectsApi(c).list_namespaced_custom_object(
            GROUP, VERSION, NS, "widgets"
        )

    assert GROUP in {g["name"] for g in groups["groups"]}
    by_name = {r["name"]: r for r in resources["resources"]}
    assert by_name["widgets"]["kind"] == "Widget"
    assert by_name["widgets"]["namespaced"] is True
    assert {"list", "watch", "patch", "create", "delete"} <= set(by_name["widgets"]["verbs"])
    assert "widgets/status" in by_name
    assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"
    assert listed["kind"] == "WidgetList"
    assert listed["items"] == []


async def test_discovery_prefers_the_most_stable_version(client: ApiClient) -> None:
    crd = cache_crd("Widget")
    stored = crd["spec"]["versions"][0]
    crd["spec"]["versions"] = [
        {**stored, "name": "v1alpha1", "storage": False},
        {**stored, "name": "v1"},
        {**stored, "name": "v1beta2", "storage": False},
        {**stored, "name": "v10alpha1", "storage": False},
    ]
    async with KubeApiDouble() as fresh, aiohttp.ClientSession() as session:
        fresh.add_crd(crd)
        async with session.get(f"{fresh.url}/apis") as response:
            groups = {g["name"]: g for g in (await response.json())["groups"]}
        async with session.get(f"{fresh.url}/apis/{GROUP}") as response:
            group = await response.json()

    for found in (groups[GROUP], group):
        assert found["preferredVersion"]["version"] == "v1"
        assert [v["version"] for v in found["versions"]] == [
            "v1",
            "v1beta2",
            "v10alpha1",
            "v1alpha1",
        ]


async def test_a_crd_named_other_than_plural_dot_group_is_invalid(
    api: KubeApiDouble, client: ApiClient
) -> None:
    crd = cache_crd("Widget")
    crd["metadata"]["name"] = "widgets"
    with pytest.raises(ApiException) as caught:
        await ApiextensionsV1Api(client).create_custom_resource_definition(crd)
    assert caught.value.status == 422
    assert 'must be spec.names.plural+"."+spec.group' in message(caught.value)


async def test_deleting_the_crd_stops_serving_its_resources(
    api: KubeApiDouble, client: ApiClient, custom: CustomObjectsApi
) -> None:
    await create(custom, "c1")
    await ApiextensionsV1Api(client).delete_custom_resource_definition(f"gkmcaches.{GROUP}")

    with pytest.raises(ApiException) as caught:
        await custom.list_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches")
    assert caught.value.status == 404


async def test_an_unserved_version_is_not_found(custom: CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as caught:
        await custom.list_namespaced_custom_object(GROUP, "v1", NS, "gkmcaches")
    assert caught.value.status == 404


# --- the verbs --------------------------------------------------------------------------


async def test_namespaced_create_get_list_everywhere_replace_delete(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    created = await create(custom, "c1", labels={"team": "a"})
    await custom.create_namespaced_custom_object(GROUP, VERSION, "team-b", "gkmcaches", cache("c2"))
    got = await custom.get_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")
    everywhere = await custom.list_cluster_custom_object(GROUP, VERSION, "gkmcaches")
    selected = await custom.list_cluster_custom_object(
        GROUP, VERSION, "gkmcaches", label_selector="team=a"
    )
    got["spec"]["image"] = "registry.example/caches/vector-add:v2"
    replaced = await custom.replace_namespaced_custom_object(
        GROUP, VERSION, NS, "gkmcaches", "c1", got
    )
    deleted = await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")

    assert created["metadata"]["namespace"] == NS
    assert created["metadata"]["uid"] == got["metadata"]["uid"]
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in everywhere["items"]] == [
        (NS, "c1"),
        ("team-b", "c2"),
    ]
    assert everywhere["metadata"]["resourceVersion"] == str(api.resource_version - 2)
    assert [o["metadata"]["name"] for o in selected["items"]] == ["c1"]
    assert replaced["spec"]["image"].endswith(":v2")
    assert deleted["metadata"]["name"] == "c1"
    assert api.get(f"gkmcaches.{GROUP}", NS, "c1") is None


async def test_cluster_scoped_resources_have_no_namespace(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    created = await custom.create_cluster_custom_object(
        GROUP, VERSION, "clustergkmcaches", cache("shared", kind="ClusterGKMCache")
    )
    listed = await custom.list_cluster_custom_object(GROUP, VERSION, "clustergkmcaches")

    assert "namespace" not in created["metadata"]
    assert [o["metadata"]["name"] for o in listed["items"]] == ["shared"]
    with pytest.raises(ApiException) as caught:
        await custom.get_namespaced_custom_object(GROUP, VERSION, NS, "clustergkmcaches", "shared")
    assert caught.value.status == 404


async def test_create_of_a_taken_name_is_already_exists(custom: CustomObjectsApi) -> None:
    await create(custom, "c1")
    with pytest.raises(ApiException) as caught:
        await create(custom, "c1")
    assert caught.value.status == 409


async def test_replace_from_a_stale_version_conflicts(custom: CustomObjectsApi) -> None:
    stale = await create(custom, "c1")
    await merge_patch(custom, "c1", {"spec": {"image": "registry.example/x:v2"}})
    with pytest.raises(ApiException) as caught:
        await custom.replace_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1", stale)
    assert caught.value.status == 409


async def test_watch_resumes_from_a_version_and_gets_bookmarks(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    await create(custom, "c1")
    listed = await custom.list_cluster_custom_object(GROUP, VERSION, "gkmcaches")
    await create(custom, "c2")
    stream = watch.Watch().stream(
        custom.list_cluster_custom_object,
        GROUP,
        VERSION,
        "gkmcaches",
        resource_version=listed["metadata"]["resourceVersion"],
        allow_watch_bookmarks=True,
    )
    added = await collect(stream, 1)
    await merge_patch(custom, "c1", {"metadata": {"labels": {"x": "1"}}})
    modified = await collect(stream, 1)
    async with asyncio.timeout(5):
        async for event in stream:
            if event["type"] == "BOOKMARK":
                bookmark = event
                break
    await stream.close()

    assert [(e["type"], e["object"]["metadata"]["name"]) for e in added + modified] == [
        ("ADDED", "c2"),
        ("MODIFIED", "c1"),
    ]
    assert bookmark["raw_object"]["metadata"]["resourceVersion"] == str(api.resource_version)


async def test_watch_from_expired_history_is_gone(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    old = (await create(custom, "c1"))["metadata"]["resourceVersion"]
    await create(custom, "c2")
    api.expire_history()

    stream = watch.Watch().stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        "gkmcaches",
        resource_version=old,
        timeout_seconds=5,
    )
    with pytest.raises(ApiException) as caught:
        await collect(stream, 1)
    assert caught.value.status == 410


async def test_writes_are_counted_by_verb_resource_and_subresource(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    await create(custom, "c1")
    await merge_patch(
        custom, "c1", {"status": {"resolvedDigest": "sha256:" + "a" * 64}}, status=True
    )
    await merge_patch(custom, "c1", {"metadata": {"labels": {"x": "1"}}})

    assert api.count(verb="create", resource="gkmcaches") == 1
    assert api.count(verb="patch", resource="gkmcaches") == 2
    assert api.count(verb="patch", resource="gkmcaches", subresource="status") == 1


# --- status, generation, no-op writes ---------------------------------------------------


async def test_status_subresource_changes_only_status(custom: CustomObjectsApi) -> None:
    await create(custom, "c1")
    digest = "sha256:" + "a" * 64
    patched = await merge_patch(
        custom,
        "c1",
        {"spec": {"image": "registry.example/x:v9"}, "status": {"resolvedDigest": digest}},
        status=True,
    )
    main = await merge_patch(
        custom, "c1", {"metadata": {"labels": {"a": "b"}}, "status": {"resolvedDigest": "no"}}
    )

    assert patched["status"]["resolvedDigest"] == digest
    assert patched["spec"]["image"] == IMAGE
    assert main["status"]["resolvedDigest"] == digest
    assert main["metadata"]["labels"] == {"a": "b"}


async def test_status_sent_on_create_is_dropped(custom: CustomObjectsApi) -> None:
    body = cache("c1")
    body["status"] = {"resolvedDigest": "sha256:" + "b" * 64}
    created = await custom.create_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", body)
    assert "status" not in created


async def test_generation_counts_spec_changes_only(custom: CustomObjectsApi) -> None:
    created = await create(custom, "c1")
    status = await merge_patch(custom, "c1", {"status": {"observedGeneration": 1}}, status=True)
    labels = await merge_patch(custom, "c1", {"metadata": {"labels": {"a": "b"}}})
    spec = await merge_patch(custom, "c1", {"spec": {"image": "registry.example/x:v2"}})
    again = await merge_patch(custom, "c1", {"spec": {"image": "registry.example/x:v3"}})

    assert [o["metadata"]["generation"] for o in (created, status, labels, spec, again)] == [
        1,
        1,
        1,
        2,
        3,
    ]


async def test_a_generation_sent_by_the_client_is_ignored(custom: CustomObjectsApi) -> None:
    await create(custom, "c1")
    patched = await merge_patch(custom, "c1", {"metadata": {"generation": 40}})
    assert patched["metadata"]["generation"] == 1


async def test_a_write_that_changes_nothing_keeps_the_version_and_sends_no_event(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    created = await create(custom, "c1", labels={"a": "b"})
    before = api.resource_version
    same = await merge_patch(custom, "c1", {"metadata": {"labels": {"a": "b"}}})
    stream = watch.Watch().stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        "gkmcaches",
        resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=1,
    )
    events = [e async for e in stream]

    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert api.resource_version == before
    assert events == []


# --- finalizers and deletion ------------------------------------------------------------


async def test_delete_with_a_finalizer_marks_then_the_last_finalizer_removes(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    created = await create(custom, "c1", finalizers=["gkm.io/cache"])
    stream = watch.Watch().stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        "gkmcaches",
        resource_version=created["metadata"]["resourceVersion"],
    )
    marked = await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")
    again = await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")
    still = await custom.get_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")
    released = await merge_patch(custom, "c1", {"metadata": {"finalizers": None}})
    events = await collect(stream, 3)
    await stream.close()

    assert marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 0
    assert again["metadata"]["resourceVersion"] == marked["metadata"]["resourceVersion"]
    assert still["metadata"]["finalizers"] == ["gkm.io/cache"]
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED", "DELETED"]
    assert events[0]["object"]["metadata"]["deletionTimestamp"]
    assert "finalizers" not in events[1]["object"]["metadata"]
    assert released["metadata"]["resourceVersion"] == str(api.resource_version)
    with pytest.raises(ApiException) as caught:
        await custom.get_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")
    assert caught.value.status == 404


async def test_no_new_finalizer_while_deleting(custom: CustomObjectsApi) -> None:
    await create(custom, "c1", finalizers=["gkm.io/cache"])
    await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")

    with pytest.raises(ApiException) as caught:
        await merge_patch(custom, "c1", {"metadata": {"finalizers": ["gkm.io/cache", "other/x"]}})
    assert caught.value.status == 422
    assert (
        "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being "
        'deleted, found new finalizers []string{"other/x"}'
    ) in message(caught.value)


async def test_a_deleting_object_can_still_change_its_spec_and_keeps_its_timestamp(
    custom: CustomObjectsApi,
) -> None:
    await create(custom, "c1", finalizers=["gkm.io/cache"])
    marked = await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")
    patched = await merge_patch(
        custom, "c1", {"metadata": {"deletionTimestamp": None}, "spec": {"image": "r.example/y:1"}}
    )
    assert patched["metadata"]["deletionTimestamp"] == marked["metadata"]["deletionTimestamp"]
    assert patched["spec"]["image"] == "r.example/y:1"


async def test_delete_without_finalizers_is_immediate(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    await create(custom, "c1")
    await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")
    assert api.get(f"gkmcaches.{GROUP}", NS, "c1") is None


# --- validation ---------------------------------------------------------------------------


async def test_a_body_of_another_kind_or_version_is_a_bad_request(custom: CustomObjectsApi) -> None:
    wrong_kind = cache("c1", kind="Widget")
    wrong_version = {**cache("c2"), "apiVersion": f"{GROUP}/v1"}
    with pytest.raises(ApiException) as kind_error:
        await custom.create_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", wrong_kind)
    with pytest.raises(ApiException) as version_error:
        await custom.create_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", wrong_version)
    assert (kind_error.value.status, version_error.value.status) == (400, 400)
    assert "does not match the expected API version (gkm.io/v1alpha1)" in message(
        version_error.value
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "spec.image: Required value"),
        ({"image": "Bad Image"}, "spec.image in body should match"),
        ({"image": "r" * 526}, "spec.image: Too long: may not be more than 525 bytes"),
        ({"image": ""}, "spec.image in body should be at least 1 chars long"),
        ({"image": 7}, "spec.image in body must be of type string"),
        ({"image": IMAGE, "mode": "x"}, 'spec.mode: Unsupported value: "x"'),
    ],
)
async def test_the_schema_refuses_an_invalid_object(
    custom: CustomObjectsApi, spec: dict[str, Any], expected: str
) -> None:
    body = {**cache("c1"), "spec": spec}
    with pytest.raises(ApiException) as caught:
        await custom.create_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", body)
    assert caught.value.status == 422
    assert 'GKMCache.gkm.io "c1" is invalid: ' in message(caught.value)
    assert expected in message(caught.value)


async def test_the_schema_applies_to_status_writes_too(custom: CustomObjectsApi) -> None:
    await create(custom, "c1")
    with pytest.raises(ApiException) as caught:
        await merge_patch(
            custom, "c1", {"status": {"conditions": [{"type": "Ready"}]}}, status=True
        )
    assert caught.value.status == 422
    assert "status.conditions[0].status: Required value" in message(caught.value)


async def test_unknown_fields_are_pruned_and_defaults_filled(custom: CustomObjectsApi) -> None:
    body = cache("c1")
    body["spec"]["unknown"] = 1
    body["spec"]["podTemplate"] = {"anything": {"goes": True}}
    body["extra"] = "x"
    created = await custom.create_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", body)
    status = await merge_patch(
        custom, "c1", {"status": {"unknown": 1, "observedGeneration": 1}}, status=True
    )

    assert created["spec"] == {
        "image": IMAGE,
        "podTemplate": {"anything": {"goes": True}},
        "mode": "mount",
    }
    assert "extra" not in created
    assert status["status"] == {"observedGeneration": 1}


async def test_a_null_field_that_is_not_nullable_is_pruned_then_defaulted(
    custom: CustomObjectsApi,
) -> None:
    body = cache("c1")
    body["spec"]["mode"] = None
    body["spec"]["podTemplate"] = None
    created = await custom.create_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", body)
    assert created["spec"] == {"image": IMAGE, "mode": "mount"}


async def test_strategic_merge_patch_of_a_custom_resource_is_unsupported(
    custom: CustomObjectsApi,
) -> None:
    await create(custom, "c1")
    with pytest.raises(ApiException) as caught:
        await custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            "gkmcaches",
            "c1",
            {"metadata": {"labels": {"a": "b"}}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert caught.value.status == 415


async def test_the_client_default_content_type_for_a_dict_is_json_patch_and_refused(
    custom: CustomObjectsApi,
) -> None:
    # CustomObjectsApi sends application/json-patch+json for any body: pass _content_type.
    await create(custom, "c1")
    with pytest.raises(ApiException) as caught:
        await custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS, "gkmcaches", "c1", {"metadata": {"labels": {"a": "b"}}}
        )
    assert caught.value.status == 400


# --- test-side helpers ----------------------------------------------------------------------


async def test_add_object_keeps_status_and_delete_object_honours_finalizers(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    body = cache("c1", namespace=NS, finalizers=["gkm.io/cache"])
    body["status"] = {"resolvedDigest": "sha256:" + "c" * 64}
    api.add_object(body)
    marked = api.delete_object(f"gkmcaches.{GROUP}", NS, "c1")
    got = await custom.get_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", "c1")
    api.update_object(f"gkmcaches.{GROUP}", NS, "c1", lambda o: o["metadata"].pop("finalizers"))

    assert got["status"]["resolvedDigest"].startswith("sha256:c")
    assert marked["metadata"]["deletionTimestamp"]
    assert api.objects(f"gkmcaches.{GROUP}") == []


async def test_a_replace_without_resource_version_is_invalid_for_custom_resources(
    custom: CustomObjectsApi,
) -> None:
    # Custom resources allow no unconditional update (pods and nodes do).
    created = await create(custom, "c1")
    del created["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as caught:
        await custom.replace_namespaced_custom_object(
            GROUP, VERSION, NS, "gkmcaches", "c1", created
        )
    assert caught.value.status == 422
    assert "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update" in (
        message(caught.value)
    )


async def test_empty_labels_or_finalizers_are_not_stored_so_not_a_change(
    api: KubeApiDouble, custom: CustomObjectsApi
) -> None:
    # ObjectMeta's maps and lists are omitempty: an empty one is no field at all.
    created = await create(custom, "c1")
    patched = await merge_patch(custom, "c1", {"metadata": {"labels": {}, "finalizers": []}})

    assert patched["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert "labels" not in patched["metadata"]
