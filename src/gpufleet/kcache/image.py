"""Reproducible OCI images of kernel cache directories, in the layout MCV and GKM read.

One gzip layer holds ``io.triton.cache/<path>`` for every cache file and
``io.triton.manifest/manifest.json`` (path, size and sha256 of every stored
file). The config carries MCV's ``cache.triton.image/*`` labels and ours
(``io.gpufleet.kcache/*``), which `kcache.labels` encodes and reads (its
public names are re-exported here). Nothing about the build machine or the
moment of the build reaches the bytes: the same cache content gives the same
digests. See docs/kcache-image.md for the rules.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any

from gpufleet.kcache import format as cache_format
from gpufleet.kcache.errors import CacheFormatError
from gpufleet.kcache.groups import check_mount_root, is_group_file, stored_child_paths
from gpufleet.kcache.labels import (
    CACHE_SIZE_LABEL,
    CACHE_TYPE_LABEL,
    ENTRY_COUNT_LABEL,
    MCV_SUMMARY_LABEL,
    MOUNT_ROOT_LABEL,
    SUMMARY_LABEL,
    TRITON_VERSION_LABEL,
    canonical_json,
    labels_for,
    labels_of,
    summary_from_labels,
)
from gpufleet.kcache.model import CacheKind, CacheSummary

__all__ = [
    "CACHE_SIZE_LABEL",
    "CACHE_TYPE_LABEL",
    "CONFIG_MEDIA_TYPE",
    "DEFAULT_MOUNT_ROOT",
    "DOCKER_CONFIG_MEDIA_TYPE",
    "DOCKER_LAYER_MEDIA_TYPE",
    "DOCKER_MANIFEST_MEDIA_TYPE",
    "ENTRY_COUNT_LABEL",
    "LAYER_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPE",
    "MANIFEST_PATH",
    "MCV_PREFIX",
    "MCV_SUMMARY_LABEL",
    "MOUNT_ROOT_LABEL",
    "SUMMARY_LABEL",
    "TRITON_VERSION_LABEL",
    "BuiltImage",
    "build_image",
    "labels_of",
    "summary_from_labels",
]

MCV_PREFIX = "io.triton.cache/"
MANIFEST_PATH = "io.triton.manifest/manifest.json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
DEFAULT_MOUNT_ROOT = "/var/cache/gpufleet/kernels"
# What a Docker-built image (MCV by docker build) carries instead; its layer is gzip too.
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_MEDIA_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_SCHEMA_VERSION = 1
FILE_MODE = 0o644
DIR_MODE = 0o755
# The image config's `created`: the epoch, so the build time never reaches the digest.
EPOCH = "1970-01-01T00:00:00Z"
# Fixed so that the deflate stream (and with it the layer digest) is a function of the content.
GZIP_LEVEL = 6


@dataclass(frozen=True)
class BuiltImage:
    """A built cache image: manifest and config in memory, the layer in a file (it can be GBs)."""

    manifest: bytes
    manifest_digest: str
    config: bytes
    config_digest: str
    layer_path: Path
    layer_digest: str
    layer_size: int
    summary: CacheSummary
    """The summary the labels carry; ``size_bytes`` is the stored size (group files rewritten)."""
    labels: Mapping[str, str]


def build_image(
    cache_dir: Path,
    workdir: Path,
    *,
    mount_root: str = DEFAULT_MOUNT_ROOT,
    allow_unknown: bool = False,
) -> BuiltImage:
    """Pack `cache_dir` into an image; the layer goes to ``<workdir>/blobs/sha256/<hex>``.

    The directory is validated by `format.scan` first, which refuses any
    symbolic link or special file in it (kernel caches hold none, and a link
    would pack bytes from outside the cache); files are then opened with
    ``O_NOFOLLOW``.
    """
    check_mount_root(mount_root)
    scan = cache_format.scan(cache_dir, allow_unknown=allow_unknown)
    summary, files = scan.summary, list(scan.files)
    blobs = workdir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            layer = _write_layer(cache_dir, files, summary.kind, out)
        layer_path = blobs / layer.digest.removeprefix("sha256:")
        os.replace(tmp, layer_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    stored = replace(summary, size_bytes=layer.cache_bytes)
    labels = labels_for(stored, mount_root)
    config = canonical_json(
        {
            "architecture": "amd64",
            "config": {"Labels": labels},
            "created": EPOCH,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        }
    )
    config_digest = _digest(config)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.size}],
        }
    )
    return BuiltImage(
        manifest=manifest,
        manifest_digest=_digest(manifest),
        config=config,
        config_digest=config_digest,
        layer_path=layer_path,
        layer_digest=layer.digest,
        layer_size=layer.size,
        summary=stored,
        labels=labels,
    )


# -- the layer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    digest: str
    size: int
    diff_id: str
    cache_bytes: int


class _HashingWriter(io.RawIOBase):
    """Passes writes on to `sink`, hashing and counting them (compressed or not)."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._sink.write(view)
        self.sha.update(view)
        self.size += view.nbytes
        return view.nbytes


