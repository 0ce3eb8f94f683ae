"""Reproducible cache images: same content, same digest; labels, manifest and layer as specified."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.kcache.errors import CacheFormatError
from gpufleet.kcache.image import (
    CONFIG_MEDIA_TYPE,
    DEFAULT_MOUNT_ROOT,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    BuiltImage,
    build_image,
)
from gpufleet.kcache.labels import labels_of, summary_from_labels
from gpufleet.kcache.model import CacheKind, CacheSummary, Target
from tests.kcache_support import STAGES, write_cache, write_group


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return write_cache(tmp_path / "cache")


def build(cache: Path, work: Path, **kwargs: object) -> BuiltImage:
    return build_image(cache, work, **kwargs)  # type: ignore[arg-type]


def layer_members(image: BuiltImage) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(image.layer_path, "r:gz") as tar:
        for member in tar:
            handle = tar.extractfile(member)
            yield member, None if handle is None else handle.read()


def stored(image: BuiltImage) -> dict[str, bytes]:
    return {m.name: data for m, data in layer_members(image) if data is not None}


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# -- reproducibility -----------------------------------------------------------------------------


def test_the_same_directory_builds_byte_identical_images(cache: Path, tmp_path: Path) -> None:
    first = build(cache, tmp_path / "one")
    second = build(cache, tmp_path / "two")

    assert second.manifest_digest == first.manifest_digest
    assert (second.manifest, second.config) == (first.manifest, first.config)
    assert second.layer_path.read_bytes() == first.layer_path.read_bytes()


def test_mtimes_modes_umask_and_creation_order_leave_the_digest_unchanged(
    cache: Path, tmp_path: Path, umask: None
) -> None:
    other = write_cache(tmp_path / "other", order=tuple(reversed(STAGES)))
    for i, path in enumerate(sorted(other.rglob("*"))):
        if path.is_file():
            path.chmod(0o755 if i % 2 else 0o600)  # the executable bit too: it is not kept
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))

    assert (
        build(other, tmp_path / "b").manifest_digest == build(cache, tmp_path / "a").manifest_digest
    )


def test_a_cache_compiled_at_another_path_gives_the_same_digest(tmp_path: Path) -> None:
    here = write_group(tmp_path / "here", "add", 90).parent
    there = write_group(tmp_path / "there", "add", 90, compiled_at=Path("/home/ci/.triton")).parent

    assert (
        build(here, tmp_path / "a").manifest_digest == build(there, tmp_path / "b").manifest_digest
    )


def test_changing_one_byte_changes_every_digest(cache: Path, tmp_path: Path) -> None:
    before = build(cache, tmp_path / "before")
    cubin = next(cache.rglob("add.cubin"))
    data = bytearray(cubin.read_bytes())
    data[0] ^= 1
    cubin.write_bytes(bytes(data))

    after = build(cache, tmp_path / "after")

    assert after.layer_digest != before.layer_digest
    assert after.manifest_digest != before.manifest_digest


def test_the_mount_root_is_part_of_the_image(cache: Path, tmp_path: Path) -> None:
    default = build(cache, tmp_path / "a")
    elsewhere = build(cache, tmp_path / "b", mount_root="/mnt/kernels")

    assert elsewhere.layer_digest == default.layer_digest
    assert elsewhere.manifest_digest != default.manifest_digest


# -- config and labels ---------------------------------------------------------------------------


def test_labels_are_mcvs_three_and_gpufleets_four(cache: Path, tmp_path: Path) -> None:
    image = build(cache, tmp_path / "w", mount_root="/mnt/k")
    size = sum(len(data) for name, data in stored(image).items() if name.startswith("io.triton.c"))

    assert image.labels == {
        "cache.triton.image/summary": '{"targets":[{"arch":"80","backend":"cuda","warp_size":32},'
        '{"arch":"90","backend":"cuda","warp_size":32}]}',
        "cache.triton.image/entry-count": "3",
        "cache.triton.image/cache-size-bytes": str(size),
        "io.gpufleet.kcache/cache-type": "triton",
        "io.gpufleet.kcache/summary": '{"entry_count":3,"kernel_names":["add","scale"],'
        f'"kind":"triton","size_bytes":{size},"targets":[{{"arch":80,"backend":"cuda",'
        '"warp_size":32},{"arch":90,"backend":"cuda","warp_size":32}],'
        '"triton_versions":["3.9.0"]}',
        "io.gpufleet.kcache/triton-version": "3.9.0",
        "io.gpufleet.kcache/mount-root": "/mnt/k",
    }


def test_the_size_label_counts_group_files_as_stored_not_as_on_disk(
    cache: Path, tmp_path: Path
) -> None:
    on_disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    image = build(cache, tmp_path / "w")

    assert image.summary.size_bytes < on_disk  # relative child paths are shorter
    assert image.labels["cache.triton.image/cache-size-bytes"] == str(image.summary.size_bytes)


def test_the_summary_round_trips_through_the_config(cache: Path, tmp_path: Path) -> None:
    image = build(cache, tmp_path / "w")

    assert labels_of(image.config) == dict(image.labels)
    assert summary_from_labels(labels_of(image.config)) == image.summary
    assert image.summary.targets == (Target("cuda", 80, 32), Target("cuda", 90, 32))


def test_the_config_is_a_timeless_oci_config_naming_the_uncompressed_layer(
    cache: Path, tmp_path: Path
) -> None:
    image = build(cache, tmp_path / "w")
    config = json.loads(image.config)
    diff_id = hashlib.sha256(gzip.decompress(image.layer_path.read_bytes())).hexdigest()

    assert config["created"] == "1970-01-01T00:00:00Z"
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]}
    assert image.config == json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def test_the_manifest_describes_one_config_and_one_layer_by_digest_and_size(
    cache: Path, tmp_path: Path
) -> None:
    image = build(cache, tmp_path / "w")
    manifest = json.loads(image.manifest)
    layer = image.layer_path.read_bytes()

    assert manifest == {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": f"sha256:{hashlib.sha256(image.config).hexdigest()}",
            "size": len(image.config),
        },
        "layers": [
            {
                "mediaType": LAYER_MEDIA_TYPE,
                "digest": f"sha256:{hashlib.sha256(layer).hexdigest()}",
                "size": len(layer),
            }
        ],
    }
    assert image.manifest_digest == f"sha256:{hashlib.sha256(image.manifest).hexdigest()}"
    assert image.layer_path.name == image.layer_digest.removeprefix("sha256:")


# -- the layer -----------------------------------------------------------------------------------


def test_the_gzip_header_holds_no_mtime_and_no_file_name(cache: Path, tmp_path: Path) -> None:
    header = build(cache, tmp_path / "w").layer_path.read_bytes()[:10]

    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] & 0x08 == 0  # FNAME
    assert header[4:8] == b"\x00\x00\x00\x00"  # MTIME


def test_tar_entries_are_sorted_explicit_and_carry_nothing_of_the_build_machine(
    cache: Path, tmp_path: Path
) -> None:
    (cache / os.listdir(cache)[0]).chmod(0o700)
    members = [m for m, _ in layer_members(build(cache, tmp_path / "w"))]
    names = [m.name for m in members]

    assert names == sorted(names, key=lambda n: n.split("/"))
    assert names[0] == "io.triton.cache"
    assert names[-2:] == ["io.triton.manifest", "io.triton.manifest/manifest.json"]
    for member in members:
        assert (member.uid, member.gid, member.uname, member.gname, member.mtime) == (
            0,
            0,
            "",
            "",
            0,
        )
        assert member.mode == (0o755 if member.isdir() else 0o644)
        assert member.isdir() or member.isreg()
    group_dirs = {m.name for m in members if m.isdir()}
    assert all(n.rsplit("/", 1)[0] in group_dirs for n in names if "/" in n)


def test_group_files_are_stored_with_paths_relative_to_the_cache_root(
    cache: Path, tmp_path: Path
) -> None:
    files = stored(build(cache, tmp_path / "w"))
    groups = {n: d for n, d in files.items() if n.rsplit("/", 1)[1].startswith("__grp__")}

    assert len(groups) == 3
    for name, data in groups.items():
        group = name.split("/")[1]
        children = json.loads(data)["child_paths"]
        assert children == {child: f"{group}/{child}" for child in children}


def test_a_nested_group_is_stored_relative_to_the_cache_root_not_to_its_triton_cache(
    tmp_path: Path,
) -> None:
    root = tmp_path / "inductor"
    group = write_group(root / "triton" / "0", "add", 90)
    image = build(root, tmp_path / "w")

    grp = json.loads(stored(image)[f"io.triton.cache/triton/0/{group.name}/__grp__add.json"])
    assert grp["child_paths"]["add.cubin"] == f"triton/0/{group.name}/add.cubin"
    assert image.labels["io.gpufleet.kcache/cache-type"] == "inductor"


def test_manifest_json_lists_every_stored_file_with_its_size_and_sha256(
    cache: Path, tmp_path: Path
) -> None:
    files = stored(build(cache, tmp_path / "w"))
    manifest = json.loads(files.pop("io.triton.manifest/manifest.json"))

    assert manifest == {
        "schemaVersion": 1,
        "cacheType": "triton",
        "files": [
            {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(files.items(), key=lambda item: item[0].split("/"))
        ],
    }
    assert len(manifest["files"]) == 3 * 8


def test_the_layer_is_written_to_the_workdir_not_held_in_memory(
    cache: Path, tmp_path: Path
) -> None:
    image = build(cache, tmp_path / "w")

    assert image.layer_path.parent == tmp_path / "w" / "blobs" / "sha256"
    assert image.layer_size == image.layer_path.stat().st_size
    assert os.listdir(image.layer_path.parent) == [image.layer_path.name]  # no temp file left


# -- refusals ------------------------------------------------------------------------------------


def test_a_symlink_in_the_cache_is_refused_at_build(cache: Path, tmp_path: Path) -> None:
    group = next(p for p in cache.iterdir() if p.is_dir())
    (group / "add.ptx").unlink()
    (group / "add.ptx").symlink_to("/etc/passwd")

    with pytest.raises(CacheFormatError, match=r"add\.ptx.*symbolic link"):
        build(cache, tmp_path / "w")
    assert not list((tmp_path / "w").rglob("*"))


@pytest.mark.parametrize("mount_root", ["relative/path", "/a/../b", "/a//b", "/a/", ""])
def test_a_mount_root_that_is_not_absolute_and_normal_is_refused(
    cache: Path, tmp_path: Path, mount_root: str
) -> None:
    with pytest.raises(CacheFormatError, match="mount root"):
        build(cache, tmp_path / "w", mount_root=mount_root)


def test_the_default_mount_root_is_where_the_agent_mounts_caches() -> None:
    assert DEFAULT_MOUNT_ROOT == "/var/cache/gpufleet/kernels"


# -- labels of remote images ---------------------------------------------------------------------


def test_an_mcv_built_image_is_summarized_from_mcvs_labels_alone() -> None:
    labels = {
        "cache.triton.image/summary": '{"targets":[{"backend":"hip","arch":"gfx942",'
        '"warp_size":64},{"backend":"cuda","arch":"90","warp_size":32}]}',
        "cache.triton.image/entry-count": "12",
        "cache.triton.image/cache-size-bytes": "4096",
    }

    assert summary_from_labels(labels) == CacheSummary(
        kind=CacheKind.TRITON,
        targets=(Target("cuda", 90, 32), Target("hip", "gfx942", 64)),
        triton_versions=(),
        entry_count=12,
        size_bytes=4096,
        kernel_names=(),
    )


def test_an_image_without_cache_labels_is_not_a_cache_image() -> None:
    with pytest.raises(CacheFormatError, match="not a kernel cache image"):
        summary_from_labels(labels_of(b'{"config":{"Labels":{"a":"b"}}}'))


def test_labels_that_contradict_each_other_are_refused(cache: Path, tmp_path: Path) -> None:
    labels = dict(build(cache, tmp_path / "w").labels)
    labels["cache.triton.image/cache-size-bytes"] = "1"

    with pytest.raises(CacheFormatError, match="cache-size-bytes"):
        summary_from_labels(labels)


@pytest.mark.parametrize(
    ("label", "value"),
    [
        ("io.gpufleet.kcache/summary", "{not json"),
        ("io.gpufleet.kcache/summary", '{"kind":"triton"}'),
        (
            "io.gpufleet.kcache/summary",
            '{"kind":"npu","targets":[],"triton_versions":[],'
            '"kernel_names":[],"entry_count":0,"size_bytes":0}',
        ),
        ("cache.triton.image/entry-count", "-3"),
    ],
)
def test_a_malformed_label_is_refused_naming_it(
    cache: Path, tmp_path: Path, label: str, value: str
) -> None:
    labels = dict(build(cache, tmp_path / "w").labels)
    labels[label] = value

    with pytest.raises(CacheFormatError, match=label):
        summary_from_labels(labels)


@pytest.mark.parametrize(
    "config", [b"not json", b'{"config":{"Labels":{"a":1}}}', b'{"config":{"Labels":[]}}']
)
def test_a_config_whose_labels_are_not_strings_is_refused(config: bytes) -> None:
    with pytest.raises(CacheFormatError, match="config"):
        labels_of(config)


def test_a_config_without_labels_has_none() -> None:
    assert labels_of(b'{"architecture":"amd64","config":{}}') == {}
    assert labels_of(json.dumps({"config": {"Labels": None}}).encode()) == {}


def test_the_layer_bytes_are_a_pure_function_of_content_and_gzip_level(
    cache: Path, tmp_path: Path
) -> None:
    layer = build(cache, tmp_path / "w").layer_path.read_bytes()
    plain = gzip.decompress(layer)
    again = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=again, mtime=0, compresslevel=6) as gz:
        gz.write(plain)

    assert again.getvalue() == layer
