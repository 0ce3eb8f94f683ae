"""The CSI server itself: Identity, Node info, the socket file, and clients that misbehave."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gpufleet import __version__
from gpufleet.kcache.cluster import PreparedVolume, VolumeRequest
from gpufleet.kcache.csi import CsiEndpointError, CsiServer, NodeServicer
from gpufleet.kcache.csi.v1 import csi_pb2
from gpufleet.kcache.publications import PUBLICATIONS, PublicationLog
from tests.kcache_csi_support import (
    FakeVolumeSource,
    Place,
    Plugin,
    kubelet_place,
    node_client,
    publish_request,
    running_plugin,
    volume_context,
    volume_id,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root"),
]

HANG_GUARD = 30.0


@pytest.fixture
def place() -> Iterator[Place]:
    with kubelet_place(entry=True) as where:
        yield where


@pytest.fixture
async def plugin(place: Place) -> AsyncIterator[Plugin]:
    async with running_plugin(place, FakeVolumeSource(volume=place.volume())) as running:
        yield running


def _servicer(place: Place) -> NodeServicer:
    return NodeServicer(
        FakeVolumeSource(volume=place.volume()),
        kubelet_dir=place.kubelet,
        node_id="node-1",
        publications=PublicationLog(place.store / PUBLICATIONS),
    )


# --- Identity and Node info ------------------------------------------------------------------


async def test_plugin_info_is_csi_gkm_io_at_the_package_version(plugin: Plugin) -> None:
    info = await plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert (info.name, info.vendor_version) == ("csi.gkm.io", __version__)


async def test_plugin_capabilities_offer_no_controller_service(plugin: Plugin) -> None:
    answer = await plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = [c.service.type for c in answer.capabilities if c.HasField("service")]
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE not in services
    assert list(answer.capabilities) == []


async def test_probe_reports_the_node_process_readiness(plugin: Plugin) -> None:
    ready = await plugin.identity.Probe(csi_pb2.ProbeRequest())
    plugin.ready[0] = False
    starting = await plugin.identity.Probe(csi_pb2.ProbeRequest())
    assert ready.HasField("ready")
    assert ready.ready.value
    assert starting.HasField("ready")
    assert not starting.ready.value


async def test_node_info_is_the_node_name(plugin: Plugin) -> None:
    info = await plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "node-1"
    assert info.max_volumes_per_node == 0


async def test_node_capabilities_have_no_stage_unstage(plugin: Plugin) -> None:
    answer = await plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    kinds = [c.rpc.type for c in answer.capabilities]
    assert csi_pb2.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME not in kinds
    assert kinds == []


@pytest.mark.parametrize(
    "method",
    [
        "/csi.v1.Node/NodeStageVolume",
        "/csi.v1.Node/NodeGetVolumeStats",
        "/csi.v1.Node/NodeExpandVolume",
        "/csi.v1.Controller/CreateVolume",
    ],
)
async def test_an_rpc_the_plugin_does_not_serve_is_unimplemented(
    plugin: Plugin, method: str
) -> None:
    call = plugin.channel.unary_unary(method)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- the socket ------------------------------------------------------------------------------


async def test_the_socket_is_mode_0600(plugin: Plugin) -> None:
    mode = plugin.place.socket.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_a_stale_socket_is_replaced(place: Place) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(place.socket))
    stale.close()  # the file stays, nobody listens: a crashed plugin's leftover
    async with running_plugin(place, FakeVolumeSource(volume=place.volume())) as plugin:
        info = await plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.gkm.io"


async def test_a_socket_in_use_stops_start_up(place: Place) -> None:
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(os.fspath(place.socket))
    live.listen()
    try:
        server = CsiServer(f"unix://{place.socket}", node=_servicer(place), ready=lambda: True)
        with pytest.raises(CsiEndpointError, match="in use"):
            await server.start()
    finally:
        live.close()


async def test_a_file_in_the_way_stops_start_up_and_stays(place: Place) -> None:
    place.socket.write_text("not a socket")
    server = CsiServer(f"unix://{place.socket}", node=_servicer(place), ready=lambda: True)
    with pytest.raises(CsiEndpointError, match="not a socket"):
        await server.start()
    assert place.socket.read_text() == "not a socket"


async def test_the_socket_directory_is_created(place: Place) -> None:
    path = place.root / "plugins" / "csi-gkm" / "csi.sock"
    server = CsiServer(f"unix://{path}", node=_servicer(place), ready=lambda: True)
    await server.start()
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
    finally:
        await server.stop(0)


async def test_stop_removes_the_socket_and_may_be_called_twice(place: Place) -> None:
    server = CsiServer(f"unix://{place.socket}", node=_servicer(place), ready=lambda: True)
    await server.start()
    await server.stop(0)
    await server.stop(0)
    assert not place.socket.exists()


# --- hostile clients -------------------------------------------------------------------------


async def test_an_oversized_request_is_refused_and_the_server_carries_on(plugin: Plugin) -> None:
    context = volume_context()
    context["padding"] = "x" * (5 * 1024 * 1024)
    request = publish_request(plugin.place.target(), context=context)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plugin.node.NodePublishVolume(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert plugin.source.prepare_calls == []
    answer = await plugin.identity.Probe(csi_pb2.ProbeRequest())
    assert answer.ready.value


def _send_garbage(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(HANG_GUARD)
        raw.connect(os.fspath(path))
        raw.sendall(data)
        received = b""
        try:
            while chunk := raw.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # dropped hard: as good as closed
        return received


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)) * 64,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 4096,
    ],
    ids=["http1", "binary", "bad-http2-frames"],
)
async def test_garbage_on_the_socket_is_dropped_and_the_server_carries_on(
    plugin: Plugin, data: bytes
) -> None:
    await asyncio.wait_for(asyncio.to_thread(_send_garbage, plugin.place.socket, data), HANG_GUARD)
    info = await plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.gkm.io"


async def test_a_silent_connection_does_not_block_other_clients(plugin: Plugin) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(os.fspath(plugin.place.socket))
        info = await plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.gkm.io"


class _Blocking(FakeVolumeSource):
    """Holds every prepare until `release` is set."""

    def __init__(self, volume: PreparedVolume) -> None:
        super().__init__(volume=volume)
        self.release = asyncio.Event()
        self.entered = asyncio.Semaphore(0)

    async def prepare(self, request: VolumeRequest) -> PreparedVolume:
        self.entered.release()
        await self.release.wait()
        return await super().prepare(request)


async def test_calls_beyond_the_concurrency_bound_are_resource_exhausted(place: Place) -> None:
    source = _Blocking(place.volume())
    node = NodeServicer(
        source,
        kubelet_dir=place.kubelet,
        node_id="node-1",
        publications=PublicationLog(place.store / PUBLICATIONS),
    )
    server = CsiServer(place.endpoint, node=node, ready=lambda: True, max_concurrent_rpcs=2)
    await server.start()
    try:
        async with node_client(place.endpoint) as stub:
            held = [
                asyncio.ensure_future(
                    stub.NodePublishVolume(
                        publish_request(place.target(volume=name), volume=volume_id(volume=name))
                    )
                )
                for name in ("one", "two")
            ]
            for _ in held:
                await asyncio.wait_for(source.entered.acquire(), HANG_GUARD)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.NodePublishVolume(publish_request(place.target()))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            source.release.set()
            await asyncio.wait_for(asyncio.gather(*held), HANG_GUARD)
            assert len(source.publish_calls) == 2
    finally:
        await server.stop(0)
