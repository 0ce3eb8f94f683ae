"""MCV's layer layouts and kernel-list manifests through `extract_layer`, and MCV's labels.

The layers are made by hand here, in MCV's form (tests/kcache_mcv.py); the
real-registry round trip with a real Triton cache is in
tests/integration/test_kcache_mcv_images.py.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from gpufleet.kcache.errors import CacheFormatError, UnsafeArchiveError
from gpufleet.kcache.extract import Extracted, extract_layer
from gpufleet.kcache.groups import group_dir_name
from gpufleet.kcache.labels import summary_from_labels
from gpufleet.kcache.model import CacheKind, Target
from tests.kcache_mcv import Member, member, tar_gzip

MOUNT = "/mnt/kernels"
BUILD = "/root/.triton/cache"


def kernel(name: str) -> tuple[list[Member], dict[str, object], int]:
    """One Triton kernel group as MCV packs it: members, kernel-list entry, bytes."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    group = group_dir_name(digest)
    files = {f"{name}.cubin": b"\x7fELF" + name.encode() * 50, f"{name}.json": b"{}"}
    children = {f: f"{BUILD}/{group}/{f}" for f in files}  # the build machine's absolute paths
    files[f"__grp__{name}.json"] = json.dumps({"child_paths": children}).encode()
    members = [member(f"io.triton.cache/{group}/")]
    members += [member(f"io.triton.cache/{group}/{f}", data) for f, data in files.items()]
    entry = {"hash": digest, "backend": "cuda", "arch": "90", "warp_size": 32, "dummy_key": "k"}
    return members, entry, sum(len(d) for d in files.values())


def triton_layer(
    names: tuple[str, ...] = ("add", "scale"), *, listed: list[dict[str, object]] | None = None
) -> tuple[bytes, int, int]:
    """A Triton layer in MCV's layout: the layer, its cache bytes, its kernel count."""
    members: list[Member] = [member("io.triton.cache/")]
    entries, total = [], 0
    for name in names:
        more, entry, size = kernel(name)
        members += more
        entries.append(entry)
        total += size
    doc = {"triton": entries if listed is None else listed}
    members += [
        member("io.triton.manifest/"),
        member("io.triton.manifest/manifest.json", json.dumps(doc).encode()),
    ]
    return tar_gzip(members)[0], total, len(entries)


def vllm_layer(hashes: tuple[str, ...] = ("edf531ca35", "4bce7ae4f8")) -> tuple[bytes, int]:
    members: list[Member] = [member("io.vllm.cache/"), member("io.vllm.cache/torch_compile_cache/")]
    total = 0
    for h in hashes:
        base = f"io.vllm.cache/torch_compile_cache/{h}/rank_0_0/backbone"
        for path, data in (
            (f"{base}/computation_graph.py", b"graph = 1\n"),
            (f"{base}/vllm_compile_cache.py", b"{}\n"),
        ):
            members.append(member(path, data))
            total += len(data)
    doc = {"vllm": [{"vllmHash": h, "cacheFormat": "binary"} for h in hashes]}
    members += [member("io.vllm.manifest/manifest.json", json.dumps(doc).encode())]
    return tar_gzip(members)[0], total


def extract(layer: bytes, dest: Path, **kwargs: object) -> Extracted:
    return extract_layer(io.BytesIO(layer), dest, mount_root=MOUNT, **kwargs)  # type: ignore[arg-type]


def test_an_mcv_triton_layer_lands_at_the_cache_root_with_its_group_files_rewritten(
    tmp_path: Path,
) -> None:
    layer, size, count = triton_layer()

    done = extract(layer, tmp_path / "out", expected_size=size, expected_entries=count)

    group = group_dir_name(hashlib.sha256(b"add").hexdigest())
    grp = json.loads((tmp_path / "out" / group / "__grp__add.json").read_bytes())
    assert grp["child_paths"]["add.cubin"] == f"{MOUNT}/{group}/add.cubin"
    assert done.bytes == size
    assert done.manifest["triton"][0]["arch"] == "90"  # type: ignore[index]


