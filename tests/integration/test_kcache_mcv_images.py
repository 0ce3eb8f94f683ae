"""Images built the way MCV builds them, from a real Triton cache, through the real registry.

The image is made in the test (tests/kcache_mcv.py follows what MCV writes),
pushed to the test servers' docker-registry, pulled into a `CacheStore` and
compiled against: Triton must compile nothing. The cache it came from is
deleted first, so the ``__grp__`` files MCV keeps (absolute paths of the
build machine) only hit if extraction rewrote them to the mount root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.gpu.model import GpuDevice
from gpufleet.kcache.compat import check
from gpufleet.kcache.errors import CacheFormatError, KcacheError, UnsafeArchiveError
from gpufleet.kcache.model import CacheKind, Target
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from gpufleet.kcache.transfer import fetch_image, pull_to_store
from tests.conftest import require
from tests.kcache_mcv import McvImage, mcv_image, member
from tests.kcache_support import CompileReport, build_triton_cache, compile_again, group_dirs

pytestmark = pytest.mark.integration

ARCHS = (90,)
KERNELS = ("add", "scale")
ENTRIES = len(ARCHS) * len(KERNELS)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Triton cache, compiled once for the module; tests copy it before MCV packs it."""
    cache = tmp_path_factory.mktemp("mcv-build") / "triton"
    build_triton_cache(cache, archs=ARCHS, kernels=KERNELS)
    return cache


@pytest.fixture
def build_dir(built: Path, tmp_path: Path) -> Path:
    """Where 'the build machine' keeps the cache MCV packs (its __grp__ files name this path)."""
    cache = tmp_path / "build-machine" / "root" / ".triton" / "cache"
    shutil.copytree(built, cache)
    for grp in cache.glob("*/__grp__*.json"):
        grp.write_text(grp.read_text().replace(str(built), str(cache)))
    return cache


@pytest.fixture
def registry(test_servers: dict[str, str]) -> str:
    (address,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    return address


@pytest.fixture
def client(registry: str) -> Iterator[RegistryClient]:
    with RegistryClient(registry) as client:
        yield client


def push(client: RegistryClient, image: McvImage) -> Reference:
    ref = Reference(client.registry, f"mcv/{uuid.uuid4().hex[:12]}", "v1")
    image.push(client, ref)
    return ref


def show_at(path: Path, at: Path) -> None:
    """Show the extracted cache at the mount root, as the pod's bind mount would."""
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(path, target_is_directory=True)


@pytest.mark.parametrize("docker", [True, False], ids=["docker-schema2", "oci"])
def test_an_mcv_image_pulls_into_the_store_and_triton_compiles_nothing_against_it(
    client: RegistryClient, build_dir: Path, tmp_path: Path, docker: bool
) -> None:
    image = mcv_image(build_dir, docker=docker)
    ref = push(client, image)
    shutil.rmtree(build_dir)  # the build machine's paths must not be what Triton finds
    mount = tmp_path / "pod" / "cache"
    store = CacheStore(tmp_path / "store", durable=False)

    pulled = pull_to_store(client, ref, store, mount_root=str(mount))
    show_at(pulled.path, mount)

    assert pulled.extracted
    assert len(group_dirs(pulled.path)) == ENTRIES  # io.triton.cache/ stripped: the mount root
    assert compile_again(mount, archs=ARCHS, kernels=KERNELS) == CompileReport(0, ENTRIES)


def test_an_mcv_image_without_the_rewrite_would_miss_once_the_build_cache_is_gone(
    client: RegistryClient, build_dir: Path, tmp_path: Path
) -> None:
    # The control: MCV's own __grp__ files, copied as they are, name a path that is gone.
    image = mcv_image(build_dir, docker=True)
    as_packed = tmp_path / "as-packed"
    shutil.copytree(build_dir, as_packed)
    shutil.rmtree(build_dir)

    assert image.kernels
    assert compile_again(as_packed, archs=ARCHS, kernels=KERNELS).compiled == ENTRIES


def test_an_mcv_image_summary_with_a_string_arch_matches_an_h100(
    client: RegistryClient, build_dir: Path
) -> None:
    ref = push(client, mcv_image(build_dir, docker=False))
    h100, a100 = (
        GpuDevice(index=i, uuid=f"GPU-{i}", serial=None, product_name=name, pci_bus_id="0",
                  compute_capability=cc)
        for i, (name, cc) in enumerate((("H100", (9, 0)), ("A100", (8, 0))))
    )  # fmt: skip

    remote = fetch_image(client, ref)

    assert remote.summary.kind is CacheKind.TRITON
    assert remote.summary.targets == (Target("cuda", 90, 32),)  # MCV's "90", as a number
    assert remote.summary.entry_count == ENTRIES
    assert [v.matches for v in check(remote.summary, [h100, a100])] == [True, False]


def assert_store_empty(store: CacheStore) -> None:
    assert store.caches() == []
    assert not [p for p in (store.root / "caches").rglob("*") if p.is_file()]
    assert not (store.root / "tmp").exists() or not any((store.root / "tmp").iterdir())


@pytest.mark.parametrize("delta", [-1, 1], ids=["label-too-small", "label-too-large"])
def test_an_mcv_image_with_a_wrong_size_label_is_refused_and_nothing_is_stored(
    client: RegistryClient, build_dir: Path, tmp_path: Path, delta: int
) -> None:
    right = int(mcv_image(build_dir, docker=True).labels["cache.triton.image/cache-size-bytes"])
    ref = push(client, mcv_image(build_dir, docker=True, size_bytes=right + delta))
    store = CacheStore(tmp_path / "store", durable=False)

    with pytest.raises(CacheFormatError) as caught:
        pull_to_store(client, ref, store, mount_root="/cache")

    assert "cache-size-bytes" in str(caught.value) or "size label" in str(caught.value)
    assert str(right + delta) in str(caught.value)
    assert_store_empty(store)


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ([member("etc/cron.d/evil", b"* * * * * root sh\n")], "outside io.triton.cache/"),
        ([member("io.triton.cachex/evil", b"x")], "outside io.triton.cache/"),
        (
            [member("io.vllm.cache/evil", b"x")],
            "one pair only",
        ),
    ],
    ids=["outside-the-cache", "a-lookalike-prefix", "the-other-family"],
)
def test_an_mcv_image_with_a_member_outside_its_cache_is_refused(
    client: RegistryClient,
    build_dir: Path,
    tmp_path: Path,
    extra: list[tuple[tarfile.TarInfo, bytes | None]],
    why: str,
) -> None:
    ref = push(client, mcv_image(build_dir, docker=True, extra=extra))
    store = CacheStore(tmp_path / "store", durable=False)

    with pytest.raises(UnsafeArchiveError) as caught:
        pull_to_store(client, ref, store, mount_root="/cache")

    assert why in str(caught.value)
    assert_store_empty(store)
    assert not (tmp_path / "store" / "etc").exists()