class _HashingReader(io.RawIOBase):
    """Reads from `source`, hashing what was read: the manifest lists what the layer holds."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.sha.update(data)
        return data


def _write_layer(root: Path, files: list[Path], kind: CacheKind, out: IO[bytes]) -> _Layer:
    """Write the tar+gzip layer of `files` (relative to `root`) to `out`."""
    rels = sorted({_relative(path) for path in files}, key=lambda p: p.parts)
    dirs: set[PurePosixPath] = set()
    for rel in rels:
        dirs.update(rel.parents)
    cache = PurePosixPath(MCV_PREFIX.rstrip("/"))
    entries: list[tuple[tuple[str, ...], PurePosixPath | None]] = [
        ((cache / d).parts, None) for d in dirs
    ]
    entries += [((cache / rel).parts, rel) for rel in rels]
    entries.sort(key=lambda entry: entry[0])

    compressed = _HashingWriter(out)
    listed: list[dict[str, object]] = []
    cache_bytes = 0
    # filename="" and mtime=0 keep the build's name and time out of the gzip header.
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=GZIP_LEVEL
    ) as gz:
        plain = _HashingWriter(gz)  # type: ignore[arg-type]
        with tarfile.open(
            fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict"
        ) as tar:
            for parts, file in entries:
                name = "/".join(parts)
                if file is None:
                    tar.addfile(_tar_entry(name, tarfile.DIRTYPE, 0))
                    continue
                size, sha = _add_file(tar, name, root, file)
                listed.append({"path": name, "size": size, "sha256": sha})
                cache_bytes += size
            manifest = canonical_json(
                {"schemaVersion": MANIFEST_SCHEMA_VERSION, "cacheType": kind.value, "files": listed}
            )
            manifest_dir = MANIFEST_PATH.rsplit("/", 1)[0]
            tar.addfile(_tar_entry(manifest_dir, tarfile.DIRTYPE, 0))
            tar.addfile(
                _tar_entry(MANIFEST_PATH, tarfile.REGTYPE, len(manifest)), io.BytesIO(manifest)
            )
    return _Layer(
        digest=f"sha256:{compressed.sha.hexdigest()}",
        size=compressed.size,
        diff_id=f"sha256:{plain.sha.hexdigest()}",
        cache_bytes=cache_bytes,
    )


def _add_file(tar: tarfile.TarFile, name: str, root: Path, rel: PurePosixPath) -> tuple[int, str]:
    """Append one cache file; its stored size and sha256 (group files are stored rewritten)."""
    source = root / rel
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CacheFormatError(f"{source}: cannot read: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise CacheFormatError(f"{source}: not a regular file")
        if is_group_file(rel.name):
            group = str(rel.parent)
            if group == ".":
                raise CacheFormatError(f"{source}: a group file outside any group directory")
            data = stored_child_paths(handle.read(), group=group, where=str(rel))
            tar.addfile(_tar_entry(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))
            return len(data), hashlib.sha256(data).hexdigest()
        size = os.fstat(handle.fileno()).st_size
        reader = _HashingReader(handle)
        try:
            # addfile copies exactly `size` bytes: a file that shrinks meanwhile fails the build.
            tar.addfile(_tar_entry(name, tarfile.REGTYPE, size), reader)
        except OSError as exc:
            raise CacheFormatError(f"{source}: changed while being packed ({exc})") from exc
        return size, reader.sha.hexdigest()


def _tar_entry(name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    """A header carrying nothing of the source file but its name and size."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = DIR_MODE if kind == tarfile.DIRTYPE else FILE_MODE
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _relative(path: Path) -> PurePosixPath:
    rel = PurePosixPath(path.as_posix())
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise CacheFormatError(f"{path}: not a path inside the cache")
    try:
        rel.as_posix().encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CacheFormatError(f"{path}: the file name is not UTF-8") from exc
    return rel


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
