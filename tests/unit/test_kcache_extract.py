"""Safe extraction: a round trip through a real build, and hostile layers crafted by hand.

Every hostile layer is extracted into ``<tmp>/sandbox/dest``: the refusal must name
the member, leave ``dest`` empty and write nothing beside it (in ``sandbox``) or
anywhere else under the test's temporary directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from gpufleet.kcache.errors import (
    CacheFormatError,
    DigestMismatchError,
    KcacheError,
    UnsafeArchiveError,
)
from gpufleet.kcache.extract import DEFAULT_MAX_ENTRIES, Extracted, extract_layer
from gpufleet.kcache.groups import group_dir_name
from gpufleet.kcache.image import BuiltImage, build_image

MOUNT = "/mnt/kernels"
Member = tuple[tarfile.TarInfo, bytes | None]

# -- building layers -----------------------------------------------------------------------------


def info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **attrs: object
) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = size
    member.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(member, key, value)
    return member


def node(name: str, kind: bytes, **attrs: object) -> Member:
    """A member without data: a link, a device, a FIFO."""
    return info(name, kind, **attrs), None


def file(name: str, data: bytes = b"kernel", **attrs: object) -> Member:
    return info(name, size=len(data), **attrs), data


def directory(name: str, **attrs: object) -> Member:
    return info(name, tarfile.DIRTYPE, **attrs), None


def manifest(files: dict[str, bytes]) -> Member:
    listed = [
        {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in files.items()
    ]
    doc = {"schemaVersion": 1, "cacheType": "triton", "files": listed}
    return file("io.triton.manifest/manifest.json", json.dumps(doc).encode())


def tar_bytes(members: list[Member], fmt: int = tarfile.PAX_FORMAT, **kwargs: object) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, **kwargs) as tar:  # type: ignore[call-overload]
        for member, data in members:
            tar.addfile(member, None if data is None else io.BytesIO(data))
    return out.getvalue()


def layer(members: list[Member], *, trailing: bytes = b"", **kwargs: object) -> bytes:
    return gzip.compress(tar_bytes(members, **kwargs) + trailing, compresslevel=1, mtime=0)


def valid(files: dict[str, bytes], **kwargs: object) -> bytes:
    """A well-formed layer holding `files` (full member names) and their manifest."""
    return layer([file(name, data) for name, data in files.items()] + [manifest(files)], **kwargs)


def extract(data: bytes | io.BytesIO, dest: Path, **kwargs: object) -> Extracted:
    stream = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    kwargs.setdefault("expected_size", None)
    return extract_layer(stream, dest, mount_root=MOUNT, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    (tmp_path / "sandbox" / "dest").mkdir(parents=True)
    return tmp_path / "sandbox"


def assert_nothing_written(tmp_path: Path) -> None:
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "sandbox",
        "sandbox/dest",
    ]


# -- a cache built for real ----------------------------------------------------------------------


def write_group(cache: Path, kernel: str, arch: int) -> Path:
    digest = hashlib.sha256(f"{kernel}/{arch}".encode()).hexdigest()
    group = cache / group_dir_name(digest)
    group.mkdir(parents=True)
    children = {}
    for ext in ("ttir", "ptx", "cubin"):
        (group / f"{kernel}.{ext}").write_bytes(os.urandom(3000))
        children[f"{kernel}.{ext}"] = f"/build/cache/{group.name}/{kernel}.{ext}"
    meta = {"hash": digest, "name": kernel, "target": {"backend": "cuda", "arch": arch,
            "warp_size": 32}, "triton_version": "3.9.0"}  # fmt: skip
    (group / f"{kernel}.json").write_text(json.dumps(meta))
    children[f"{kernel}.json"] = f"/build/cache/{group.name}/{kernel}.json"
    (group / f"__grp__{kernel}.json").write_text(json.dumps({"child_paths": children}))
    return group


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, BuiltImage]:
    cache = tmp_path / "cache"
    write_group(cache, "add", 80)
    write_group(cache, "add", 90)
    return cache, build_image(cache, tmp_path / "work")


def size_label(built: BuiltImage) -> int:
    return int(built.labels["cache.triton.image/cache-size-bytes"])


def test_a_round_trip_gives_the_same_files_with_group_paths_under_the_mount_root(
    image: tuple[Path, BuiltImage], tmp_path: Path
) -> None:
    cache, built = image
    dest = tmp_path / "out"
    with built.layer_path.open("rb") as stream:
        result = extract_layer(stream, dest, mount_root=MOUNT, expected_size=size_label(built))

    source = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == source
    assert (result.root, result.files, result.bytes) == (dest, 10, size_label(built))
    for rel in source:
        if (cache / rel).is_dir():
            continue
        if rel.name.startswith("__grp__"):
            children = json.loads((dest / rel).read_text())["child_paths"]
            assert children == {c: f"{MOUNT}/{rel.parent}/{c}" for c in children}
            assert all(Path(path).relative_to(MOUNT) for path in children.values())
        else:
            assert (dest / rel).read_bytes() == (cache / rel).read_bytes()


def test_extracted_modes_are_0644_and_0755_whatever_the_umask(
    image: tuple[Path, BuiltImage], tmp_path: Path
) -> None:
    _, built = image
    old = os.umask(0o077)
    try:
        extract(built.layer_path.read_bytes(), tmp_path / "out")
    finally:
        os.umask(old)

    modes = {p.stat().st_mode & 0o7777 for p in (tmp_path / "out").rglob("*") if p.is_file()}
    dir_modes = {p.stat().st_mode & 0o7777 for p in (tmp_path / "out").rglob("*") if p.is_dir()}
    assert (modes, dir_modes) == ({0o644}, {0o755})


def test_the_manifest_is_returned(image: tuple[Path, BuiltImage], tmp_path: Path) -> None:
    _, built = image
    result = extract(built.layer_path.read_bytes(), tmp_path / "out")

    assert result.manifest["cacheType"] == "triton"
    assert len(result.manifest["files"]) == 10  # type: ignore[arg-type]


@pytest.mark.parametrize("delta", [1, -1])
def test_a_size_label_that_does_not_equal_the_cache_bytes_is_refused(
    image: tuple[Path, BuiltImage], sandbox: Path, tmp_path: Path, delta: int
) -> None:
    _, built = image
    with pytest.raises(CacheFormatError, match="size label"):
        extract(
            built.layer_path.read_bytes(),
            sandbox / "dest",
            expected_size=size_label(built) + delta,
        )
    assert os.listdir(sandbox / "dest") == []


# -- the manifest --------------------------------------------------------------------------------


def test_a_file_whose_bytes_differ_from_the_manifest_is_refused(
    sandbox: Path, tmp_path: Path
) -> None:
    _, listed = manifest({"io.triton.cache/g/k.cubin": b"what was built"})
    data = layer([file("io.triton.cache/g/k.cubin", b"what was swapped"), file(
        "io.triton.manifest/manifest.json", listed or b"")])  # fmt: skip

    with pytest.raises(DigestMismatchError, match=r"k\.cubin"):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


def test_a_file_the_manifest_does_not_list_is_refused(sandbox: Path, tmp_path: Path) -> None:
    data = layer([file("io.triton.cache/g/a"), file("io.triton.cache/g/extra"), manifest(
        {"io.triton.cache/g/a": b"kernel"})])  # fmt: skip

    with pytest.raises(CacheFormatError, match=r"'io\.triton\.cache/g/extra': not listed"):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


def test_a_listed_file_missing_from_the_layer_is_refused(sandbox: Path, tmp_path: Path) -> None:
    data = layer([file("io.triton.cache/g/a"), manifest(
        {"io.triton.cache/g/a": b"kernel", "io.triton.cache/g/gone": b"x"})])  # fmt: skip

    with pytest.raises(CacheFormatError, match=r"io\.triton\.cache/g/gone"):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


def test_a_layer_without_a_manifest_is_refused(sandbox: Path, tmp_path: Path) -> None:
    with pytest.raises(CacheFormatError, match=r"no io\.triton\.manifest/manifest\.json"):
        extract(layer([file("io.triton.cache/g/a")]), sandbox / "dest")
    assert_nothing_written(tmp_path)


# -- hostile layers ------------------------------------------------------------------------------

Hostile = Callable[[Path], list[Member]]

HOSTILE: dict[str, tuple[Hostile, str]] = {
    "dot-dot-escape": (lambda t: [file("../escape")], r"'\.\./escape'.*'\.\.'"),
    "dot-dot-inside-the-prefix": (
        lambda t: [file("io.triton.cache/../../escape")],
        r"'io\.triton\.cache/\.\./\.\./escape'",
    ),
    "absolute-path": (lambda t: [file(str(t / "abs-escape"))], "abs-escape'.*absolute"),
    "symlink-escaping": (
        lambda t: [node("io.triton.cache/out", tarfile.SYMTYPE, linkname="../../..")],
        "'io.triton.cache/out'.*symbolic link",
    ),
    "symlink-inside": (
        lambda t: [
            file("io.triton.cache/g/a"),
            node("io.triton.cache/g/b", tarfile.SYMTYPE, linkname="a"),
        ],
        "'io.triton.cache/g/b'.*symbolic link",
    ),
    "symlink-then-write-through-it": (
        lambda t: [
            node("io.triton.cache/g", tarfile.SYMTYPE, linkname=str(t / "sandbox")),
            file("io.triton.cache/g/pwned"),
        ],
        "'io.triton.cache/g'.*symbolic link",
    ),
    "hard-link": (
        lambda t: [
            file("io.triton.cache/g/a"),
            node("io.triton.cache/g/b", tarfile.LNKTYPE, linkname="io.triton.cache/g/a"),
        ],
        "'io.triton.cache/g/b'.*hard link",
    ),
    "char-device": (
        lambda t: [node("io.triton.cache/null", tarfile.CHRTYPE, devmajor=1, devminor=3)],
        "'io.triton.cache/null'.*character device",
    ),
    "block-device": (
        lambda t: [node("io.triton.cache/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
        "'io.triton.cache/sda'.*block device",
    ),
    "fifo": (
        lambda t: [node("io.triton.cache/pipe", tarfile.FIFOTYPE)],
        "'io.triton.cache/pipe'.*FIFO",
    ),
    "setuid-file": (
        lambda t: [file("io.triton.cache/g/sh", mode=0o4755)],
        "'io.triton.cache/g/sh'.*setuid",
    ),
    "setgid-file": (
        lambda t: [file("io.triton.cache/g/sh", mode=0o2755)],
        "'io.triton.cache/g/sh'.*setgid",
    ),
    "sticky-directory": (
        lambda t: [directory("io.triton.cache/g", mode=0o1777)],
        "'io.triton.cache/g/?'.*sticky",
    ),
    "outside-the-prefixes": (lambda t: [file("etc/cron.d/x")], "'etc/cron.d/x'.*outside"),
    "another-manifest-file": (
        lambda t: [file("io.triton.manifest/other.json")],
        "'io.triton.manifest/other.json'.*outside",
    ),
    "duplicate-path": (
        lambda t: [file("io.triton.cache/g/a"), file("io.triton.cache/g/a", b"second")],
        "'io.triton.cache/g/a'.*twice",
    ),
    "file-over-a-directory": (
        lambda t: [file("io.triton.cache/g/a/b"), file("io.triton.cache/g/a")],
        "'io.triton.cache/g/a'.*collides",
    ),
    "file-under-a-file": (
        lambda t: [file("io.triton.cache/g/a"), file("io.triton.cache/g/a/b")],
        "'io.triton.cache/g/a/b'.*collides",
    ),
    "directory-with-data": (
        lambda t: [node("io.triton.cache/g", tarfile.DIRTYPE, size=1024)],
        "'io.triton.cache/g/?'.*directory with 1024 bytes",
    ),
    "gnu-sparse": (
        lambda t: [
            file(
                "io.triton.cache/s", pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
            )
        ],
        "'io.triton.cache/s'.*sparse",
    ),
    "huge-pax-header": (
        lambda t: [file("io.triton.cache/a", pax_headers={"comment": "x" * 100_000})],
        "extended header",
    ),
}


@pytest.mark.parametrize(("build", "error"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_layer_is_refused_naming_the_member_and_leaves_nothing(
    sandbox: Path, tmp_path: Path, build: Hostile, error: str
) -> None:
    members = [directory("io.triton.cache"), *build(tmp_path)]
    members.append(manifest({m.name: d for m, d in members if d is not None}))

    with pytest.raises(UnsafeArchiveError, match=error):
        extract(layer(members), sandbox / "dest")
    assert_nothing_written(tmp_path)


def test_a_global_pax_header_that_renames_members_is_refused(sandbox: Path, tmp_path: Path) -> None:
    data = layer([file("io.triton.cache/a")], pax_headers={"path": "../escape"})

    with pytest.raises(UnsafeArchiveError, match="global pax header sets 'path'"):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


def test_an_entry_claiming_more_than_max_bytes_is_refused_before_its_data_is_read(
    sandbox: Path, tmp_path: Path
) -> None:
    # Only the header is written: a reader that went for the 10 GiB would hit the stream's end.
    data = layer(
        [file("io.triton.cache/g/a"), (info("io.triton.cache/g/big", size=10 * 1024**3), None)]
    )

    with pytest.raises(UnsafeArchiveError, match=r"'io.triton.cache/g/big': 10737418240 bytes"):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


def test_entries_adding_up_past_max_bytes_are_refused(sandbox: Path, tmp_path: Path) -> None:
    files = {f"io.triton.cache/g/{i}": bytes(400) for i in range(3)}

    with pytest.raises(UnsafeArchiveError, match=r"'io.triton.cache/g/2'.*limit of 1000 bytes"):
        extract(valid(files), sandbox / "dest", max_bytes=1000)
    assert_nothing_written(tmp_path)


def tiny_entries(count: int) -> bytes:
    """`count` empty files, written header by header (tarfile would take seconds)."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [
        packer.compress(info(f"io.triton.cache/g/{i:06d}").tobuf(tarfile.USTAR_FORMAT))
        for i in range(count)
    ]
    parts.append(packer.compress(bytes(1024)))
    return b"".join(parts) + packer.flush()


