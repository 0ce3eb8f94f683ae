"""The whole node process: the CSI socket the kubelet calls, the health server, SIGKILL.

The kubelet's side is played over the real unix socket with the exact volume context and
target path it sends for an inline ephemeral volume of a ``podInfoOnMount`` driver; the mounts
are real (the tests run as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from gpufleet.core.retry import Backoff
from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.kcache.cluster import API_VERSION, CacheKey
from gpufleet.kcache.csi.v1 import csi_pb2
from gpufleet.kcache.mounts import mounted_at, read_mountinfo
from gpufleet.kcache.node.run import NodeProcess, node_process
from gpufleet.kcache.node.settings import NodeSettings
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from gpufleet.kube.client import Kube, connect
from gpufleet.kube.settings import KubeSettings
from tests.conftest import require
from tests.doubles.kubeapi import KubeApiDouble
from tests.integration.kcache_node_support import (
    CACHES,
    IMAGE_ROOT,
    KEY,
    NAMESPACE,
    NODE,
    StallingProxy,
    add_cache,
    add_pod,
    node_label,
    node_object,
    pod_request,
    push_cache,
    serve_crds,
    state_of,
)
from tests.kcache_csi_support import Place, kubelet_place, node_client, volume_id
from tests.kcache_support import build_triton_cache
from tests.polling import eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, test_servers: dict[str, str]) -> str:
    """``<repo>@<digest>`` of a real Triton cache for sm_90, pushed once for the module."""
    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    base = tmp_path_factory.mktemp("node-process")
    build_triton_cache(base / "triton", archs=(90,))
    return push_cache(base / "triton", registry, base / "image")


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble(bookmark_interval=0.2) as double:
        serve_crds(double)
        yield double


@pytest.fixture
def place() -> Iterator[Place]:
    with kubelet_place("kcn-") as where:
        yield where


async def publish_code(node: Any, request: csi_pb2.NodePublishVolumeRequest) -> grpc.StatusCode:
    try:
        await node.NodePublishVolume(request, timeout=30)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def in_process(kube: Kube, place: Place) -> AsyncIterator[NodeProcess]:
    settings = NodeSettings(
        node_name=NODE, kcache_store=place.store, kubelet_dir=place.kubelet,
        csi_endpoint=place.endpoint, metrics_port=0,
    )  # fmt: skip
    source = NvmlSource(sim.SimulatedNvml(sim.preset("dgx-h100")))
    try:
        async with node_process(
            settings, source=source, kube=kube, registry=CollectorRegistry(), durable=False,
            backoff=Backoff(initial=0.05, cap=0.2, jitter=0),
        ) as process:  # fmt: skip
            yield process
    finally:
        source.close()


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def test_a_pod_gets_the_cache_read_only_at_its_target_over_the_socket(
    api: KubeApiDouble, kube: Kube, image: str, place: Place
) -> None:
    mount_path = "/kernels"
    add_cache(api, image)
    uid = add_pod(api, ("app", mount_path))
    async with in_process(kube, place) as process, node_client(place.endpoint) as node:
        await eventually(lambda: node_label(api) == "ready", 60)
        status, _ = await http_get(process.health.port, "/readyz")
        assert status == 200
        target = place.target(uid)

        await node.NodePublishVolume(pod_request(target, uid), timeout=30)

        entry = mounted_at(target, read_mountinfo())
        assert entry is not None
        assert entry.read_only
        with pytest.raises(OSError, match="Read-only file system") as refused:
            (target / "written").write_text("x")
        assert refused.value.errno == errno.EROFS
        derived = process.parts.store.installed(Reference.parse(image).digest or "", mount_path)
        assert derived is not None
        assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in derived.iterdir())
        await eventually(lambda: state_of(api, image) == "Running")
        _, metrics = await http_get(process.health.port, "/metrics")
        assert "gpufleet_kcache_node_publishes_total 1.0" in metrics
        assert 'gpufleet_kcache_node_caches{state="Running"} 1.0' in metrics

        await node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id(uid), target_path=str(target)),
            timeout=30,
        )
        await eventually(lambda: state_of(api, image) == "Extracted")
        assert not target.exists()


async def test_a_restricted_cluster_cache_is_mounted_only_by_an_allowed_service_account(
    api: KubeApiDouble, kube: Kube, image: str, place: Place
) -> None:
    name = "shared"
    api.add_object({
        "apiVersion": API_VERSION, "kind": "ClusterGKMCache",
        "metadata": {"name": name},
        "spec": {"image": "registry.example/caches/vector-add:v1"},
        "status": {
            "resolvedDigest": Reference.parse(image).digest, "resolvedImage": image,
            "access": "restricted",
        },
    })  # fmt: skip
    uid = add_pod(api, ("app", IMAGE_ROOT))
    attributes = {"csi.gkm.io/ClusterGKMCache": name}
    async with in_process(kube, place), node_client(place.endpoint) as node:
        key = CacheKey("ClusterGKMCache", None, name)
        await eventually(lambda: node_label(api, key) == "ready", 60)
        request = pod_request(place.target(uid), uid, cache=attributes, service_account="runner")

        assert await publish_code(node, request) == grpc.StatusCode.PERMISSION_DENIED
        api.allow("system:serviceaccount:team-a:runner", "use", "gkm.io", "clustergkmcaches", name)
        assert await publish_code(node, request) == grpc.StatusCode.OK

        review = api.access_reviews[0]
        assert review["spec"]["user"] == "system:serviceaccount:team-a:runner"
        assert review["spec"]["resourceAttributes"]["name"] == name


async def test_an_unknown_cache_is_not_found_and_another_namespaces_is_permission_denied(
    api: KubeApiDouble, kube: Kube, image: str, place: Place
) -> None:
    uid = add_pod(api, ("app", IMAGE_ROOT))
    missing = {"csi.gkm.io/GKMCache": "nope", "csi.gkm.io/namespace": NAMESPACE}
    foreign = {"csi.gkm.io/GKMCache": KEY.name, "csi.gkm.io/namespace": "team-b"}
    async with in_process(kube, place) as process, node_client(place.endpoint) as node:
        await eventually(lambda: process.parts.agent.synced)
        target = place.target(uid)
        assert await publish_code(node, pod_request(target, uid, cache=missing)) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert await publish_code(node, pod_request(target, uid, cache=foreign)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )


async def until_serving(node: Any, limit: float = 60) -> None:
    """Wait for a (re)started process to answer on the socket (a killed one left the file)."""
    async with asyncio.timeout(limit):
        while True:
            try:
                await node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=5)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)


def node_command(api: KubeApiDouble, place: Place, kubeconfig: Path) -> subprocess.Popen[bytes]:
    """``gpufleet cache node --simulate dgx-h100`` against the double, as a DaemonSet runs it."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("KCACHE_", "REGISTRY_", "CSI_", "KUBE"))
    }  # fmt: skip
    env.update({
        "NODE_NAME": NODE, "KUBECONFIG": str(kubeconfig), "CSI_ENDPOINT": place.endpoint,
        "KUBELET_DIR": str(place.kubelet), "KCACHE_STORE": str(place.store), "METRICS_PORT": "0",
        "KCACHE_RETRY_MAX": "0.5",
    })  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "gpufleet.cli", "cache", "node", "--simulate", "dgx-h100"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.stderr is not None
    sys.stderr.write(process.stderr.read().decode()[-1500:])