def test_an_mcv_image_holding_a_symlink_is_refused(
    client: RegistryClient, build_dir: Path, tmp_path: Path
) -> None:
    link, _ = member("io.triton.cache/passwd", kind=tarfile.SYMTYPE)
    link.linkname = "/etc/passwd"
    ref = push(client, mcv_image(build_dir, docker=False, extra=[(link, None)]))
    store = CacheStore(tmp_path / "store", durable=False)

    with pytest.raises(UnsafeArchiveError, match=r"io\.triton\.cache/passwd.*symbolic link"):
        pull_to_store(client, ref, store, mount_root="/cache")

    assert_store_empty(store)


def test_an_mcv_image_of_two_layers_is_refused_before_its_layers_are_read(
    client: RegistryClient, build_dir: Path, tmp_path: Path
) -> None:
    ref = push(client, mcv_image(build_dir, docker=True, layers=2))
    store = CacheStore(tmp_path / "store", durable=False)
    before = len(client.requests)

    with pytest.raises(KcacheError, match="2 layers"):
        pull_to_store(client, ref, store, mount_root="/cache")

    assert not any("/blobs/" in path for _, path in client.requests[before:])
    assert store.caches() == []


# -- through the CLI -----------------------------------------------------------------------------


def cache_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "KCACHE_"))}
    return subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "cache", *args],
        capture_output=True, text=True, env=env, timeout=180, check=False,
    )  # fmt: skip


def test_cache_extract_of_an_mcv_image_prints_the_path_triton_hits(
    client: RegistryClient, build_dir: Path, tmp_path: Path
) -> None:
    ref = push(client, mcv_image(build_dir, docker=True))
    shutil.rmtree(build_dir)
    mount = tmp_path / "pod" / "cache"

    done = cache_cli("extract", str(ref), "--store", str(tmp_path / "store"),
                     "--mount-root", str(mount))  # fmt: skip

    assert done.returncode == 0, done.stderr
    show_at(Path(done.stdout.strip()), mount)
    assert compile_again(mount, archs=ARCHS, kernels=KERNELS).compiled == 0


def test_cache_extract_of_an_mcv_image_with_a_wrong_size_label_exits_1_with_one_line(
    client: RegistryClient, build_dir: Path, tmp_path: Path
) -> None:
    ref = push(client, mcv_image(build_dir, docker=False, size_bytes=12345))

    done = cache_cli("extract", str(ref), "--store", str(tmp_path / "store"),
                     "--mount-root", "/cache")  # fmt: skip

    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "12345" in line
    assert "Traceback" not in done.stderr
    assert CacheStore(tmp_path / "store").caches() == []


def test_cache_extract_of_an_mcv_image_without_a_mount_root_says_to_give_one(
    client: RegistryClient, build_dir: Path, tmp_path: Path
) -> None:
    ref = push(client, mcv_image(build_dir, docker=True))

    done = cache_cli("extract", str(ref), "--store", str(tmp_path / "store"))

    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "no --mount-root given and the image names none" in line