def test_100k_tiny_entries_are_refused_at_the_entry_limit_without_reading_on(
    sandbox: Path, tmp_path: Path
) -> None:
    data = io.BytesIO(tiny_entries(100_000))

    with pytest.raises(
        UnsafeArchiveError, match=r"'io.triton.cache/g/001000': more than 1000 entries"
    ):
        extract(data, sandbox / "dest", max_entries=1000)
    # Stopped early: the inflater reads a few MiB ahead, most of the layer stays unread.
    assert data.tell() < len(data.getvalue()) // 2
    assert_nothing_written(tmp_path)


def test_the_default_entry_limit_refuses_100k_entries() -> None:
    assert DEFAULT_MAX_ENTRIES < 100_000


def zero_bomb(member_size: int, *, claimed: int | None = None) -> bytes:
    """A layer of one member of `member_size` zero bytes: a few KB that inflate to many MB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    header = info("io.triton.cache/g/zeros", size=claimed if claimed is not None else member_size)
    out = [packer.compress(header.tobuf(tarfile.USTAR_FORMAT))]
    chunk = bytes(1 << 20)
    for _ in range(member_size >> 20):
        out.append(packer.compress(chunk))
    return b"".join(out) + packer.flush()


def test_a_gzip_bomb_is_refused_against_a_small_max_bytes(sandbox: Path, tmp_path: Path) -> None:
    bomb = io.BytesIO(zero_bomb(64 << 20))
    assert len(bomb.getvalue()) < 128 * 1024

    with pytest.raises(UnsafeArchiveError, match=r"'io\.triton\.cache/g/zeros'.*limit of 1048576"):
        extract(bomb, sandbox / "dest", max_bytes=1 << 20)
    assert bomb.tell() < len(bomb.getvalue())
    assert_nothing_written(tmp_path)


def test_decompressed_bytes_are_counted_not_only_header_sizes(
    sandbox: Path, tmp_path: Path
) -> None:
    # The headers claim nothing big; the inflated stream goes on and on past the archive's end.
    files = {"io.triton.cache/g/a": b"kernel"}
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = [packer.compress(tar_bytes([file(n, d) for n, d in files.items()] + [manifest(files)]))]
    body += [packer.compress(bytes(1 << 20)) for _ in range(64)]
    bomb = b"".join(body) + packer.flush()

    with pytest.raises(UnsafeArchiveError, match="decompresses to more than"):
        extract(bomb, sandbox / "dest", max_bytes=1 << 20, max_entries=16)
    assert_nothing_written(tmp_path)


def test_data_after_the_end_of_the_archive_is_refused(sandbox: Path, tmp_path: Path) -> None:
    data = valid({"io.triton.cache/g/a": b"k"}, trailing=b"smuggled second archive")

    with pytest.raises(UnsafeArchiveError, match="after the end-of-archive"):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"plain text, not gzip", "not a valid gzip stream"),
        (valid({"io.triton.cache/g/a": b"k" * 5000})[:-200], "gzip|ends"),
        (
            gzip.compress(tar_bytes([file("io.triton.cache/g/a", b"k" * 5000)])[:1000]),
            "ends inside",
        ),
        (gzip.compress(b"\x01" * 512), "checksum"),
    ],
    ids=["not-gzip", "truncated-gzip", "truncated-tar", "garbage-header"],
)
def test_a_corrupt_layer_is_refused_and_leaves_nothing(
    sandbox: Path, tmp_path: Path, data: bytes, error: str
) -> None:
    with pytest.raises(CacheFormatError, match=error):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


# -- tar dialects and destinations ---------------------------------------------------------------

LONG = "io.triton.cache/" + "rank_0_0/triton_cache/" + "G" * 52 + "/" + "k" * 120 + ".cubin"


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_member_names_from_pax_and_gnu_writers_are_extracted(tmp_path: Path, fmt: int) -> None:
    result = extract(valid({LONG: b"long"}, fmt=fmt), tmp_path / "out")

    assert (tmp_path / "out" / LONG.removeprefix("io.triton.cache/")).read_bytes() == b"long"
    assert result.files == 1


def test_a_ustar_name_split_into_prefix_and_name_is_joined(tmp_path: Path) -> None:
    name = "io.triton.cache/" + "d" * 90 + "/" + "f" * 90
    extract(valid({name: b"x"}, fmt=tarfile.USTAR_FORMAT), tmp_path / "out")

    assert (tmp_path / "out" / ("d" * 90) / ("f" * 90)).read_bytes() == b"x"


def test_a_group_file_outside_any_group_is_refused(sandbox: Path, tmp_path: Path) -> None:
    data = valid({"io.triton.cache/__grp__k.json": b'{"child_paths":{}}'})

    with pytest.raises(CacheFormatError, match="outside a group"):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


def test_a_group_file_pointing_into_another_group_is_refused(sandbox: Path, tmp_path: Path) -> None:
    grp = json.dumps({"child_paths": {"k.cubin": "/x/OTHER/k.cubin"}}).encode()
    data = valid({"io.triton.cache/G/k.cubin": b"c", "io.triton.cache/G/__grp__k.json": grp})

    with pytest.raises(CacheFormatError, match=r"__grp__k\.json"):
        extract(data, sandbox / "dest")
    assert_nothing_written(tmp_path)


def test_a_destination_that_is_not_empty_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep").write_text("mine")

    with pytest.raises(KcacheError, match="empty directory"):
        extract(valid({"io.triton.cache/g/a": b"k"}), tmp_path / "dest")
    assert (tmp_path / "dest" / "keep").read_text() == "mine"


def test_a_destination_created_for_a_failed_extraction_is_removed(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError):
        extract(layer([file("../x")]), tmp_path / "new")

    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("mount_root", ["relative", "/a/../b"])
def test_a_bad_mount_root_is_refused_before_anything_is_read(
    tmp_path: Path, mount_root: str
) -> None:
    stream = io.BytesIO(valid({"io.triton.cache/g/a": b"k"}))

    with pytest.raises(CacheFormatError, match="mount root"):
        extract_layer(stream, tmp_path / "out", mount_root=mount_root, expected_size=None)
    assert stream.tell() == 0
