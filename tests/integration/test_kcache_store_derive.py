"""`CacheStore.derive` on a real Triton cache: the derived entry hits where pods mount it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gpufleet.kcache.extract import extract_layer
from gpufleet.kcache.image import build_image
from gpufleet.kcache.store import CacheStore
from tests.kcache_support import ARCHS, KERNELS, CompileReport, build_triton_cache, compile_again

pytestmark = pytest.mark.integration

ENTRIES = len(ARCHS) * len(KERNELS)
IMAGE_ROOT = "/cache"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, int]:
    """A real Triton cache packed as an image for /cache: (digest, layer file, size label)."""
    work = tmp_path_factory.mktemp("image")
    build_triton_cache(work / "triton")
    built = build_image(work / "triton", work / "oci", mount_root=IMAGE_ROOT)
    return built.manifest_digest, built.layer_path, built.summary.size_bytes


@pytest.fixture
def store(tmp_path: Path, image: tuple[str, Path, int]) -> CacheStore:
    """A store holding the image extracted for /cache, as the node agent pulls it."""
    digest, layer, size = image
    store = CacheStore(tmp_path / "store", durable=False)

    def fill(tmp: Path) -> None:
        with layer.open("rb") as stream:
            extract_layer(stream, tmp, mount_root=IMAGE_ROOT, expected_size=size)

    store.install(digest, IMAGE_ROOT, fill)
    return store


def digests(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@contextmanager
def bind_read_only(source: Path, target: Path) -> Iterator[Path]:
    """`source` bind-mounted read-only at `target`, as the CSI plugin serves it to a pod."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_cache_derived_for_the_pods_mount_path_hits_every_kernel_there(
    store: CacheStore, image: tuple[str, Path, int], tmp_path: Path
) -> None:
    digest = image[0]
    source = store.installed(digest, IMAGE_ROOT)
    assert source is not None
    before = digests(source)
    mount_path = tmp_path / "pod" / "kernels"

    derived = store.derive(digest, IMAGE_ROOT, str(mount_path))

    with bind_read_only(derived, mount_path):
        report = compile_again(mount_path)
    assert report == CompileReport(compiled=0, cache_hits=ENTRIES)
    assert digests(source) == before


def test_the_image_roots_entry_mounted_at_another_path_misses_every_kernel(
    store: CacheStore, image: tuple[str, Path, int], tmp_path: Path
) -> None:
    # The control for the test above: without the rewrite, Triton finds nothing (and a miss
    # writes into the cache, so a copy stands in for a read-only mount here).
    source = store.installed(image[0], IMAGE_ROOT)
    assert source is not None
    mount_path = tmp_path / "pod" / "kernels"
    shutil.copytree(source, mount_path)

    assert compile_again(mount_path) == CompileReport(compiled=ENTRIES, cache_hits=0)
