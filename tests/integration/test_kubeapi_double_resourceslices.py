"""The contract of ``KubeApiDouble`` for ``resource.k8s.io`` ResourceSlices, with the real client.

Each test states one behaviour of the real API server (1.32 to 1.34) that the
GPU exporter's DRA attribution relies on: which versions serve ResourceSlices,
where each version puts a device's attributes, and list/watch by node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import watch
from kubernetes_asyncio.client import (
    ApiClient,
    ResourceV1Api,
    ResourceV1beta1Api,
    ResourceV1beta2Api,
)
from kubernetes_asyncio.client.exceptions import ApiException

from gpufleet.gpu import sim
from gpufleet.kube.client import call_json
from tests.doubles.kubeapi import KubeApiDouble, slice_device
from tests.integration.kubeapi_double_support import collect

pytestmark = pytest.mark.integration

NODE = "gpu-node-1"
UUID = "GPU-5b9a2e6c-0d47-4c5e-9f0a-3e1c2b7d8a91"


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble(bookmark_interval=0.2) as double:
        yield double


@pytest.fixture
async def client(api: KubeApiDouble) -> AsyncIterator[ApiClient]:
    async with ApiClient(api.client_configuration()) as api_client:
        yield api_client


def one_gpu(name: str = "gpu-0", uuid: str = UUID) -> list[dict[str, Any]]:
    return [slice_device(name, {"uuid": uuid, "index": 0}, {"memory": "80Gi"})]


async def test_v1_list_by_node_name_returns_only_that_nodes_slices(
    api: KubeApiDouble, client: ApiClient
) -> None:
    api.add_resource_slice("n1-gpus", node_name=NODE, devices=one_gpu())
    api.add_resource_slice("n2-gpus", node_name="gpu-node-2", devices=one_gpu())

    slices = await ResourceV1Api(client).list_resource_slice(field_selector=f"spec.nodeName={NODE}")

    assert [s.metadata.name for s in slices.items] == ["n1-gpus"]
    assert slices.items[0].spec.devices[0].attributes["uuid"].string == UUID


async def test_v1beta1_shows_device_attributes_under_basic(
    api: KubeApiDouble, client: ApiClient
) -> None:
    api.add_resource_slice("n1-gpus", node_name=NODE, devices=one_gpu())

    slices = await ResourceV1beta1Api(client).list_resource_slice()

    (device,) = slices.items[0].spec.devices
    assert (device.name, device.basic.attributes["uuid"].string) == ("gpu-0", UUID)
    assert device.basic.capacity["memory"].value == "80Gi"


async def test_v1beta2_shows_device_attributes_on_the_device(
    api: KubeApiDouble, client: ApiClient
) -> None:
    api.add_resource_slice("n1-gpus", node_name=NODE, devices=one_gpu())

    body = await call_json(ResourceV1beta2Api(client).list_resource_slice)

    assert body["apiVersion"] == "resource.k8s.io/v1beta2"
    (item,) = body["items"]
    assert item["apiVersion"] == "resource.k8s.io/v1beta2"
    assert item["spec"]["devices"][0]["attributes"]["uuid"] == {"string": UUID}
    assert "basic" not in item["spec"]["devices"][0]


async def test_a_version_that_is_not_served_answers_404() -> None:
    async with (
        KubeApiDouble(resource_slice_versions=("v1beta1",)) as old,
        ApiClient(old.client_configuration()) as old_client,
    ):
        with pytest.raises(ApiException) as caught:
            await ResourceV1Api(old_client).list_resource_slice()
        served = await ResourceV1beta1Api(old_client).list_resource_slice()

    assert caught.value.status == 404
    assert served.items == []


def test_an_unknown_resource_slice_version_is_refused() -> None:
    with pytest.raises(ValueError, match="v1alpha3"):
        KubeApiDouble(resource_slice_versions=("v1alpha3",))


async def test_discovery_lists_resourceslices_at_the_served_versions_only() -> None:
    found = {}
    async with (
        KubeApiDouble(resource_slice_versions=("v1beta2", "v1beta1")) as api,
        aiohttp.ClientSession() as session,
    ):
        for version in ("v1", "v1beta2", "v1beta1"):
            url = f"{api.url}/apis/resource.k8s.io/{version}"
            async with session.get(url) as response:
                body = await response.json() if response.status == 200 else {}
            found[version] = {r["name"] for r in body.get("resources", [])}

    assert found == {"v1": set(), "v1beta2": {"resourceslices"}, "v1beta1": {"resourceslices"}}


async def test_field_selector_on_driver_and_a_refused_field(
    api: KubeApiDouble, client: ApiClient
) -> None:
    api.add_resource_slice("gpus", node_name=NODE, devices=one_gpu())
    api.add_resource_slice("nics", node_name=NODE, driver="dra.net", devices=[])
    resource = ResourceV1Api(client)

    nvidia = await resource.list_resource_slice(field_selector="spec.driver=gpu.nvidia.com")
    with pytest.raises(ApiException) as caught:
        await resource.list_resource_slice(field_selector="spec.pool.name=x")

    assert [s.metadata.name for s in nvidia.items] == ["gpus"]
    assert caught.value.status == 400


async def test_v1beta1_watch_from_the_list_version_sees_changes_in_its_own_shape(
    api: KubeApiDouble, client: ApiClient
) -> None:
    api.add_resource_slice("n1-gpus", node_name=NODE, devices=one_gpu())
    resource = ResourceV1beta1Api(client)
    listed = await resource.list_resource_slice(field_selector=f"spec.nodeName={NODE}")
    stream = watch.Watch()

    def rename(obj: dict[str, Any]) -> None:
        obj["spec"]["devices"] = one_gpu("gpu-7", "GPU-00000000-0000-4000-8000-000000000007")

    async with stream:
        events_task = asyncio.ensure_future(
            collect(
                stream.stream(
                    resource.list_resource_slice,
                    field_selector=f"spec.nodeName={NODE}",
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=5,
                ),
                2,
            )
        )
        await asyncio.sleep(0)
        api.update_resource_slice("n1-gpus", rename)
        api.add_resource_slice("n2-gpus", node_name="gpu-node-2", devices=one_gpu())
        api.delete_resource_slice("n1-gpus")
        events = await events_task

    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    (device,) = events[0]["object"].spec.devices
    assert (device.name, device.basic.attributes["uuid"].string) == (
        "gpu-7",
        "GPU-00000000-0000-4000-8000-000000000007",
    )


async def test_a_slice_created_through_v1beta1_is_stored_once_and_shown_flat_by_v1(
    api: KubeApiDouble, client: ApiClient
) -> None:
    body = {
        "apiVersion": "resource.k8s.io/v1beta1",
        "kind": "ResourceSlice",
        "metadata": {"name": "posted"},
        "spec": {
            "driver": "gpu.nvidia.com",
            "nodeName": NODE,
            "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0", "basic": {"attributes": {"uuid": {"string": UUID}}}}],
        },
    }

    await ResourceV1beta1Api(client).create_resource_slice(body)
    stored = api.get("resourceslices", None, "posted")
    shown = await ResourceV1Api(client).read_resource_slice("posted")

    assert stored is not None
    assert stored["spec"]["devices"] == [
        {"name": "gpu-0", "attributes": {"uuid": {"string": UUID}}}
    ]
    assert shown.spec.devices[0].attributes["uuid"].string == UUID


async def test_a_merge_patch_through_v1beta1_is_applied_to_its_own_shape(
    api: KubeApiDouble, client: ApiClient
) -> None:
    api.add_resource_slice("n1-gpus", node_name=NODE, devices=one_gpu())
    other = "GPU-00000000-0000-4000-8000-0000000000aa"
    patch = {
        "spec": {
            "devices": [{"name": "gpu-0", "basic": {"attributes": {"uuid": {"string": other}}}}]
        }
    }

    await ResourceV1beta1Api(client).patch_resource_slice(
        "n1-gpus", patch, _content_type="application/merge-patch+json"
    )

    stored = api.get("resourceslices", None, "n1-gpus")
    assert stored is not None
    assert stored["spec"]["devices"] == [
        {"name": "gpu-0", "attributes": {"uuid": {"string": other}}}
    ]


async def test_gpu_resource_slice_publishes_each_simulated_gpu_by_uuid(
    api: KubeApiDouble, client: ApiClient
) -> None:
    fleet = sim.preset("dgx-h100")
    api.add_gpu_resource_slice(NODE, fleet)

    slices = await ResourceV1Api(client).list_resource_slice(field_selector=f"spec.nodeName={NODE}")

    (published,) = slices.items
    assert (published.spec.driver, published.spec.pool.name) == ("gpu.nvidia.com", NODE)
    uuids = {d.name: d.attributes["uuid"].string for d in published.spec.devices}
    assert uuids == {f"gpu-{i}": gpu.uuid for i, gpu in enumerate(fleet.gpus)}


async def test_gpu_resource_slice_publishes_mig_devices_of_a_gpu_in_mig_mode(
    api: KubeApiDouble, client: ApiClient
) -> None:
    fleet = sim.preset("mig-a100")
    api.add_gpu_resource_slice(NODE, fleet)

    slices = await ResourceV1Api(client).list_resource_slice()

    devices = slices.items[0].spec.devices
    assert {d.attributes["uuid"].string for d in devices} == {
        mig.uuid for mig in fleet.gpus[0].mig_instances
    }
    assert {d.attributes["parentUUID"].string for d in devices} == {fleet.gpus[0].uuid}
