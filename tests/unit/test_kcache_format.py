"""Cache detection and strict validation, on small caches written by hand."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from gpufleet.kcache.errors import CacheFormatError
from gpufleet.kcache.format import cache_files, detect, scan, summarize
from gpufleet.kcache.groups import GROUP_PREFIX, group_dir_name
from gpufleet.kcache.model import CacheKind, Target

CUDA_FILES = ("source", "ttir", "ttgir", "llir", "ptx", "cubin")


def write_group(
    cache: Path,
    kernel: str = "add",
    *,
    backend: str = "cuda",
    arch: int | str = 90,
    warp_size: int = 32,
    stages: tuple[str, ...] = CUDA_FILES,
    version: str | None = "3.9.0",
    compiled_at: str = "/home/build/.triton/cache",
) -> Path:
    """One kernel group shaped like Triton's, with absolute child paths from another machine."""
    digest = hashlib.sha256(f"{kernel}-{backend}-{arch}-{warp_size}".encode()).hexdigest()
    group = cache / group_dir_name(digest)
    group.mkdir(parents=True)
    meta: dict[str, Any] = {
        "hash": digest,
        "target": {"backend": backend, "arch": arch, "warp_size": warp_size},
        "num_warps": 4,
        "name": kernel,
    }
    if version is not None:
        meta["triton_version"] = version
    (group / f"{kernel}.json").write_text(json.dumps(meta))
    children = {f"{kernel}.json": f"{compiled_at}/{group.name}/{kernel}.json"}
    for ext in stages:
        (group / f"{kernel}.{ext}").write_bytes(f"{kernel} {ext} {arch}".encode())
        children[f"{kernel}.{ext}"] = f"{compiled_at}/{group.name}/{kernel}.{ext}"
    (group / f"{GROUP_PREFIX}{kernel}.json").write_text(json.dumps({"child_paths": children}))
    return group


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "triton"
    write_group(root, "add", arch=80)
    write_group(root, "add", arch=90)
    write_group(root, "scale", arch=90)
    return root


# -- a valid Triton cache ---------------------------------------------------------------------


def test_a_triton_cache_summarizes_targets_versions_kernels_and_size(cache: Path) -> None:
    summary = summarize(cache)

    sizes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert summary.kind is CacheKind.TRITON
    assert summary.targets == (Target("cuda", 80, 32), Target("cuda", 90, 32))
    assert summary.triton_versions == ("3.9.0",)
    assert summary.entry_count == 3
    assert summary.kernel_names == ("add", "scale")
    assert summary.size_bytes == sizes


def test_a_rocm_group_reports_its_gfx_arch_and_wavefront_size(tmp_path: Path) -> None:
    write_group(tmp_path, backend="hip", arch="gfx90a", warp_size=64, stages=("amdgcn", "hsaco"))

    assert summarize(tmp_path).targets == (Target("hip", "gfx90a", 64),)


def test_cuda_and_rocm_targets_sort_together_without_comparing_int_and_str(tmp_path: Path) -> None:
    write_group(tmp_path, backend="hip", arch="gfx942", warp_size=64, stages=("hsaco",))
    write_group(tmp_path, backend="cuda", arch=90, stages=("cubin",))

    assert summarize(tmp_path).targets == (Target("cuda", 90, 32), Target("hip", "gfx942", 64))


def test_a_kernel_without_a_triton_version_records_none(tmp_path: Path) -> None:
    write_group(tmp_path, version=None)

    assert summarize(tmp_path).triton_versions == ()


def test_cache_files_lists_every_file_sorted_and_relative(cache: Path) -> None:
    files = cache_files(cache, kind=CacheKind.TRITON)

    expected = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert files == expected
    assert all(not p.is_absolute() for p in files)


def test_scan_names_each_group_file_to_rewrite(cache: Path) -> None:
    found = scan(cache).group_files

    assert found == tuple(sorted(p.relative_to(cache) for p in cache.glob(f"*/{GROUP_PREFIX}*")))
    assert len(found) == 3


def test_empty_group_directories_left_by_lookups_are_tolerated(cache: Path) -> None:
    # Triton creates a group directory before it knows whether the compile will succeed.
    (cache / group_dir_name("0" * 64)).mkdir()

    assert summarize(cache).entry_count == 3


