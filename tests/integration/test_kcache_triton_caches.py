"""Real Triton caches, compiled ahead of time by Triton itself, through `kcache.format`."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from gpufleet.kcache.format import cache_files, detect, scan, summarize
from gpufleet.kcache.groups import mounted_child_paths, stored_child_paths
from gpufleet.kcache.model import CacheKind, Target
from tests.kcache_support import (
    ARCHS,
    KERNELS,
    MATMUL_FAMILY,
    CompileReport,
    KernelSpec,
    build_triton_cache,
    compile_again,
    compile_specs,
    group_dirs,
)

pytestmark = pytest.mark.integration

ENTRIES = len(ARCHS) * len(KERNELS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real cache for the tests that only read it."""
    cache = tmp_path_factory.mktemp("reference") / "triton"
    build_triton_cache(cache)
    return cache


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A real cache of this test's own, free to change."""
    cache = tmp_path / "triton"
    build_triton_cache(cache)
    return cache


def rewrite_for(cache: Path, mount_root: Path) -> None:
    """What build and extract do to group files: store them relative, then mount them."""
    for rel in scan(cache).group_files:
        path = cache / rel
        group = rel.parent.as_posix()
        stored = stored_child_paths(path.read_bytes(), group=group, where=str(rel))
        path.write_bytes(mounted_child_paths(stored, group=group, mount_root=str(mount_root)))


def test_a_real_cache_summarizes_both_targets_and_every_kernel(reference: Path) -> None:
    summary = summarize(reference)

    assert summary.kind is CacheKind.TRITON
    assert summary.targets == tuple(Target("cuda", arch, 32) for arch in sorted(ARCHS))
    assert summary.kernel_names == tuple(sorted(KERNELS))
    assert summary.entry_count == ENTRIES


def test_a_real_cache_records_the_triton_version_that_compiled_it(reference: Path) -> None:
    versions = summarize(reference).triton_versions

    assert len(versions) == 1
    assert versions[0].startswith("3.9.")


def test_a_real_cache_size_is_the_sum_of_its_file_sizes(reference: Path) -> None:
    on_disk = [p for p in reference.rglob("*") if p.is_file()]

    assert summarize(reference).size_bytes == sum(p.stat().st_size for p in on_disk)
    assert cache_files(reference, kind=CacheKind.TRITON) == sorted(
        p.relative_to(reference) for p in on_disk
    )


def test_every_group_of_a_real_cache_has_one_group_file_to_rewrite(reference: Path) -> None:
    found = scan(reference).group_files

    assert len(found) == ENTRIES
    assert {p.parent.name for p in found} == group_dirs(reference)


def test_compiling_again_into_an_untouched_cache_only_hits(fresh: Path) -> None:
    before = group_dirs(fresh)

    report = compile_again(fresh)

    assert report == CompileReport(compiled=0, cache_hits=ENTRIES)
    assert group_dirs(fresh) == before


def test_compiling_again_after_deleting_one_group_compiles_just_that_kernel(fresh: Path) -> None:
    before = group_dirs(fresh)
    shutil.rmtree(fresh / sorted(before)[0])

    report = compile_again(fresh)

    assert report == CompileReport(compiled=1, cache_hits=ENTRIES - 1)
    assert group_dirs(fresh) == before


def test_a_moved_cache_whose_group_files_still_name_the_old_path_misses(
    fresh: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(fresh, moved)
    shutil.rmtree(fresh)

    assert compile_again(moved).compiled == ENTRIES


def test_a_moved_cache_with_group_files_rewritten_to_its_new_path_hits(
    fresh: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(fresh, moved)
    shutil.rmtree(fresh)
    rewrite_for(moved, mount_root=moved)
    before = group_dirs(moved)

    report = compile_again(moved)

    assert report == CompileReport(compiled=0, cache_hits=ENTRIES)
    assert group_dirs(moved) == before


def test_a_real_cache_nested_in_a_vllm_tree_gives_the_vllm_summary(
    reference: Path, tmp_path: Path
) -> None:
    rank = tmp_path / "torch_compile_cache" / "d4ec7c2a7d" / "rank_0_0"
    shutil.copytree(reference, rank / "triton_cache")
    (rank / "inductor_cache" / "47").mkdir(parents=True)
    (rank / "inductor_cache" / "47" / "c47v2of4lrhyox6un5t4z2l3xr.py").write_text("# kernel\n")
    (rank / "cache_key_factors.json").write_text('{"code_hash": "0", "env": {}}')
    (rank / "computation_graph.py").write_text("import torch\n")

    summary = summarize(tmp_path)

    assert detect(tmp_path) is CacheKind.VLLM
    assert summary.targets == summarize(reference).targets
    assert summary.entry_count == ENTRIES
    assert len(scan(tmp_path).group_files) == ENTRIES


def test_a_real_cache_nested_in_an_inductor_tree_gives_the_inductor_summary(
    reference: Path, tmp_path: Path
) -> None:
    shutil.copytree(reference, tmp_path / "triton" / "0")
    (tmp_path / "fxgraph" / "ab" / "fabc").mkdir(parents=True)
    (tmp_path / "fxgraph" / "ab" / "fabc" / "entry").write_bytes(b"graph")

    summary = summarize(tmp_path)

    assert summary.kind is CacheKind.INDUCTOR
    assert summary.targets == summarize(reference).targets
    assert summary.kernel_names == tuple(sorted(KERNELS))


def test_matmul_configs_compile_to_hopper_tensor_core_kernels_one_entry_each(
    tmp_path: Path,
) -> None:
    tuned = MATMUL_FAMILY[2]  # 128x128x32, 4 warps, 4 stages
    specs = (tuned, dataclasses.replace(tuned, num_stages=3))
    cache = tmp_path / "triton"

    first = compile_specs(cache, specs)
    again = compile_specs(cache, specs)

    assert first == CompileReport(compiled=2, cache_hits=0)
    assert again == CompileReport(compiled=0, cache_hits=2)
    assert summarize(cache).kernel_names == ("matmul",)
    irs = [path.read_text() for path in cache.glob("*/matmul.ttgir")]
    assert len(irs) == 2
    assert all("ttng.warp_group_dot" in ir for ir in irs)  # tl.dot as sm_90's wgmma


@pytest.mark.parametrize(
    "spec",
    [KernelSpec("matmul", tiles=(128, 128, 32)), KernelSpec("softmax", tiles=(128, 64))],
)
def test_a_spec_with_the_wrong_tiles_for_its_kernel_is_refused_before_compiling(
    spec: KernelSpec, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=spec.kernel):
        compile_specs(tmp_path / "triton", (spec,))

    assert not (tmp_path / "triton").exists()
