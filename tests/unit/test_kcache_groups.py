"""Triton's kernel groups: the group directory's name, the rewriting of ``__grp__`` child paths."""

from __future__ import annotations

import json

import pytest

from gpufleet.kcache.errors import CacheFormatError
from gpufleet.kcache.groups import group_dir_name, mounted_child_paths, stored_child_paths

# A real pair seen in a Triton 3.9 cache: the add kernel compiled for cuda/90.
REAL_HASH = "234cc9795951a87a2a318afe2dc1aab03188242a2b91fed862b7add3f67ca73a"
REAL_GROUP = "ENGMS6KZKGUHUKRRRL7C3QNKWAYYQJBKFOI75WDCW6W5H5T4U45A"


def grp_bytes(children: dict[str, str]) -> bytes:
    return json.dumps({"child_paths": children}).encode()


# -- group names ------------------------------------------------------------------------------


def test_group_dir_name_is_base32_of_the_hash_bytes_without_padding() -> None:
    assert group_dir_name(REAL_HASH) == REAL_GROUP


@pytest.mark.parametrize("bad", ["", "abc", REAL_HASH.upper(), REAL_HASH + "00", "z" * 64])
def test_group_dir_name_refuses_anything_but_a_sha256_hex_digest(bad: str) -> None:
    with pytest.raises(CacheFormatError, match="sha256"):
        group_dir_name(bad)


# -- rewriting __grp__ child paths ------------------------------------------------------------

GROUP = "O72LHMMYS3IW26NVUTT47BXIPYO466KQOT5J76NWWR7UFRTQLK7A"
ORIGINAL = grp_bytes(
    {
        "scale.ttir": f"/home/build/.triton/cache/{GROUP}/scale.ttir",
        "scale.json": f"/home/build/.triton/cache/{GROUP}/scale.json",
        "scale.cubin": f"/home/build/.triton/cache/{GROUP}/scale.cubin",
    }
)


def test_stored_child_paths_are_relative_to_the_cache_root() -> None:
    stored = json.loads(stored_child_paths(ORIGINAL, group=GROUP))

    assert stored == {
        "child_paths": {
            "scale.cubin": f"{GROUP}/scale.cubin",
            "scale.json": f"{GROUP}/scale.json",
            "scale.ttir": f"{GROUP}/scale.ttir",
        }
    }


def test_mounted_child_paths_sit_under_the_mount_root() -> None:
    stored = stored_child_paths(ORIGINAL, group=GROUP)

    mounted = json.loads(mounted_child_paths(stored, group=GROUP, mount_root="/var/cache/k/"))

    assert mounted["child_paths"]["scale.cubin"] == f"/var/cache/k/{GROUP}/scale.cubin"
    assert len(mounted["child_paths"]) == 3


def test_a_nested_group_keeps_its_path_inside_the_cache_root() -> None:
    group = f"torch_compile_cache/d4ec7c2a7d/rank_0_0/triton_cache/{GROUP}"

    mounted = json.loads(mounted_child_paths(ORIGINAL, group=group, mount_root="/vllm"))

    assert mounted["child_paths"]["scale.json"] == f"/vllm/{group}/scale.json"


def test_stored_and_mounted_rewrites_round_trip() -> None:
    stored = stored_child_paths(ORIGINAL, group=GROUP)
    mounted = mounted_child_paths(stored, group=GROUP, mount_root="/mnt/c")

    assert stored_child_paths(mounted, group=GROUP) == stored


def test_rewrites_are_deterministic_whatever_the_input_order() -> None:
    children = json.loads(ORIGINAL)["child_paths"]
    reordered = grp_bytes(dict(reversed(list(children.items()))))

    stored = stored_child_paths(ORIGINAL, group=GROUP)

    assert stored_child_paths(reordered, group=GROUP) == stored
    assert b" " not in stored  # compact separators
    assert list(json.loads(stored)["child_paths"]) == sorted(children)


@pytest.mark.parametrize("child", ["../evil", "a/b", "..", "."])
def test_a_rewrite_refuses_a_child_that_is_not_a_plain_file_name(child: str) -> None:
    data = grp_bytes({child: f"/x/{GROUP}/{child}"})

    with pytest.raises(CacheFormatError, match="not a plain file name"):
        stored_child_paths(data, group=GROUP)


def test_a_rewrite_refuses_a_child_from_another_group() -> None:
    data = grp_bytes({"add.json": "/x/SOMEOTHERGROUP/add.json"})

    with pytest.raises(CacheFormatError, match="points outside its group"):
        mounted_child_paths(data, group=GROUP, mount_root="/m")


@pytest.mark.parametrize("data", [b"{", b"[]", b'{"child_paths": []}', b'{"child_paths": {}}'])
def test_a_rewrite_refuses_a_malformed_grp_file_naming_it(data: bytes) -> None:
    with pytest.raises(CacheFormatError, match=f"^{GROUP}/__grp__add.json: "):
        stored_child_paths(data, group=GROUP, where=f"{GROUP}/__grp__add.json")


@pytest.mark.parametrize("group", ["", "/abs", "a/../b", "a//b", "."])
def test_a_rewrite_refuses_a_group_outside_the_cache(group: str) -> None:
    with pytest.raises(CacheFormatError, match="relative path inside the cache"):
        stored_child_paths(ORIGINAL, group=group)


@pytest.mark.parametrize("mount_root", ["relative/dir", "/a/../b", "/a/./b", ""])
def test_a_rewrite_refuses_a_mount_root_that_is_not_absolute_and_normal(mount_root: str) -> None:
    with pytest.raises(CacheFormatError, match="mount root"):
        mounted_child_paths(ORIGINAL, group=GROUP, mount_root=mount_root)