def test_autotune_and_launcher_groups_are_part_of_a_triton_cache(cache: Path) -> None:
    autotune = cache / group_dir_name("1" * 64)
    autotune.mkdir()
    (autotune / "matmul.autotune.json").write_text('{"key": [1], "configs_timings": []}')
    launcher = cache / group_dir_name("2" * 64)
    launcher.mkdir()
    (launcher / "cuda_utils.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")

    files = cache_files(cache, kind=CacheKind.TRITON)

    assert Path(autotune.name, "matmul.autotune.json") in files
    assert Path(launcher.name, "cuda_utils.cpython-311-x86_64-linux-gnu.so") in files
    assert summarize(cache).entry_count == 3


# -- what strict validation refuses -----------------------------------------------------------


def test_a_group_named_other_than_base32_of_its_hash_is_refused(cache: Path) -> None:
    group = next(cache.glob("*/add.json")).parent
    wrong = group.rename(cache / group_dir_name("f" * 64))

    with pytest.raises(CacheFormatError, match="base32 of its hash") as caught:
        summarize(cache)
    assert f"{wrong.name}/add.json" in str(caught.value)


def test_a_kernel_json_that_does_not_parse_is_refused_naming_the_file(cache: Path) -> None:
    meta = next(cache.glob("*/scale.json"))
    meta.write_text('{"hash": ')

    with pytest.raises(CacheFormatError, match="not valid JSON") as caught:
        summarize(cache)
    assert str(caught.value).startswith(f"{meta.parent.name}/scale.json:")


@pytest.mark.parametrize(
    ("field", "drop"),
    [
        ("hash", lambda d: d.pop("hash")),
        ("target", lambda d: d.pop("target")),
        ("target.backend", lambda d: d["target"].pop("backend")),
        ("target.arch", lambda d: d["target"].pop("arch")),
        ("target.warp_size", lambda d: d["target"].pop("warp_size")),
        ("name", lambda d: d.pop("name")),
    ],
)
def test_a_kernel_json_missing_a_required_field_is_refused(
    tmp_path: Path, field: str, drop: Any
) -> None:
    meta = write_group(tmp_path) / "add.json"
    edit_json(meta, drop)

    with pytest.raises(CacheFormatError, match=f"'{field}'") as caught:
        summarize(tmp_path)
    assert f"{meta.parent.name}/add.json" in str(caught.value)


def test_a_cuda_arch_given_as_a_string_is_refused(tmp_path: Path) -> None:
    meta = write_group(tmp_path) / "add.json"
    edit_json(meta, lambda d: d["target"].update(arch="sm90"))

    with pytest.raises(CacheFormatError, match=re.escape("target.arch")):
        summarize(tmp_path)


def test_a_kernel_json_describing_another_kernel_is_refused(tmp_path: Path) -> None:
    meta = write_group(tmp_path) / "add.json"
    edit_json(meta, lambda d: d.update(name="mul"))

    with pytest.raises(CacheFormatError, match="'mul'"):
        summarize(tmp_path)


def test_an_unknown_file_in_a_group_is_refused_naming_it(cache: Path) -> None:
    stray = next(cache.glob("*/add.json")).parent / "notes.txt"
    stray.write_text("hello")

    with pytest.raises(CacheFormatError, match="--allow-unknown") as caught:
        summarize(cache)
    assert str(caught.value).startswith(f"{stray.parent.name}/notes.txt:")


def test_an_unknown_file_at_the_root_is_refused(cache: Path) -> None:
    (cache / "README").write_text("hello")

    with pytest.raises(CacheFormatError, match=r"^README: "):
        summarize(cache)


def test_unknown_files_are_packed_and_counted_with_allow_unknown(cache: Path) -> None:
    (cache / "README").write_text("hello")
    (cache / "extras").mkdir()
    (cache / "extras" / "x.bin").write_bytes(b"123")
    before = summarize(cache, allow_unknown=True)

    files = cache_files(cache, kind=CacheKind.TRITON, allow_unknown=True)

    assert Path("README") in files
    assert Path("extras/x.bin") in files
    assert before.entry_count == 3
    assert before.size_bytes == sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def test_a_leftover_temporary_directory_in_a_group_is_unknown(cache: Path) -> None:
    group = next(cache.glob("*/add.json")).parent
    (group / "tmp.pid_12_abc").mkdir()
    (group / "tmp.pid_12_abc" / "add.cubin").write_bytes(b"half")

    with pytest.raises(CacheFormatError, match="interrupted Triton write"):
        summarize(cache)


