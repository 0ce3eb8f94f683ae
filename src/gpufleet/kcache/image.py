"""Reproducible OCI images of kernel cache directories, in the layout MCV and GKM read.

One gzip layer holds ``io.triton.cache/<path>`` for every cache file and
``io.triton.manifest/manifest.json`` (path, size and sha256 of every stored
file). The config carries MCV's ``cache.triton.image/*`` labels and ours
(``io.gpufleet.kcache/*``). Nothing about the build machine or the moment of
the build reaches the bytes: the same cache content gives the same digests.
See docs/kcache-image.md for the rules.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any

from gpufleet.kcache import format as cache_format
from gpufleet.kcache.errors import CacheFormatError
from gpufleet.kcache.model import CacheKind, CacheSummary, Target

__all__ = [
    "CACHE_SIZE_LABEL",
    "CACHE_TYPE_LABEL",
    "CONFIG_MEDIA_TYPE",
    "DEFAULT_MOUNT_ROOT",
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
    "check_mount_root",
    "is_group_file",
    "labels_of",
    "summary_from_labels",
]

MCV_PREFIX = "io.triton.cache/"
MANIFEST_PATH = "io.triton.manifest/manifest.json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
DEFAULT_MOUNT_ROOT = "/var/cache/gpufleet/kernels"

MCV_SUMMARY_LABEL = "cache.triton.image/summary"
ENTRY_COUNT_LABEL = "cache.triton.image/entry-count"
CACHE_SIZE_LABEL = "cache.triton.image/cache-size-bytes"
CACHE_TYPE_LABEL = "io.gpufleet.kcache/cache-type"
SUMMARY_LABEL = "io.gpufleet.kcache/summary"
TRITON_VERSION_LABEL = "io.gpufleet.kcache/triton-version"
MOUNT_ROOT_LABEL = "io.gpufleet.kcache/mount-root"

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


def is_group_file(name: str) -> bool:
    """Whether a file name is a Triton group file (``__grp__<kernel>.json``)."""
    return name.startswith(cache_format.GROUP_PREFIX) and name.endswith(".json")


def check_mount_root(mount_root: str) -> str:
    """``mount_root`` if it is an absolute, normalized POSIX path; CacheFormatError otherwise."""
    if (
        not mount_root.startswith("/")
        or "\x00" in mount_root
        or posixpath.normpath(mount_root) != mount_root
        or mount_root.startswith("//")
    ):
        raise CacheFormatError(
            f"mount root {mount_root!r}: an absolute, normalized path is needed (no '..', no '//')"
        )
    return mount_root


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
    labels = _labels(stored, mount_root)
    config = _canonical_json(
        {
            "architecture": "amd64",
            "config": {"Labels": labels},
            "created": EPOCH,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        }
    )
    config_digest = _digest(config)
    manifest = _canonical_json(
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


def labels_of(config: bytes) -> dict[str, str]:
    """The labels of an image config blob (``config.Labels``); empty when it has none."""
    try:
        doc = json.loads(config)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CacheFormatError(f"image config: not JSON: {exc}") from exc
    inner = doc.get("config") if isinstance(doc, dict) else None
    labels = inner.get("Labels") if isinstance(inner, dict) else None
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in labels.items()
    ):
        raise CacheFormatError("image config: config.Labels is not a map of strings")
    return dict(labels)


def summary_from_labels(labels: Mapping[str, str]) -> CacheSummary:
    """The cache summary an image's labels declare.

    Our own ``io.gpufleet.kcache/summary`` label is preferred and must agree
    with MCV's entry-count and size labels; an image built by MCV (no label of
    ours) yields a Triton summary from MCV's labels alone, with no kernel
    names or Triton versions.
    """
    if SUMMARY_LABEL in labels:
        summary = _summary_from_json(labels)
        for key, value in ((ENTRY_COUNT_LABEL, summary.entry_count),
                           (CACHE_SIZE_LABEL, summary.size_bytes)):  # fmt: skip
            if key in labels and _count_label(labels, key) != value:
                raise CacheFormatError(
                    f"label {key}={labels[key]!r} disagrees with {SUMMARY_LABEL} ({value})"
                )
        return summary
    if MCV_SUMMARY_LABEL not in labels:
        raise CacheFormatError(
            f"not a kernel cache image: neither {SUMMARY_LABEL} nor {MCV_SUMMARY_LABEL} label"
        )
    doc = _json_label(labels, MCV_SUMMARY_LABEL)
    targets = doc.get("targets") if isinstance(doc, dict) else None
    if not isinstance(targets, list):
        raise CacheFormatError(f"label {MCV_SUMMARY_LABEL}: no 'targets' list")
    return CacheSummary(
        kind=CacheKind.TRITON,
        targets=_sorted_targets(_mcv_target(item) for item in targets),
        triton_versions=(),
        entry_count=_count_label(labels, ENTRY_COUNT_LABEL),
        size_bytes=_count_label(labels, CACHE_SIZE_LABEL),
        kernel_names=(),
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
            manifest = _canonical_json(
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
            data = cache_format.stored_child_paths(handle.read(), group=group, where=str(rel))
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


# -- config and labels ---------------------------------------------------------------------------


def _labels(summary: CacheSummary, mount_root: str) -> dict[str, str]:
    mcv_targets = [
        {"backend": t.backend, "arch": str(t.arch), "warp_size": t.warp_size}
        for t in summary.targets
    ]
    return {
        MCV_SUMMARY_LABEL: _canonical_json({"targets": mcv_targets}).decode(),
        ENTRY_COUNT_LABEL: str(summary.entry_count),
        CACHE_SIZE_LABEL: str(summary.size_bytes),
        CACHE_TYPE_LABEL: summary.kind.value,
        SUMMARY_LABEL: _canonical_json(_summary_to_json(summary)).decode(),
        TRITON_VERSION_LABEL: ",".join(summary.triton_versions),
        MOUNT_ROOT_LABEL: mount_root,
    }


def _summary_to_json(summary: CacheSummary) -> dict[str, object]:
    return {
        "kind": summary.kind.value,
        "targets": [
            {"backend": t.backend, "arch": t.arch, "warp_size": t.warp_size}
            for t in summary.targets
        ],
        "triton_versions": list(summary.triton_versions),
        "entry_count": summary.entry_count,
        "size_bytes": summary.size_bytes,
        "kernel_names": list(summary.kernel_names),
    }


def _summary_from_json(labels: Mapping[str, str]) -> CacheSummary:
    label = SUMMARY_LABEL
    doc = _json_label(labels, label)
    if not isinstance(doc, dict):
        raise CacheFormatError(f"label {label}: not a JSON object")
    try:
        kind = CacheKind(doc["kind"])
        targets = doc["targets"]
        versions = doc["triton_versions"]
        names = doc["kernel_names"]
        counts = doc["entry_count"], doc["size_bytes"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CacheFormatError(f"label {label}: missing or invalid field {exc}") from exc
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise CacheFormatError(f"label {label}: 'targets' is not a list of objects")
    for field, value in (("triton_versions", versions), ("kernel_names", names)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CacheFormatError(f"label {label}: {field!r} is not a list of strings")
    if not all(_is_count(value) for value in counts):
        raise CacheFormatError(f"label {label}: entry_count and size_bytes must be counts")
    return CacheSummary(
        kind=kind,
        targets=_sorted_targets(_target(t, label) for t in targets),
        triton_versions=tuple(sorted(set(versions))),
        entry_count=counts[0],
        size_bytes=counts[1],
        kernel_names=tuple(sorted(set(names))),
    )


def _target(item: dict[str, object], label: str) -> Target:
    backend, arch, warp = item.get("backend"), item.get("arch"), item.get("warp_size")
    if (
        not isinstance(backend, str)
        or not backend
        or isinstance(arch, bool)
        or not isinstance(arch, int | str)
        or arch == ""
        or isinstance(warp, bool)
        or not isinstance(warp, int)
        or warp <= 0
    ):
        raise CacheFormatError(f"label {label}: invalid target {item!r}")
    return Target(backend, arch, warp)


def _mcv_target(item: object) -> Target:
    """MCV writes arch as a string; a CUDA arch is a number to us (90 for sm_90)."""
    if not isinstance(item, dict):
        raise CacheFormatError(f"label {MCV_SUMMARY_LABEL}: invalid target {item!r}")
    arch = item.get("arch")
    if isinstance(arch, str) and arch.isascii() and arch.isdigit():
        item = {**item, "arch": int(arch)}
    return _target(item, MCV_SUMMARY_LABEL)


def _sorted_targets(targets: Iterable[Target]) -> tuple[Target, ...]:
    """Distinct and sorted as `format.scan` sorts them (a str arch never compares with an int)."""

    def key(t: Target) -> tuple[str, int, str, int]:
        return (t.backend, t.arch if isinstance(t.arch, int) else -1, str(t.arch), t.warp_size)

    return tuple(sorted(set(targets), key=key))


def _json_label(labels: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(labels[key])
    except ValueError as exc:
        raise CacheFormatError(f"label {key}: not JSON: {exc}") from exc


def _count_label(labels: Mapping[str, str], key: str) -> int:
    text = labels.get(key)
    if text is None or not text.isascii() or not text.isdigit():
        raise CacheFormatError(f"label {key}: missing or not a non-negative integer ({text!r})")
    return int(text)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _canonical_json(doc: object) -> bytes:
    """Sorted keys, no spaces, UTF-8: one byte string per document, whoever serializes it."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