def test_an_mcv_manifest_without_a_size_label_to_check_is_refused(tmp_path: Path) -> None:
    layer, _, _ = triton_layer()

    with pytest.raises(CacheFormatError, match=r"kernel list.*cache-size-bytes label is needed"):
        extract(layer, tmp_path / "out", expected_size=None)

    assert not (tmp_path / "out").exists()


def test_an_mcv_layer_one_byte_short_of_its_size_label_is_refused_and_removed(
    tmp_path: Path,
) -> None:
    layer, size, _ = triton_layer()

    with pytest.raises(CacheFormatError, match=f"hold {size} bytes.*says {size + 1}"):
        extract(layer, tmp_path / "out", expected_size=size + 1)

    assert not (tmp_path / "out").exists()


def test_an_mcv_entry_count_that_disagrees_with_the_kernel_list_is_refused(
    tmp_path: Path,
) -> None:
    layer, size, count = triton_layer()

    with pytest.raises(CacheFormatError, match=f"lists {count} kernels.*entry-count label says 3"):
        extract(layer, tmp_path / "out", expected_size=size, expected_entries=3)


def test_a_kernel_list_naming_a_group_the_layer_lacks_is_refused(tmp_path: Path) -> None:
    _, entry, _ = kernel("other")
    layer, size, _ = triton_layer(("add",), listed=[entry])

    with pytest.raises(CacheFormatError, match="does not hold"):
        extract(layer, tmp_path / "out", expected_size=size)


def test_a_kernel_list_shorter_than_the_groups_in_the_layer_is_refused(tmp_path: Path) -> None:
    _, entry, _ = kernel("add")
    layer, size, _ = triton_layer(("add", "scale"), listed=[entry])

    with pytest.raises(CacheFormatError, match="lists 1 kernels, the layer holds 2"):
        extract(layer, tmp_path / "out", expected_size=size)


def test_an_mcv_vllm_layer_lands_at_the_cache_root_and_counts_its_hash_directories(
    tmp_path: Path,
) -> None:
    layer, size = vllm_layer()

    extract(layer, tmp_path / "out", expected_size=size, expected_entries=2)

    assert (tmp_path / "out" / "torch_compile_cache" / "edf531ca35" / "rank_0_0").is_dir()
    with pytest.raises(CacheFormatError, match=r"2 vLLM hash directories.*says 5"):
        extract(layer, tmp_path / "again", expected_size=size, expected_entries=5)


def test_a_layer_mixing_the_triton_and_vllm_prefixes_is_refused(tmp_path: Path) -> None:
    layer, _ = tar_gzip([member("io.vllm.cache/a.py", b"x"), member("io.triton.cache/b", b"y")])

    with pytest.raises(UnsafeArchiveError, match=r"'io\.triton\.cache/b'.*one pair only"):
        extract(layer, tmp_path / "out", expected_size=2)


@pytest.mark.parametrize(
    "name", ["io.vllm.cachex/a", "io.vllm.manifest/other.json", "io.vllm/x", "./io.vllm.cache/a"]
)
def test_vllm_members_outside_mcvs_layout_are_refused(tmp_path: Path, name: str) -> None:
    layer, _ = tar_gzip([member(name, b"x")])

    with pytest.raises(UnsafeArchiveError, match="layer member"):
        extract(layer, tmp_path / "out", expected_size=1)


def test_mcv_vllm_labels_give_a_vllm_summary_with_the_triton_targets() -> None:
    summary = summary_from_labels(
        {
            "cache.vllm.image/summary": json.dumps(
                {"targets": [{"backend": "cuda", "arch": "90", "warp_size": 32}]}
            ),
            "cache.vllm.image/entry-count": "2",
            "cache.vllm.image/cache-size-bytes": "1234",
        }
    )

    assert (summary.kind, summary.targets) == (CacheKind.VLLM, (Target("cuda", 90, 32),))
    assert (summary.entry_count, summary.size_bytes) == (2, 1234)
