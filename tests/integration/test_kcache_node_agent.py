"""The node agent on the Kubernetes API double, with the real registry and a real Triton cache.

The operator is not running: a test writes the cache's ``status`` as the operator would. The
cache holds two kernels for sm_90 only, so a simulated dgx-h100 node can use it and a dgx-a100
cannot.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpufleet.core.retry import Backoff
from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.kcache import mounts
from gpufleet.kcache.cluster import (
    CacheKey,
    PodInfo,
    VolumeRequest,
    node_label_key,
    node_object_name,
)
from gpufleet.kcache.errors import (
    CacheIncompatibleError,
    CacheNotReadyError,
    InvalidVolumeError,
)
from gpufleet.kcache.node.run import NodeParts, node_agent
from gpufleet.kcache.node.settings import NodeSettings
from gpufleet.kcache.objects import new_node_object
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.publications import Publication
from gpufleet.kube.client import Kube
from tests.conftest import require
from tests.doubles.kubeapi import KubeApiDouble
from tests.integration.kcache_node_support import (
    CACHES,
    IMAGE_ROOT,
    KEY,
    NAMESPACE,
    NODE,
    NODE_OBJECTS,
    add_cache,
    add_pod,
    closed_port,
    digest_entry,
    digest_of,
    node_label,
    node_object,
    push_cache,
    serve_crds,
    state_of,
)
from tests.kcache_support import build_triton_cache, compile_again
from tests.polling import eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, test_servers: dict[str, str]) -> str:
    """``<repo>@<digest>`` of a real Triton cache for sm_90, pushed once for the module."""
    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    base = tmp_path_factory.mktemp("node-agent")
    build_triton_cache(base / "triton", archs=(90,))
    return push_cache(base / "triton", registry, base / "image")


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble(bookmark_interval=0.2) as double:
        serve_crds(double)
        yield double


@dataclass
class Registry:
    """Which address the node's registry clients reach: the real one, or a closed port."""

    down: bool = False
    closed: str = field(default_factory=closed_port)
    made: int = 0

    def client(self, name: str) -> RegistryClient:
        self.made += 1
        return RegistryClient(self.closed if self.down else name, deadline=30)


def writes(api: KubeApiDouble) -> int:
    """Writes of node objects (any verb, any subresource) and of the Node."""
    return sum(
        api.count(verb=verb, resource=resource)
        for verb in ("create", "update", "patch", "delete")
        for resource in ("gkmcachenodes", "nodes")
    )


@contextlib.asynccontextmanager
async def running(
    kube: Kube, store: Path, preset: str, registry: Registry, *, max_bytes: int | None = None
) -> AsyncIterator[NodeParts]:
    settings = NodeSettings(node_name=NODE, kcache_store=store, kcache_store_max_bytes=max_bytes)
    source = NvmlSource(sim.SimulatedNvml(sim.preset(preset)))
    try:
        async with node_agent(
            settings, source=source, kube=kube, clients=registry.client, durable=False,
            backoff=Backoff(initial=0.05, cap=0.2, jitter=0),
        ) as parts:  # fmt: skip
            yield parts
    finally:
        source.close()


