"""`NodeVolumes.prepare`: which error each state of the cache and the pod gets, and which entry."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gpufleet.kcache.cluster import CacheKey, PodInfo, PreparedVolume, VolumeRequest
from gpufleet.kcache.errors import (
    CacheAccessDeniedError,
    CacheIncompatibleError,
    CacheNotFoundError,
    CacheNotReadyError,
    InvalidVolumeError,
)
from gpufleet.kcache.node.state import CacheSpec, NodeState, Phase
from gpufleet.kcache.node.volumes import NodeVolumes, mount_paths
from gpufleet.kcache.store import CacheStore

DIGEST = "sha256:" + "a" * 64
KEY = CacheKey("GKMCache", "team-a", "vector-add")
CLUSTER_KEY = CacheKey("ClusterGKMCache", None, "shared")
POD = PodInfo("team-a", "app", "uid-1", "runner")


def spec(key: CacheKey = KEY, *, access: str = "open", digest: str | None = DIGEST) -> CacheSpec:
    image = None if digest is None else f"127.0.0.1:5000/c@{digest}"
    return CacheSpec(key, "u", 1, digest, image, access, deleting=False)


def pod(*mounts: tuple[str, str, dict[str, str]], uid: str = "uid-1") -> dict[str, Any]:
    containers = [
        {"name": name, "volumeMounts": [{"name": "kernels", "mountPath": path, **extra}]}
        for name, path, extra in mounts
    ]
    return {"metadata": {"uid": uid}, "spec": {"containers": containers}}


class World:
    """The collaborators of `NodeVolumes`: a real store, a pod table, RBAC rules."""

    def __init__(self, root: Path) -> None:
        self.store = CacheStore(root, durable=False)
        self.state = NodeState(synced=True)
        self.pods: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.allowed: set[tuple[str, str]] = set()
        self.reviews: list[tuple[str, str, str, str, str]] = []
        self.volumes = NodeVolumes(
            self.state, store=self.store, read_pod=self.read_pod, review=self.review
        )

    async def read_pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.pods.get((namespace, name))

    async def review(self, user: str, verb: str, group: str, resource: str, name: str) -> bool:
        self.reviews.append((user, verb, group, resource, name))
        return (user, name) in self.allowed

    def ready(self, key: CacheKey = KEY, **kwargs: Any) -> None:
        self.state.set_cache(spec(key, **kwargs))
        self.store.install(DIGEST, "/cache", lambda tmp: (tmp / "k").write_text("x"))
        self.state.update(key, DIGEST, phase=Phase.EXTRACTED, mount_root="/cache")

    async def prepare(self, key: CacheKey = KEY) -> PreparedVolume:
        request = VolumeRequest(
            "csi-1", Path("/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/kernels/mount"),
            "kernels", key, POD,
        )  # fmt: skip
        return await self.volumes.prepare(request)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "store")


async def test_an_unknown_cache_is_not_found(world: World) -> None:
    with pytest.raises(CacheNotFoundError, match="does not exist"):
        await world.prepare()


async def test_an_unknown_cache_before_the_informers_listed_is_unavailable(world: World) -> None:
    world.state.synced = False
    with pytest.raises(CacheNotReadyError, match="still starting"):
        await world.prepare()


async def test_an_unresolved_cache_is_unavailable(world: World) -> None:
    world.state.set_cache(spec(digest=None))
    with pytest.raises(CacheNotReadyError, match="no digest resolved"):
        await world.prepare()


async def test_a_cache_being_pulled_is_unavailable(world: World) -> None:
    world.state.set_cache(spec())
    world.state.update(KEY, DIGEST, phase=Phase.DOWNLOADING)
    with pytest.raises(CacheNotReadyError, match="still being pulled"):
        await world.prepare()


async def test_a_failed_pull_is_unavailable_and_says_why(world: World) -> None:
    world.state.set_cache(spec())
    world.state.update(KEY, DIGEST, phase=Phase.ERROR, message="connection refused")
    with pytest.raises(CacheNotReadyError, match="connection refused"):
        await world.prepare()


async def test_an_incompatible_cache_is_a_failed_precondition_with_the_reasons(
    world: World,
) -> None:
    world.state.set_cache(spec())
    world.state.update(KEY, DIGEST, phase=Phase.INCOMPATIBLE, message="GPU 0 is cuda/80/32")
    with pytest.raises(CacheIncompatibleError, match="GPU 0 is cuda/80/32"):
        await world.prepare()


async def test_a_pod_at_the_images_mount_root_gets_the_pulled_entry(world: World) -> None:
    world.ready()
    world.pods[("team-a", "app")] = pod(("app", "/cache/", {}))

    volume = await world.prepare()

    assert volume == PreparedVolume(world.store.path(DIGEST, "/cache"), DIGEST, "/cache")
    assert [c.mount_root for c in world.store.caches()] == ["/cache"]


async def test_a_pod_at_another_path_gets_an_entry_derived_for_it_once(world: World) -> None:
    world.ready()
    world.pods[("team-a", "app")] = pod(("app", "/kernels", {}), ("sidecar", "/kernels", {}))

    first = await world.prepare()
    second = await world.prepare()

    assert first.mount_root == "/kernels"
    assert first.path == world.store.installed(DIGEST, "/kernels")
    assert second == first
    assert (first.path / "k").read_text() == "x"
    assert (DIGEST, "/kernels") in world.state.in_use()


async def test_two_containers_at_different_paths_are_refused_naming_both(world: World) -> None:
    world.ready()
    world.pods[("team-a", "app")] = pod(("app", "/cache", {}), ("tool", "/kernels", {}))
    with pytest.raises(InvalidVolumeError, match="app at /cache, tool at /kernels"):
        await world.prepare()


async def test_a_subpath_mount_is_refused(world: World) -> None:
    world.ready()
    world.pods[("team-a", "app")] = pod(("app", "/cache", {"subPath": "triton"}))
    with pytest.raises(InvalidVolumeError, match="subPath"):
        await world.prepare()


async def test_a_pod_with_another_uid_is_refused(world: World) -> None:
    world.ready()
    world.pods[("team-a", "app")] = pod(("app", "/cache", {}), uid="uid-other")
    with pytest.raises(InvalidVolumeError, match="UID uid-other"):
        await world.prepare()


async def test_a_missing_pod_is_refused(world: World) -> None:
    world.ready()
    with pytest.raises(InvalidVolumeError, match="does not exist"):
        await world.prepare()


async def test_a_cache_of_another_namespace_is_never_served(world: World) -> None:
    other = CacheKey("GKMCache", "team-b", "vector-add")
    world.ready(other)
    with pytest.raises(CacheAccessDeniedError, match="its own namespace"):
        await world.prepare(other)


async def test_an_open_cluster_cache_asks_no_access_review(world: World) -> None:
    world.ready(CLUSTER_KEY)
    world.pods[("team-a", "app")] = pod(("app", "/cache", {}))
    await world.prepare(CLUSTER_KEY)
    assert world.reviews == []


async def test_a_restricted_cluster_cache_needs_the_service_account_to_may_use_it(
    world: World,
) -> None:
    world.ready(CLUSTER_KEY, access="restricted")
    world.pods[("team-a", "app")] = pod(("app", "/cache", {}))
    user = "system:serviceaccount:team-a:runner"

    with pytest.raises(CacheAccessDeniedError, match=user):
        await world.prepare(CLUSTER_KEY)
    world.allowed.add((user, "shared"))
    await world.prepare(CLUSTER_KEY)

    assert world.reviews[0] == (user, "use", "gkm.io", "clustergkmcaches", "shared")


async def test_published_and_unpublished_track_the_use(world: World) -> None:
    world.ready()
    world.pods[("team-a", "app")] = pod(("app", "/cache", {}))
    volume = await world.prepare()
    request = VolumeRequest("csi-1", Path("/t"), "kernels", KEY, POD)

    await world.volumes.published(request, volume)
    assert world.state.phase(KEY, DIGEST) is Phase.RUNNING
    await world.volumes.unpublished("csi-1")
    await world.volumes.unpublished("csi-1")  # unknown now: nothing to do
    assert world.state.phase(KEY, DIGEST) is Phase.EXTRACTED


def test_mount_paths_reads_init_containers_too() -> None:
    warm = {"name": "warm", "volumeMounts": [{"name": "kernels", "mountPath": "/k"}]}
    app = {"name": "app", "volumeMounts": [{"name": "other", "mountPath": "/o"}]}
    obj = {"spec": {"initContainers": [warm], "containers": [app]}}
    assert mount_paths(obj, "kernels") == {"warm": "/k"}