def test_a_grp_file_referencing_another_group_is_refused(cache: Path) -> None:
    add, scale = next(cache.glob("*/add.json")).parent, next(cache.glob("*/scale.json")).parent
    grp = add / f"{GROUP_PREFIX}add.json"
    edit_json(grp, lambda d: d["child_paths"].update({"add.cubin": f"/x/{scale.name}/add.cubin"}))

    with pytest.raises(CacheFormatError, match="points outside its group") as caught:
        summarize(cache)
    assert f"{add.name}/{GROUP_PREFIX}add.json" in str(caught.value)


def test_a_grp_file_naming_a_child_missing_from_the_group_is_refused(cache: Path) -> None:
    group = next(cache.glob("*/add.json")).parent
    (group / "add.ptx").unlink()

    with pytest.raises(CacheFormatError, match=re.escape("'add.ptx' is not in the group")):
        summarize(cache)


def test_a_group_without_its_grp_file_is_refused(cache: Path) -> None:
    group = next(cache.glob("*/add.json")).parent
    (group / f"{GROUP_PREFIX}add.json").unlink()

    with pytest.raises(CacheFormatError, match=f"needs exactly {GROUP_PREFIX}add.json"):
        summarize(cache)


@pytest.mark.parametrize("child", ["../add.cubin", "sub/add.cubin", "..", ""])
def test_a_grp_child_that_is_not_a_plain_file_name_is_refused(cache: Path, child: str) -> None:
    group = next(cache.glob("*/add.json")).parent
    grp = group / f"{GROUP_PREFIX}add.json"
    edit_json(grp, lambda d: d["child_paths"].update({child: f"/x/{group.name}/add.cubin"}))

    with pytest.raises(CacheFormatError, match="not a plain file name"):
        summarize(cache)


def test_a_symlink_in_the_cache_is_refused_even_with_allow_unknown(cache: Path) -> None:
    group = next(cache.glob("*/add.json")).parent
    (group / "add.cubin").unlink()
    (group / "add.cubin").symlink_to("/etc/passwd")

    with pytest.raises(CacheFormatError, match="symbolic link") as caught:
        summarize(cache, allow_unknown=True)
    assert f"{group.name}/add.cubin" in str(caught.value)