def test_a_missing_node_name_is_one_line_naming_it_and_exit_2(place: Place) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "KUBECONFIG")}
    done = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "cache", "node", "--simulate", "dgx-h100"],
        env={**env, "KCACHE_STORE": str(place.store)}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpufleet: configuration error: missing required NODE_NAME"
    ]


async def test_sigkill_mid_pull_and_while_mounted_serves_nothing_half_and_collects_nothing_mounted(
    api: KubeApiDouble, image: str, place: Place, tmp_path: Path, test_servers: dict[str, str]
) -> None:
    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    reference = Reference.parse(image)
    digest = reference.digest or ""
    with RegistryClient(registry) as client:
        manifest, _, _ = client.get_manifest(reference.repository, digest)
    layer = json.loads(manifest)["layers"][0]["digest"]
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    store = CacheStore(place.store)
    async with StallingProxy(registry) as proxy:
        proxy.stall_blobs.add(layer)
        proxy.stall()
        add_cache(api, f"{proxy.address}/{reference.repository}@{digest}")
        uid = add_pod(api, ("app", IMAGE_ROOT))
        request = pod_request(place.target(uid), uid)

        stopped = node_command(api, place, kubeconfig)
        try:
            await asyncio.wait_for(proxy.stalling.wait(), 60)
        finally:
            stopped.send_signal(signal.SIGTERM)
        # A pull in flight does not hold up a SIGTERM (the kubelet would SIGKILL after 30 s).
        assert await asyncio.to_thread(stopped.wait, 15) == 0
        proxy.stalling.clear()

        first = node_command(api, place, kubeconfig)
        try:
            await asyncio.wait_for(proxy.stalling.wait(), 60)
            await eventually(lambda: state_of(api, image) == "Downloading", 30)
        finally:
            kill(first)
        assert store.caches() == []
        assert any((place.store / "tmp").iterdir())  # killed halfway through an install

        proxy.stalling.clear()
        second = node_command(api, place, kubeconfig)
        try:
            await asyncio.wait_for(proxy.stalling.wait(), 60)
            assert len(list((place.store / "tmp").iterdir())) == 1  # the leftover was swept
            async with node_client(place.endpoint) as node:
                await until_serving(node)
                assert await publish_code(node, request) == grpc.StatusCode.UNAVAILABLE
                proxy.lift()
                await eventually(lambda: node_label(api) == "ready", 60)
                assert await publish_code(node, request) == grpc.StatusCode.OK
                await eventually(lambda: state_of(api, image) == "Running", 30)
            # The cache is deleted while the pod still mounts it; then the process dies.
            api.delete_object(CACHES, NAMESPACE, KEY.name)
            await eventually(lambda: node_label(api) is None, 30)
        finally:
            kill(second)

        third = node_command(api, place, kubeconfig)
        try:
            async with node_client(place.endpoint) as node:
                await until_serving(node)
                assert store.installed(digest, IMAGE_ROOT) is not None
                assert mounted_at(place.target(uid), read_mountinfo()) is not None
                await node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(
                        volume_id=volume_id(uid), target_path=str(place.target(uid))
                    ),
                    timeout=30,
                )
                await eventually(lambda: node_object(api) is None, 30)
                await eventually(lambda: store.caches() == [], 30)
                assert api.objects(CACHES, NAMESPACE)[0]["metadata"]["deletionTimestamp"]
        finally:
            third.send_signal(signal.SIGTERM)
            assert third.wait(timeout=30) == 0


async def test_the_process_is_not_ready_until_the_crds_exist_and_then_is(
    place: Place, image: str
) -> None:
    async with KubeApiDouble(bookmark_interval=0.2) as bare:
        bare.add_node(NODE)
        settings = KubeSettings(qps=1000, burst=1000)
        async with (
            await connect(settings, configuration=bare.client_configuration()) as client,
            in_process(client, place) as process,
        ):
            status, body = await http_get(process.health.port, "/readyz")
            assert status == 503
            assert '"caches": {"ok": false' in body

            serve_crds(bare, node=False)
            add_cache(bare, image)

            await eventually(lambda: node_label(bare) == "ready", 60)
            status, _ = await http_get(process.health.port, "/readyz")
            assert status == 200
