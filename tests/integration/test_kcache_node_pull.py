"""The node's puller against the real registry, with a real Triton cache for sm_90 only."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from gpufleet.kcache.errors import RegistryError
from gpufleet.kcache.image import DEFAULT_MOUNT_ROOT
from gpufleet.kcache.node.pull import Puller
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from tests.conftest import require
from tests.integration.kcache_node_support import IMAGE_ROOT, closed_port, gpus_of, push_cache
from tests.kcache_mcv import mcv_image
from tests.kcache_support import CompileReport, build_triton_cache, compile_again

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, test_servers: dict[str, str]) -> str:
    """A real Triton cache of two kernels for arch 90 only, pushed once for the module."""
    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    base = tmp_path_factory.mktemp("node-pull")
    build_triton_cache(base / "triton", archs=(90,))
    return push_cache(base / "triton", registry, base / "image")


def puller(store: Path, preset: str, *, registry: str | None = None) -> Puller:
    def clients(name: str) -> RegistryClient:
        return RegistryClient(registry or name, deadline=30)

    return Puller(CacheStore(store, durable=False), gpus_of(preset), clients, node_name="node-1")


def test_an_h100_node_pulls_the_cache_into_the_store_for_its_mount_root(
    image: str, tmp_path: Path
) -> None:
    digest = Reference.parse(image).digest
    assert digest is not None

    outcome = puller(tmp_path, "dgx-h100").pull(image, digest)

    assert outcome.compatible
    assert outcome.mount_root == IMAGE_ROOT
    assert outcome.path == CacheStore(tmp_path).installed(digest, IMAGE_ROOT)
    assert [v.matches for v in outcome.verdicts] == [True] * 8
    assert outcome.size is not None
    assert outcome.size > 0


def test_an_a100_node_finds_it_incompatible_and_pulls_nothing(image: str, tmp_path: Path) -> None:
    digest = Reference.parse(image).digest
    assert digest is not None

    outcome = puller(tmp_path, "dgx-a100").pull(image, digest)

    assert not outcome.compatible
    assert outcome.message.startswith("no GPU of node node-1 can use it: GPU 0-7 (NVIDIA A100")
    assert "is cuda/80/32: no kernels for cuda arch 80 (cache has: cuda/90/32)" in outcome.message
    assert CacheStore(tmp_path).caches() == []


def test_a_registry_that_is_down_fails_the_pull(image: str, tmp_path: Path) -> None:
    digest = Reference.parse(image).digest
    assert digest is not None
    with pytest.raises(RegistryError):
        puller(tmp_path, "dgx-h100", registry=closed_port()).pull(image, digest)
    assert CacheStore(tmp_path).caches() == []


def test_a_pulled_cache_is_served_after_a_restart_while_the_registry_is_down(
    image: str, tmp_path: Path
) -> None:
    digest = Reference.parse(image).digest
    assert digest is not None
    first = puller(tmp_path, "dgx-h100").pull(image, digest)

    again = puller(tmp_path, "dgx-h100", registry=closed_port()).pull(image, digest)

    assert again == first


def test_an_mcv_image_is_pulled_for_the_default_root_and_derived_for_a_pods_path(
    tmp_path: Path, test_servers: dict[str, str]
) -> None:
    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    build_dir = tmp_path / "build-machine" / "root" / ".triton" / "cache"
    build_triton_cache(build_dir, archs=(90,))
    reference = Reference(registry, f"kcache-node/mcv-{uuid.uuid4().hex[:10]}", "v1")
    with RegistryClient(registry) as client:
        digest = mcv_image(build_dir, docker=True).push(client, reference)
    shutil.rmtree(build_dir)  # MCV's __grp__ files name it: it must not be what Triton finds
    image = f"{registry}/{reference.repository}@{digest}"

    outcome = puller(tmp_path / "store", "dgx-h100").pull(image, digest)

    assert outcome.compatible
    assert outcome.mount_root == DEFAULT_MOUNT_ROOT  # MCV names no mount root
    pod_root = tmp_path / "pod" / "kernels"
    store = CacheStore(tmp_path / "store", durable=False)
    derived = store.derive(digest, DEFAULT_MOUNT_ROOT, str(pod_root))
    pod_root.parent.mkdir(parents=True)
    pod_root.symlink_to(derived, target_is_directory=True)  # the container's view
    assert compile_again(pod_root, archs=(90,)) == CompileReport(compiled=0, cache_hits=2)
