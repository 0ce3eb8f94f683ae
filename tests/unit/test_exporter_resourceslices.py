"""DRA devices to GPU UUIDs: parsing ResourceSlices, the index, and picking the served version."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from gpufleet.core.retry import Backoff
from gpufleet.exporter.podmap.resourceslices import (
    DraDevice,
    ResourceSliceIndex,
    ResourceSliceWatch,
    slice_devices,
)
from tests.polling import eventually

DRIVER = "gpu.nvidia.com"
NODE = "gpu-node-1"
GPU0 = "GPU-5b9a2e6c-0d47-4c5e-9f0a-3e1c2b7d8a91"
GPU1 = "GPU-0f1e2d3c-4b5a-4968-8776-655443322110"
MIG = "MIG-8c7d6e5f-4a3b-4c2d-9e1f-0a9b8c7d6e5f"


def v1_device(name: str, uuid: Any = GPU0, key: str = "uuid", **more: Any) -> dict[str, Any]:
    attributes = {"type": {"string": "gpu"}, "index": {"int": 0}, key: uuid, **more}
    return {"name": name, "attributes": attributes, "capacity": {"memory": {"value": "80Gi"}}}


def v1beta1_device(name: str, uuid: Any = GPU0) -> dict[str, Any]:
    return {"name": name, "basic": {"attributes": {"type": {"string": "gpu"}, "uuid": uuid}}}


def resource_slice(
    devices: list[Any],
    *,
    name: str = "node-1-gpus",
    api_version: str = "resource.k8s.io/v1",
    driver: str = DRIVER,
    pool: str = NODE,
    generation: int = 1,
) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": "ResourceSlice",
        "metadata": {"name": name, "resourceVersion": "7"},
        "spec": {
            "driver": driver,
            "nodeName": NODE,
            "pool": {"name": pool, "generation": generation, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def key(device: str, pool: str = NODE, driver: str = DRIVER) -> DraDevice:
    return DraDevice(driver, pool, device)


# --- parsing one slice -----------------------------------------------------------


def test_v1_device_attributes_give_the_uuid_of_each_device() -> None:
    obj = resource_slice(
        [v1_device("gpu-0", {"string": GPU0}), v1_device("gpu-0-mig-9-4-2", {"string": MIG})]
    )
    assert slice_devices(obj) == {key("gpu-0"): GPU0, key("gpu-0-mig-9-4-2"): MIG}


def test_v1beta1_device_attributes_under_basic_give_the_uuid() -> None:
    obj = resource_slice(
        [v1beta1_device("gpu-1", {"string": GPU1})], api_version="resource.k8s.io/v1beta1"
    )
    assert slice_devices(obj) == {key("gpu-1"): GPU1}


def test_a_uuid_qualified_with_the_drivers_domain_counts() -> None:
    obj = resource_slice([v1_device("gpu-0", {"string": GPU0}, key=f"{DRIVER}/uuid")])
    assert slice_devices(obj) == {key("gpu-0"): GPU0}


def test_a_uuid_qualified_with_another_domain_does_not_count() -> None:
    obj = resource_slice([v1_device("gpu-0", {"string": GPU0}, key="example.com/uuid")])
    assert slice_devices(obj) == {}


@pytest.mark.parametrize(
    "uuid",
    [
        {"int": 7},
        {"bool": True},
        {"version": "1.0.0"},
        {"string": ""},
        {"string": 7},
        "GPU-x",
        None,
    ],
    ids=["int", "bool", "version", "empty", "number-as-string", "not-an-object", "null"],
)
def test_a_uuid_that_is_not_a_non_empty_string_is_ignored(uuid: Any) -> None:
    obj = resource_slice([v1_device("gpu-0", uuid), v1_device("gpu-1", {"string": GPU1})])
    assert slice_devices(obj) == {key("gpu-1"): GPU1}


def test_a_device_without_a_uuid_attribute_is_ignored() -> None:
    device = {"name": "nic-0", "attributes": {"type": {"string": "nic"}}}
    assert slice_devices(resource_slice([device])) == {}


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        "ResourceSlice",
        {},
        {"spec": "devices"},
        {"spec": {"driver": DRIVER, "pool": {"name": NODE}, "devices": "gpu-0"}},
        {
            "spec": {
                "driver": DRIVER,
                "pool": NODE,
                "devices": [v1_device("gpu-0", {"string": GPU0})],
            }
        },
        {"spec": {"driver": 3, "pool": {"name": NODE}, "devices": []}},
        {"spec": {"pool": {"name": NODE}, "devices": [v1_device("gpu-0", {"string": GPU0})]}},
        resource_slice([None, 3, "gpu-0", [], {"attributes": {"uuid": {"string": GPU0}}}]),
        resource_slice([{"name": 5, "attributes": {"uuid": {"string": GPU0}}}]),
        resource_slice([{"name": "gpu-0", "attributes": [["uuid", GPU0]]}]),
        resource_slice([{"name": "gpu-0", "basic": "attributes"}]),
        resource_slice([{"name": "gpu-0", "basic": {"attributes": None}}]),
    ],
    ids=[
        "null",
        "list",
        "string",
        "empty",
        "spec-not-object",
        "devices-not-list",
        "pool-not-object",
        "driver-not-string",
        "no-driver",
        "devices-of-other-types",
        "name-not-string",
        "attributes-not-object",
        "basic-not-object",
        "basic-attributes-null",
    ],
)
def test_garbage_gives_no_devices_and_never_raises(obj: Any) -> None:
    assert slice_devices(obj) == {}


async def test_garbage_through_every_handler_never_raises_and_keeps_good_entries() -> None:
    index = ResourceSliceIndex()
    await index.on_add(resource_slice([v1_device("gpu-0", {"string": GPU0})]))
    garbage: list[Any] = [
        None,
        [],
        {"metadata": "x"},
        {"metadata": {"name": 5}},
        {"metadata": {"name": "other"}, "spec": {"pool": {"generation": "new"}}},
        {"metadata": {"name": "odd"}, "spec": {"pool": {"generation": True}, "devices": None}},
    ]
    for obj in garbage:
        await index.on_add(obj)
        await index.on_update(obj, obj)
        await index.on_delete(obj)
    assert index.items() == {key("gpu-0"): GPU0}


# --- the index ---------------------------------------------------------------------


def test_the_index_resolves_devices_across_slices_and_drivers() -> None:
    index = ResourceSliceIndex()
    index.upsert(resource_slice([v1_device("gpu-0", {"string": GPU0})], name="a"))
    index.upsert(
        resource_slice([v1_device("gpu-0", {"string": GPU1})], name="b", driver="other.example")
    )
    assert index.uuid(key("gpu-0")) == GPU0
    assert index.uuid(key("gpu-0", driver="other.example")) == GPU1
    assert index.uuid(key("gpu-0", pool="gpu-node-2")) is None
    assert len(index) == 2


def test_deleting_a_slice_removes_its_devices() -> None:
    index = ResourceSliceIndex()
    obj = resource_slice([v1_device("gpu-0", {"string": GPU0})])
    index.upsert(obj)
    index.remove(obj)
    assert index.uuid(key("gpu-0")) is None


def test_an_update_that_renames_a_device_drops_the_old_name() -> None:
    index = ResourceSliceIndex()
    index.upsert(resource_slice([v1_device("gpu-0", {"string": GPU0})]))
    index.upsert(resource_slice([v1_device("gpu-7", {"string": GPU0})]))
    assert index.items() == {key("gpu-7"): GPU0}


def test_an_update_that_removes_a_device_drops_it() -> None:
    index = ResourceSliceIndex()
    index.upsert(
        resource_slice([v1_device("gpu-0", {"string": GPU0}), v1_device("gpu-1", {"string": GPU1})])
    )
    index.upsert(resource_slice([v1_device("gpu-1", {"string": GPU1})]))
    assert index.items() == {key("gpu-1"): GPU1}


def test_the_slice_of_the_newer_pool_generation_wins_a_device_named_twice() -> None:
    index = ResourceSliceIndex()
    index.upsert(resource_slice([v1_device("gpu-0", {"string": GPU1})], name="z", generation=2))
    index.upsert(resource_slice([v1_device("gpu-0", {"string": GPU0})], name="a", generation=1))
    assert index.uuid(key("gpu-0")) == GPU1


def test_the_generation_moves_on_a_change_and_only_then() -> None:
    index = ResourceSliceIndex()
    obj = resource_slice([v1_device("gpu-0", {"string": GPU0})])
    index.upsert(obj)
    after_add = index.generation
    index.upsert(json.loads(json.dumps(obj)))  # a resync: the same content again
    assert index.generation == after_add
    index.remove(obj)
    assert index.generation == after_add + 1


# --- picking the served version ------------------------------------------------------


class FakeResponse:
    """What `call_json` reads from a generated method called with ``_preload_content=False``."""

    status = 200
    reason = "OK"

    async def read(self) -> bytes:
        return b'{"kind": "ResourceSliceList", "metadata": {"resourceVersion": "1"}, "items": []}'

    def release(self) -> None:
        pass


class FakeLister:
    """A ``list_resource_slice`` that fails with the given statuses, then answers."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> FakeResponse:
        self.calls.append(kwargs)
        if self.statuses:
            raise ApiException(status=self.statuses.pop(0), reason="fake")
        return FakeResponse()


class NoSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def watcher(listers: dict[str, FakeLister], sleep: NoSleep) -> ResourceSliceWatch:
    return ResourceSliceWatch(
        listers, ResourceSliceIndex(), node_name=NODE, backoff=Backoff(jitter=0.0), sleep=sleep
    )


async def test_the_first_version_that_lists_is_chosen_after_404s() -> None:
    listers = {"v1": FakeLister(404), "v1beta2": FakeLister(404), "v1beta1": FakeLister()}
    found = await watcher(listers, NoSleep())._choose_version()
    assert found == "v1beta1"
    assert listers["v1beta1"].calls[0]["field_selector"] == f"spec.nodeName={NODE}"


async def test_when_no_version_is_served_dra_is_off_until_a_later_check_finds_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two checks find nothing (a cluster without the DRA API); the third finds
    # v1, as when an administrator enables resource.k8s.io while we run.
    listers = {v: FakeLister(404, 404) for v in ("v1", "v1beta2", "v1beta1")}
    seen: list[tuple[float, str | None, bool]] = []
    watch: ResourceSliceWatch

    async def sleep(delay: float) -> None:
        seen.append((delay, watch.version, watch.decided.is_set()))

    watch = ResourceSliceWatch(
        listers, ResourceSliceIndex(), node_name=NODE, rediscover=120.0, sleep=sleep
    )
    with caplog.at_level(logging.INFO, logger="gpufleet.exporter.podmap.resourceslices"):
        task = asyncio.create_task(watch.run())
        try:
            await eventually(lambda: watch.version == "v1")
        finally:
            await watch.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # Between the checks: decided (DRA off), nothing watched, one line said.
    assert seen == [(120.0, None, True), (120.0, None, True)]
    # Three probes of v1 (the informer's own list and watch come after), two of the others.
    probes = [[c for c in lister.calls if c.get("limit") == 1] for lister in listers.values()]
    assert [len(calls) for calls in probes] == [3, 2, 2]
    assert len([r for r in caplog.records if "not attributed" in r.getMessage()]) == 1
    assert any("watching ResourceSlices" in r.getMessage() for r in caplog.records)


def test_rediscover_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rediscover"):
        ResourceSliceWatch({}, ResourceSliceIndex(), node_name=NODE, rediscover=0)


async def test_a_forbidden_list_is_retried_with_backoff_not_taken_for_not_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sleep = NoSleep()
    listers = {"v1": FakeLister(403, 403, 403), "v1beta1": FakeLister()}
    with caplog.at_level(logging.WARNING, logger="gpufleet.exporter.podmap.resourceslices"):
        found = await watcher(listers, sleep)._choose_version()
    assert found == "v1"
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert len(caplog.records) == 1  # one warning for the one distinct failure