def request(volume: str = "kernels", uid: str = "uid-1") -> VolumeRequest:
    target = Path(f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{volume}/mount")
    return VolumeRequest(
        f"csi-{uuid.uuid4().hex}", target, volume, KEY, PodInfo(NAMESPACE, "app", uid, "default")
    )


async def test_an_h100_node_pulls_a_resolved_cache_and_reports_it_ready(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    add_cache(api, image)
    async with running(kube, tmp_path / "store", "dgx-h100", Registry()) as node:
        await eventually(lambda: state_of(api, image) == "Extracted", 60)
        await eventually(lambda: node_label(api) == "ready")

        entry = digest_entry(api, image)
        assert entry is not None
        assert [g["id"] for g in entry["compatibleGPUs"]] == list(range(8))
        assert entry["incompatibleGPUs"] == []
        assert entry["volumeSize"] > 0
        status = node_object(api)["status"]  # type: ignore[index]
        assert status["nodeName"] == NODE
        (group,) = status["gpus"]
        assert (group["gpuType"], group["ids"]) == ("NVIDIA H100 80GB HBM3", list(range(8)))
        assert group["driverVersion"]
        assert node.store.installed(digest_of(image), IMAGE_ROOT) is not None


async def test_a_steady_node_makes_no_writes(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    add_cache(api, image)
    async with running(kube, tmp_path / "store", "dgx-h100", Registry()) as node:
        await eventually(lambda: node_label(api) == "ready", 60)
        await eventually(lambda: not node.agent._dirty and not node.agent._wake.is_set())
        before = writes(api)
        # A change of the cache that changes nothing this node shows: an annotation.
        api.update_object(
            CACHES, NAMESPACE, KEY.name,
            lambda o: o["metadata"].setdefault("annotations", {}).update({"x": "y"}),
        )  # fmt: skip
        informer = node.agent.informers["GKMCache"]

        def seen() -> bool:
            cached = informer.get(NAMESPACE, KEY.name)
            return cached is not None and "x" in (cached["metadata"].get("annotations") or {})

        await eventually(seen)
        await node.agent.write(node.state.keys())  # a forced pass writes nothing either

        assert writes(api) == before


async def test_an_a100_node_reports_the_cache_incompatible_with_why_and_refuses_it(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    add_cache(api, image)
    uid = add_pod(api, ("app", "/cache"))
    async with running(kube, tmp_path / "store", "dgx-a100", Registry()) as node:
        await eventually(lambda: state_of(api, image) == "Incompatible", 60)
        await eventually(lambda: node_label(api) == "incompatible")
        entry = digest_entry(api, image)
        assert entry is not None
        message = entry["conditions"][0]["message"]
        assert "cuda/80/32: no kernels for cuda arch 80 (cache has: cuda/90/32)" in message
        assert entry["incompatibleGPUs"][0]["reason"].startswith("no kernels")

        with pytest.raises(CacheIncompatibleError, match="cache has: cuda/90/32"):
            await node.volumes.prepare(request(uid=uid))
        assert node.store.caches() == []


async def test_a_registry_outage_is_an_error_then_ready_once_it_is_back(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    registry = Registry(down=True)
    add_cache(api, image)
    async with running(kube, tmp_path / "store", "dgx-h100", registry) as node:
        await eventually(lambda: state_of(api, image) == "Error", 30)
        entry = digest_entry(api, image)
        assert entry is not None
        assert "RegistryError" in entry["conditions"][0]["message"]
        assert node_label(api) is None
        tries = registry.made
        await eventually(lambda: registry.made > tries + 1)  # it keeps trying

        registry.down = False

        await eventually(lambda: state_of(api, image) == "Extracted", 60)
        await eventually(lambda: node_label(api) == "ready")
        assert node.agent.pull_failures_total >= 2


async def test_a_pod_mounting_at_another_path_gets_an_entry_triton_hits_there(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    mount_path = tmp_path / "kernels"  # where "the container" sees the volume
    add_cache(api, image)
    uid = add_pod(api, ("app", str(mount_path)), ("sidecar", str(mount_path)))
    async with running(kube, tmp_path / "store", "dgx-h100", Registry()) as node:
        await eventually(lambda: node_label(api) == "ready", 60)

        volume = await node.volumes.prepare(request(uid=uid))

        assert volume.mount_root == str(mount_path)
        assert volume.path == node.store.installed(digest_of(image), str(mount_path))
        mount_path.mkdir()
        mounts.bind_read_only(volume.path, mount_path)
        try:
            report = compile_again(mount_path, archs=(90,))
        finally:
            mounts.unmount(mount_path)
        assert report.compiled == 0
        assert report.cache_hits == 2


async def test_two_containers_mounting_at_different_paths_are_refused(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    add_cache(api, image)
    uid = add_pod(api, ("app", "/cache"), ("tool", "/kernels"))
    async with running(kube, tmp_path / "store", "dgx-h100", Registry()) as node:
        await eventually(lambda: node_label(api) == "ready", 60)
        with pytest.raises(InvalidVolumeError, match="app at /cache, tool at /kernels"):
            await node.volumes.prepare(request(uid=uid))


async def test_a_published_volume_shows_running_and_a_deleted_cache_goes_once_unmounted(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    add_cache(api, image)
    uid = add_pod(api, ("app", "/cache"))
    async with running(kube, tmp_path / "store", "dgx-h100", Registry()) as node:
        await eventually(lambda: node_label(api) == "ready", 60)
        await eventually(lambda: not node.agent._dirty and not node.agent._wake.is_set())
        req = request(uid=uid)
        volume = await node.volumes.prepare(req)
        before = writes(api)
        await node.volumes.published(req, volume)
        await eventually(lambda: state_of(api, image) == "Running")
        assert writes(api) == before + 1  # one status patch; the Node's label stays "ready"
        pods = digest_entry(api, image)["pods"]  # type: ignore[index]
        assert pods == [{"podNamespace": NAMESPACE, "podName": "app", "volumeId": req.volume_id}]

        api.delete_object(CACHES, NAMESPACE, KEY.name)  # the finalizer keeps it
        await eventually(lambda: node_label(api) is None)
        await node.agent.collect_now()
        assert node.store.installed(digest_of(image), IMAGE_ROOT) is not None
        assert node_object(api) is not None

        await node.volumes.unpublished(req.volume_id)

        await eventually(lambda: node_object(api) is None)
        await eventually(lambda: node.store.caches() == [])


async def test_a_cache_another_cache_resolves_to_stays_when_one_is_deleted(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    add_cache(api, image)
    add_cache(api, image, name="twin")
    async with running(kube, tmp_path / "store", "dgx-h100", Registry()) as node:
        await eventually(lambda: node_label(api) == "ready", 60)
        api.delete_object(CACHES, NAMESPACE, KEY.name)
        await eventually(lambda: node_object(api) is None)
        await node.agent.collect_now()
        assert node.store.installed(digest_of(image), IMAGE_ROOT) is not None


async def test_after_a_restart_a_mounted_cache_is_never_collected(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    target = tmp_path / "pods" / "mount"
    add_cache(api, image)
    async with running(kube, store, "dgx-h100", Registry()) as node:
        await eventually(lambda: node_label(api) == "ready", 60)
        source = node.store.installed(digest_of(image), IMAGE_ROOT)
        assert source is not None
        # What the CSI server leaves behind: a bind mount and its durable record.
        target.mkdir(parents=True)
        mounts.bind_read_only(source, target)
        node.publications.record(Publication(
            "csi-live", target, KEY, PodInfo(NAMESPACE, "app", "uid-1", "default"),
            digest_of(image), IMAGE_ROOT, source, created_target=True, published_at=0.0,
        ))  # fmt: skip
    try:
        # Meanwhile the cache was deleted: only the mount keeps the entry.
        api.update_object(CACHES, NAMESPACE, KEY.name, lambda o: o["metadata"].update(
            {"finalizers": []}))  # fmt: skip
        api.delete_object(CACHES, NAMESPACE, KEY.name)
        async with running(kube, store, "dgx-h100", Registry(down=True)) as node:
            assert [u.volume_id for u in node.uses] == ["csi-live"]
            await eventually(lambda: node.agent.synced)
            await node.agent.collect_now()
            assert node.store.installed(digest_of(image), IMAGE_ROOT) is not None
            await eventually(lambda: state_of(api, image) == "Outdated")
    finally:
        mounts.unmount(target)


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory, test_servers: dict[str, str]) -> str:
    """Another image (one kernel only): where the cache's tag moves to."""
    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    base = tmp_path_factory.mktemp("node-agent-moved")
    build_triton_cache(base / "triton", archs=(90,), kernels=("add",))
    return push_cache(base / "triton", registry, base / "image")


async def test_a_moved_tag_keeps_the_mounted_old_digest_until_unmounted_and_pulls_the_new(
    api: KubeApiDouble, kube: Kube, image: str, moved: str, tmp_path: Path
) -> None:
    add_cache(api, image)
    uid = add_pod(api, ("app", IMAGE_ROOT))
    async with running(kube, tmp_path / "store", "dgx-h100", Registry()) as node:
        await eventually(lambda: node_label(api) == "ready", 60)
        req = request(uid=uid)
        await node.volumes.published(req, await node.volumes.prepare(req))

        api.update_object(CACHES, NAMESPACE, KEY.name, lambda o: o.update(
            {"status": {"resolvedDigest": digest_of(moved), "resolvedImage": moved}}
        ))  # fmt: skip

        await eventually(lambda: state_of(api, moved) == "Extracted", 60)
        assert state_of(api, image) == "Outdated"
        await node.agent.collect_now()
        assert node.store.installed(digest_of(image), IMAGE_ROOT) is not None
        await eventually(lambda: node_label(api) == "ready")  # patched after the node object

        await node.volumes.unpublished(req.volume_id)

        await eventually(lambda: state_of(api, image) is None)
        await eventually(lambda: node.store.installed(digest_of(image), IMAGE_ROOT) is None)
        assert node.store.installed(digest_of(moved), IMAGE_ROOT) is not None


async def test_node_objects_and_labels_of_caches_gone_meanwhile_are_removed_at_start(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    gone = CacheKey("GKMCache", NAMESPACE, "gone")
    for node in (NODE, "node-2"):
        body = new_node_object(gone, node)
        api.add_object({**body, "status": {"nodeName": node}})
    api.update_object("nodes", None, NODE, lambda n: n["metadata"].setdefault(
        "labels", {}).update({node_label_key(gone): "ready"}))  # fmt: skip
    add_cache(api, image)
    async with running(kube, tmp_path / "store", "dgx-h100", Registry()):
        await eventually(lambda: node_label(api) == "ready", 60)
        await eventually(lambda: node_label(api, gone) is None)
        names = {o["metadata"]["name"] for o in api.objects(NODE_OBJECTS, NAMESPACE)}
        assert node_object_name(gone, NODE) not in names
        assert node_object_name(gone, "node-2") in names  # another node's: not ours to delete


async def test_a_cache_evicted_for_the_budget_is_pulled_again_when_a_pod_asks_for_it(
    api: KubeApiDouble, kube: Kube, image: str, tmp_path: Path
) -> None:
    add_cache(api, image)
    uid = add_pod(api, ("app", IMAGE_ROOT))
    registry = Registry()
    async with running(kube, tmp_path / "store", "dgx-h100", registry, max_bytes=1) as node:
        await eventually(lambda: node_label(api) == "ready", 60)
        await node.agent.collect_now()  # over the budget, and nothing mounts it
        assert node.store.caches() == []
        await eventually(lambda: state_of(api, image) == "Pending")
        assert "KCACHE_STORE_MAX_BYTES" in digest_entry(api, image)["conditions"][0]["message"]  # type: ignore[index]
        await eventually(lambda: node_label(api) is None)

        req = request(uid=uid)
        with pytest.raises(CacheNotReadyError):
            await node.volumes.prepare(req)  # asks for it again

        await eventually(lambda: node_label(api) == "ready", 60)
        await node.volumes.published(req, await node.volumes.prepare(req))
        await node.agent.collect_now()
        assert node.store.installed(digest_of(image), IMAGE_ROOT) is not None  # mounted: kept
