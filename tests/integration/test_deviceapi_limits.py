"""A hostile client on the device API socket cannot exhaust the server (issue 16, item 15).

Every test talks real gRPC over a real unix socket. Sizes are asserted as
bytes: the status code and message a write gets, the size of the List that
still comes back, the bytes the history window keeps (``GpuStore.history_bytes``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from gpufleet.deviceapi.config import MAX_RESPONSE_BYTES
from gpufleet.deviceapi.service import SERVICE_NAME
from gpufleet.deviceapi.v1alpha1 import gpu_pb2
from tests.integration.deviceapi_harness import Running, make_gpu, running_server, short_tmp

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
# What the unchanged server let through: just under the 4 MiB request cap.
HOSTILE_BYTES = 3_900_000
MARKER = b"hostile-unknown-field-payload"


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    with short_tmp() as directory:
        async with running_server(directory) as running:
            yield running


@pytest.fixture
async def channel(server: Running) -> AsyncIterator[grpc.aio.Channel]:
    # Raw gRPC, as a hostile client would speak it: no DeviceApiClient in between.
    options = [("grpc.max_receive_message_length", 256 * MIB)]
    async with grpc.aio.insecure_channel(f"unix:{server.socket}", options=options) as chan:
        yield chan


def _call(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    # No serializers: requests and responses travel as the raw bytes given/received.
    return channel.unary_unary(f"/{SERVICE_NAME}/{method}")


async def _send(channel: grpc.aio.Channel, method: str, request: bytes) -> bytes:
    response: bytes = await _call(channel, method)(request)
    return response


def _create(gpu: gpu_pb2.Gpu) -> bytes:
    return gpu_pb2.CreateGpuRequest(gpu=gpu).SerializeToString()


def _sized(name: str, index: int, size: int, per: int = 30_000) -> gpu_pb2.Gpu:
    """A GPU of about ``size`` bytes, in condition messages of at most ``per`` characters."""
    gpu = make_gpu(name, index)
    count = min(32, -(-size // per))
    for i in range(count):
        gpu.status.conditions.add(type=f"Check{i}", status="True", message="m" * (size // count))
        message = gpu.status.conditions[i].message
        gpu.status.conditions[i].message = message[:per]
    short = size - gpu.ByteSize()
    if short < 0:
        first = gpu.status.conditions[0]
        first.message = first.message[:short]
    return gpu


async def _status_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call succeeded")


async def test_a_create_of_a_huge_object_is_invalid_argument_naming_the_limit(
    channel: grpc.aio.Channel,
) -> None:
    gpu = make_gpu("gpu-0")
    gpu.metadata.annotations.update({f"a{i}": "x" * 60_000 for i in range(4)})  # 240 KB, legal
    for i in range(32):
        gpu.status.conditions.add(type=f"Check{i}", status="True", message="m" * 30_000)
    code, details = await _status_of(_call(channel, "CreateGpu")(_create(gpu)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "MAX_OBJECT_BYTES" in details
    assert str(256 * 1024) in details


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("spec.product", 256),
        ("spec.node", 253),
        ("status.conditions[0].message", 32768),
        ("status.conditions[0].reason", 1024),
        ("status.recommended_action", 64),
    ],
)
async def test_a_create_with_an_overlong_string_field_names_the_field_and_its_limit(
    channel: grpc.aio.Channel, field: str, limit: int
) -> None:
    gpu = make_gpu("gpu-0")
    cond = gpu.status.conditions.add(type="Healthy", status="True")
    long = "x" * (limit + 1)
    match field:
        case "spec.product":
            gpu.spec.product = long
        case "spec.node":
            gpu.spec.node = long
        case "status.conditions[0].message":
            cond.message = long
        case "status.conditions[0].reason":
            cond.reason = long
        case _:
            gpu.status.recommended_action = long
    code, details = await _status_of(_call(channel, "CreateGpu")(_create(gpu)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details
    assert str(limit) in details


async def test_an_update_and_a_status_update_of_huge_objects_are_refused_and_change_nothing(
    server: Running, channel: grpc.aio.Channel
) -> None:
    created = gpu_pb2.Gpu.FromString(await _send(channel, "CreateGpu", _create(make_gpu("gpu-0"))))
    rv = server.store.resource_version
    huge = gpu_pb2.Gpu()
    huge.CopyFrom(created)
    huge.spec.serial = "s" * HOSTILE_BYTES
    update = gpu_pb2.UpdateGpuRequest(gpu=huge).SerializeToString()
    code, details = await _status_of(_call(channel, "UpdateGpu")(update))
    assert (code, "spec.serial" in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)
    status = _sized("gpu-0", 0, 960_000)  # every field within its own cap
    status.metadata.resource_version = created.metadata.resource_version
    request = gpu_pb2.UpdateGpuStatusRequest(gpu=status).SerializeToString()
    code, details = await _status_of(_call(channel, "UpdateGpuStatus")(request))
    assert (code, "MAX_OBJECT_BYTES" in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)
    assert server.store.resource_version == rv


async def test_list_still_works_after_hostile_creates_of_near_request_cap_objects(
    channel: grpc.aio.Channel,
) -> None:
    # The unchanged server took 18 of these, and every List failed from then on.
    refused: list[grpc.StatusCode] = []
    for i in range(20):
        hostile = _sized(f"gpu-{i}", i, HOSTILE_BYTES, per=HOSTILE_BYTES // 32)
        try:
            await _send(channel, "CreateGpu", _create(hostile))
        except grpc.aio.AioRpcError as error:
            refused.append(error.code())
    assert refused == [grpc.StatusCode.INVALID_ARGUMENT] * 20
    listing = await _send(channel, "ListGpus", gpu_pb2.ListGpusRequest().SerializeToString())
    assert len(listing) <= MAX_RESPONSE_BYTES


async def test_list_fits_the_response_cap_when_the_store_is_full_of_maximum_sized_objects(
    server: Running, channel: grpc.aio.Channel
) -> None:
    limit = server.settings.max_object_bytes
    refused: tuple[grpc.StatusCode, str] | None = None
    created = 0
    # 300 of the largest objects allowed is more than a List may send (64 MiB).
    for i in range(300):
        gpu = _sized(f"gpu-{i}", i, limit - 2_000)
        assert limit - 4_000 < gpu.ByteSize() < limit
        try:
            await _send(channel, "CreateGpu", _create(gpu))
            created += 1
        except grpc.aio.AioRpcError as error:
            refused = (error.code(), error.details() or "")
            break
    assert refused is not None
    assert refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MAX_STORE_BYTES" in refused[1]
    listing = gpu_pb2.GpuList.FromString(
        await _send(channel, "ListGpus", gpu_pb2.ListGpusRequest().SerializeToString())
    )
    assert len(listing.items) == created
    assert listing.ByteSize() <= MAX_RESPONSE_BYTES


def _unknown(number: int) -> bytes:
    """An unknown length-delimited field ``number`` holding MARKER."""
    tag = (number << 3) | 2
    out = bytearray()
    while tag > 0x7F:
        out.append((tag & 0x7F) | 0x80)
        tag >>= 7
    out.append(tag)
    return bytes(out) + bytes([len(MARKER)]) + MARKER


def _with_unknowns(gpu: gpu_pb2.Gpu) -> gpu_pb2.Gpu:
    """``gpu`` carrying unknown fields in the object, its spec, status and first condition."""
    out = gpu_pb2.Gpu()
    out.CopyFrom(gpu)
    if not out.status.conditions:
        out.status.conditions.add(type="Healthy", status="True")
    out.spec.MergeFromString(_unknown(99))
    out.status.conditions[0].MergeFromString(_unknown(98))
    out.status.MergeFromString(_unknown(97))
    out.MergeFromString(_unknown(96))
    assert MARKER in out.SerializeToString()
    return out


async def test_unknown_fields_are_neither_stored_nor_served_again(
    server: Running, channel: grpc.aio.Channel
) -> None:
    watch = channel.unary_stream(f"/{SERVICE_NAME}/WatchGpus")
    stream = watch(gpu_pb2.WatchGpusRequest(resource_version="").SerializeToString())
    created = await _send(channel, "CreateGpu", _create(_with_unknowns(make_gpu("gpu-0"))))
    current = gpu_pb2.Gpu.FromString(created)
    hostile = _with_unknowns(current)
    hostile.spec.serial = "changed"
    updated = await _send(
        channel, "UpdateGpu", gpu_pb2.UpdateGpuRequest(gpu=hostile).SerializeToString()
    )
    hostile = _with_unknowns(gpu_pb2.Gpu.FromString(updated))
    hostile.status.conditions[0].status = "False"
    status = await _send(
        channel, "UpdateGpuStatus", gpu_pb2.UpdateGpuStatusRequest(gpu=hostile).SerializeToString()
    )
    got = await _send(channel, "GetGpu", gpu_pb2.GetGpuRequest(name="gpu-0").SerializeToString())
    listing = await _send(channel, "ListGpus", gpu_pb2.ListGpusRequest().SerializeToString())
    events = [await stream.read() for _ in range(3)]
    stream.cancel()
    for served in (created, updated, status, got, listing, *events):
        assert isinstance(served, bytes)
        assert MARKER not in served
    stored = server.store.get("gpu-0").SerializeToString()
    assert MARKER not in stored


async def test_the_history_window_is_bounded_by_bytes() -> None:
    with short_tmp() as directory:
        async with running_server(directory, watch_history_bytes=2 * MIB) as running:
            async with running.client() as client:
                gpu = await client.create(make_gpu("gpu-0"))
                first_rv = gpu.metadata.resource_version
                for i in range(40):
                    status = _sized("gpu-0", 0, 200_000)
                    status.status.conditions[0].reason = f"Round{i}"
                    status.metadata.resource_version = gpu.metadata.resource_version
                    gpu = await client.update_status(status)
            kept = running.store.history_bytes
            assert 0 < kept <= 2 * MIB
            # 40 updates of ~200 KB are ~8 MB: most left the window, so resuming expires.
            with pytest.raises(Exception, match="too old resourceVersion"):
                running.store.watch(resource_version=first_rv)