def test_a_symlinked_directory_in_the_cache_is_refused(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (cache / group_dir_name("3" * 64)).symlink_to(tmp_path / "elsewhere")

    with pytest.raises(CacheFormatError, match="symbolic link"):
        cache_files(cache, kind=CacheKind.TRITON, allow_unknown=True)


def test_a_fifo_in_the_cache_is_refused(cache: Path) -> None:
    os.mkfifo(cache / "pipe")

    with pytest.raises(CacheFormatError, match=r"^pipe: .*FIFO"):
        summarize(cache, allow_unknown=True)


# -- detection --------------------------------------------------------------------------------


def test_a_directory_of_kernel_groups_is_detected_as_triton(cache: Path) -> None:
    assert detect(cache) is CacheKind.TRITON


def test_an_inductor_cache_is_detected(tmp_path: Path) -> None:
    write_group(tmp_path / "triton" / "0")
    (tmp_path / "fxgraph").mkdir()

    assert detect(tmp_path) is CacheKind.INDUCTOR


def test_a_vllm_cache_root_is_detected(tmp_path: Path) -> None:
    (tmp_path / "torch_compile_cache" / "d4ec7c2a7d" / "rank_0_0").mkdir(parents=True)

    assert detect(tmp_path) is CacheKind.VLLM


def test_vllms_torch_compile_cache_directory_itself_is_detected(tmp_path: Path) -> None:
    (tmp_path / "d4ec7c2a7d" / "rank_0_0").mkdir(parents=True)

    assert detect(tmp_path) is CacheKind.VLLM


def test_a_directory_that_is_no_cache_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()

    with pytest.raises(CacheFormatError, match="not a Triton, vLLM or Inductor cache") as caught:
        detect(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_a_missing_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(CacheFormatError, match="is not a directory"):
        summarize(tmp_path / "absent")


# -- Inductor and vLLM ------------------------------------------------------------------------


def inductor_tree(root: Path) -> None:
    write_group(root / "triton" / "0", "triton_poi_fused_add_0", arch=90)
    write_group(root / "triton" / "1", "triton_poi_fused_add_0", arch=80)
    (root / "fxgraph" / "ab" / "fabcdef").mkdir(parents=True)
    (root / "fxgraph" / "ab" / "fabcdef" / "entry").write_bytes(b"pickled graph")
    (root / "aotautograd" / "aabc").mkdir(parents=True)
    (root / "aotautograd" / "aabc" / "entry").write_bytes(b"pickled entry")
    (root / "locks").mkdir()
    (root / "locks" / "cxyz.lock").write_bytes(b"")
    (root / "47").mkdir()
    (root / "47" / "c47v2of4lrhyox6un5t4z2l3xrtqx.py").write_text("# generated kernel")
    (root / "47" / "fd2fb184b9eecb80.best_config").write_text('{"XBLOCK": 128}')


def test_an_inductor_cache_takes_its_targets_from_the_nested_triton_caches(tmp_path: Path) -> None:
    inductor_tree(tmp_path)

    summary = summarize(tmp_path)

    assert summary.kind is CacheKind.INDUCTOR
    assert summary.targets == (Target("cuda", 80, 32), Target("cuda", 90, 32))
    assert summary.kernel_names == ("triton_poi_fused_add_0",)
    assert summary.entry_count == 2
    assert Path("fxgraph/ab/fabcdef/entry") in cache_files(tmp_path, kind=CacheKind.INDUCTOR)


def test_an_inductor_cache_validates_its_triton_groups_strictly(tmp_path: Path) -> None:
    inductor_tree(tmp_path)
    meta = next((tmp_path / "triton" / "1").glob("*/triton_poi_fused_add_0.json"))
    edit_json(meta, lambda d: d.pop("target"))

    with pytest.raises(CacheFormatError, match="'target'") as caught:
        summarize(tmp_path)
    assert str(caught.value).startswith(f"triton/1/{meta.parent.name}/")


def test_an_unknown_directory_in_an_inductor_cache_is_refused(tmp_path: Path) -> None:
    inductor_tree(tmp_path)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "x").write_text("x")

    with pytest.raises(CacheFormatError, match=r"^scratch: not part of an Inductor cache"):
        summarize(tmp_path)


def vllm_rank(rank: Path) -> None:
    write_group(rank / "triton_cache", "triton_poi_fused_cat_0", arch=90)
    inductor_tree(rank / "inductor_cache")
    (rank / "cache_key_factors.json").write_text('{"code_hash": "abc", "env": {}}')
    (rank / "computation_graph.py").write_text("import torch\n")
    (rank / "vllm_compile_cache.py").write_text("{}\n")


def test_a_vllm_cache_summarizes_every_nested_triton_cache(tmp_path: Path) -> None:
    vllm_rank(tmp_path / "torch_compile_cache" / "d4ec7c2a7d" / "rank_0_0")
    (tmp_path / "modelinfos").mkdir()
    (tmp_path / "modelinfos" / "llama.json").write_text("{}")

    summary = summarize(tmp_path)

    assert summary.kind is CacheKind.VLLM
    assert summary.targets == (Target("cuda", 80, 32), Target("cuda", 90, 32))
    assert summary.kernel_names == ("triton_poi_fused_add_0", "triton_poi_fused_cat_0")
    assert summary.entry_count == 3


def test_a_vllm_prefix_directory_with_binary_artifacts_is_accepted(tmp_path: Path) -> None:
    backbone = tmp_path / "4bce7ae4f8" / "rank_0_0" / "backbone"
    backbone.mkdir(parents=True)
    (backbone / "cache_key_factors.json").write_text('{"env": {}}')
    (backbone / "artifact_compile_range_1_2048_subgraph_0").write_bytes(b"blob")

    summary = summarize(tmp_path)

    # Binary artifacts bundle their kernels: no Triton group tells us the target.
    assert summary.targets == ()
    assert summary.size_bytes == len(b'{"env": {}}') + len(b"blob")


def test_an_unknown_file_in_a_vllm_rank_directory_is_refused(tmp_path: Path) -> None:
    rank = tmp_path / "torch_compile_cache" / "d4ec7c2a7d" / "rank_0_0"
    vllm_rank(rank)
    (rank / "core.1234").write_bytes(b"\0")

    where = re.escape("torch_compile_cache/d4ec7c2a7d/rank_0_0/core.1234: ")
    with pytest.raises(CacheFormatError, match=f"^{where}"):
        summarize(tmp_path)


def test_a_vllm_cache_key_factors_file_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    rank = tmp_path / "d4ec7c2a7d" / "rank_0_0"
    vllm_rank(rank)
    (rank / "cache_key_factors.json").write_text("{")

    with pytest.raises(
        CacheFormatError, match=re.escape("d4ec7c2a7d/rank_0_0/cache_key_factors.json")
    ):
        summarize(tmp_path)
