"""The device API's CRUD matrix over real gRPC on a unix socket, through DeviceApiClient."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.errors import (
    AlreadyExistsError,
    CapacityError,
    ConflictError,
    DeviceApiError,
    InvalidError,
    NotFoundError,
)
from gpufleet.deviceapi.store import GpuStore
from gpufleet.deviceapi.v1alpha1 import gpu_pb2
from tests.integration.deviceapi_harness import (
    Running,
    make_gpu,
    running_server,
    short_tmp,
    with_condition,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    with short_tmp() as directory:
        async with running_server(directory) as running:
            yield running


@pytest.fixture
async def client(server: Running) -> AsyncIterator[DeviceApiClient]:
    async with server.client() as api:
        yield api


async def test_create_sets_server_fields_and_get_returns_them(client: DeviceApiClient) -> None:
    created = await client.create(make_gpu("gpu-0", 0, node="a"))
    fetched = await client.get("gpu-0")
    assert created.metadata.uid
    assert created.metadata.generation == 1
    assert int(created.metadata.resource_version) > 0
    assert fetched == created


async def test_create_of_an_existing_name_is_already_exists(client: DeviceApiClient) -> None:
    await client.create(make_gpu("gpu-0"))
    with pytest.raises(AlreadyExistsError):
        await client.create(make_gpu("gpu-0"))


async def test_get_update_and_delete_of_a_missing_gpu_are_not_found(
    client: DeviceApiClient,
) -> None:
    with pytest.raises(NotFoundError):
        await client.get("gpu-9")
    ghost = make_gpu("gpu-9")
    ghost.metadata.resource_version = "1"
    with pytest.raises(NotFoundError):
        await client.update(ghost)
    with pytest.raises(NotFoundError):
        await client.delete("gpu-9")


async def test_update_with_a_stale_resource_version_is_a_conflict_naming_the_current(
    client: DeviceApiClient,
) -> None:
    first = await client.create(make_gpu("gpu-0"))
    second = await client.update_status(with_condition(first, "True", "Ok"))
    stale = with_condition(first, "False", "XidCritical")
    with pytest.raises(ConflictError, match=second.metadata.resource_version):
        await client.update_status(stale)
    assert (await client.get("gpu-0")) == second


async def test_update_applies_labels_and_spec_but_ignores_status(client: DeviceApiClient) -> None:
    created = await client.create(make_gpu("gpu-0"))
    change = with_condition(created, "False", "Ignored")
    change.metadata.labels["zone"] = "z1"
    change.spec.product = "NVIDIA H200"
    updated = await client.update(change)
    assert updated.metadata.labels["zone"] == "z1"
    assert updated.metadata.generation == 2
    assert len(updated.status.conditions) == 0


async def test_update_status_ignores_spec_and_metadata(client: DeviceApiClient) -> None:
    created = await client.create(make_gpu("gpu-0"))
    change = with_condition(created, "True", "Ok")
    change.spec.product = "ignored"
    change.metadata.labels["ignored"] = "yes"
    updated = await client.update_status(change)
    assert updated.spec == created.spec
    assert dict(updated.metadata.labels) == dict(created.metadata.labels)
    assert updated.status.conditions[0].reason == "Ok"


async def test_delete_checks_resource_version_and_uid_preconditions(
    client: DeviceApiClient,
) -> None:
    created = await client.create(make_gpu("gpu-0"))
    with pytest.raises(ConflictError):
        await client.delete("gpu-0", resource_version="1")
    with pytest.raises(ConflictError):
        await client.delete("gpu-0", uid="not-the-uid")
    deleted = await client.delete(
        "gpu-0", resource_version=created.metadata.resource_version, uid=created.metadata.uid
    )
    assert int(deleted.metadata.resource_version) > int(created.metadata.resource_version)
    with pytest.raises(NotFoundError):
        await client.get("gpu-0")


@pytest.mark.parametrize("name", ["GPU-ABC", "gpu_0", "-gpu", "a" * 64, ""])
async def test_a_bad_name_is_invalid(client: DeviceApiClient, name: str) -> None:
    with pytest.raises(InvalidError):
        await client.create(make_gpu(name or "x", 0) if name else gpu_pb2.Gpu())
    if name:
        with pytest.raises(InvalidError):
            await client.get(name)


async def test_a_non_numeric_resource_version_is_invalid(client: DeviceApiClient) -> None:
    created = await client.create(make_gpu("gpu-0"))
    created.metadata.resource_version = "12abc"
    with pytest.raises(InvalidError):
        await client.update_status(created)
    with pytest.raises(InvalidError):
        await client.delete("gpu-0", resource_version="latest")
    with pytest.raises(InvalidError):
        async for _ in client.watch(resource_version="-1"):
            pass


async def test_an_empty_gpu_is_invalid(client: DeviceApiClient) -> None:
    with pytest.raises(InvalidError):
        await client.update_status(gpu_pb2.Gpu())


async def test_an_invalid_label_selector_is_invalid(client: DeviceApiClient) -> None:
    with pytest.raises(InvalidError):
        await client.list("a in (b")


async def test_a_message_over_4_mib_is_refused_before_the_store(
    server: Running, client: DeviceApiClient
) -> None:
    gpu = make_gpu("gpu-0")
    gpu.metadata.annotations["example.com/blob"] = "x" * (5 * 1024 * 1024)
    with pytest.raises((CapacityError, InvalidError)) as caught:
        await client.create(gpu)
    assert caught.value.code in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert server.store.gpu_count == 0


async def test_list_filters_by_label_selector_and_returns_the_store_version(
    server: Running, client: DeviceApiClient
) -> None:
    await client.create(make_gpu("gpu-0", 0, zone="a"))
    await client.create(make_gpu("gpu-1", 1, zone="b"))
    listed = await client.list("zone=b")
    assert [g.metadata.name for g in listed.items] == ["gpu-1"]
    assert listed.resource_version == str(server.store.resource_version)


class _BrokenStore(GpuStore):
    """A store whose reads fail with a detail that must never reach a client."""

    def get(self, name: str) -> gpu_pb2.Gpu:
        raise RuntimeError("sqlite disk I/O error at /secret/path/state.db")


async def test_an_internal_error_reaches_the_client_as_a_generic_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    store = _BrokenStore()
    with short_tmp() as directory:
        async with running_server(directory, store=store) as running, running.client() as api:
            with pytest.raises(DeviceApiError) as caught:
                await api.get("gpu-0")
    store.close()
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert str(caught.value) == "internal error"
    assert "/secret/path" in caplog.text


async def test_an_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    from gpufleet.deviceapi.errors import UnavailableError

    async with DeviceApiClient(tmp_path / "nobody.sock", timeout=2.0) as api:
        with pytest.raises(UnavailableError):
            await api.get("gpu-0")
