"""Safe extraction of a cache image's layer: only plain files and directories, only inside `dest`.

This module is the extraction policy; reading the gzip and tar stream is
`kcache.tarstream`'s job. The layer is untrusted input even when its digest
checked out (a signed image can still be hostile). It is read as a stream by a
strict tar reader of our own; every member is judged before a byte of it is
written, and every file is created by us with
``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to directory descriptors opened
with ``O_NOFOLLOW``. Links of any kind, devices, FIFOs, setuid/setgid/sticky
bits, paths that are absolute, hold ``..`` or lie outside ``io.triton.cache/``
and ``io.triton.manifest/`` (or MCV's ``io.vllm.cache/`` and
``io.vllm.manifest/``, never both pairs), duplicates, and anything past the
byte or entry limits are refused with `UnsafeArchiveError` naming the member.
The manifest is ours (every file's size and sha256) or MCV's kernel list,
which `kcache.mcv` checks. On any failure `dest` is left empty. See
docs/kcache-image.md.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gpufleet.kcache.errors import (
    CacheFormatError,
    DigestMismatchError,
    KcacheError,
    UnsafeArchiveError,
)
from gpufleet.kcache.groups import check_mount_root, is_group_file, mounted_child_paths
from gpufleet.kcache.image import MANIFEST_PATH
from gpufleet.kcache.mcv import Family, check_kernel_list, family_of, is_kernel_list
from gpufleet.kcache.tarstream import CHUNK_SIZE, Inflater, TarHeader, TarStream

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "MANIFEST_BYTES_PER_ENTRY",
    "Extracted",
    "extract_layer",
    "max_layer_bytes",
    "max_manifest_bytes",
]

DEFAULT_MAX_BYTES = 8 * 1024**3
"""Every byte of member data in a layer, cache files and manifest together."""
DEFAULT_MAX_ENTRIES = 65_536
"""Members (files and directories) in a layer: some 8,000 kernel groups of ~8 files each."""

FILE_MODE = 0o644
DIR_MODE = 0o755
_MANIFEST_NAME = MANIFEST_PATH.rsplit("/", 1)[1]
# A group file is a few KB: the cap bounds what is held in memory.
_MAX_GROUP_FILE = 16 * 1024**2
MANIFEST_BYTES_PER_ENTRY = 512
"""The manifest's allowance per entry: a real one spends ~200 bytes (path, size, sha256)."""
_MANIFEST_BASE = 64 * 1024
# JSON values a manifest may hold per file it lists (a real one: the entry, 3 keys, 3 values),
# and for its top level: counted before parsing, so a bomb of tiny values is never parsed.
_VALUES_PER_FILE = 16
_VALUES_BASE = 1024
# Headers, padding and the end-of-archive records come on top of member data;
# 4 KiB a member is several times what any tar writer spends.
_TAR_BYTES_PER_ENTRY = 4096


def _tar_limit(max_bytes: int, max_entries: int) -> int:
    return max_bytes + _TAR_BYTES_PER_ENTRY * (max_entries + 4)


def max_layer_bytes(max_bytes: int, max_entries: int) -> int:
    """The largest compressed layer that can inflate to a tar stream the limits accept.

    Deflate adds at most ~0.03% (plus a few bytes) to incompressible data,
    so a layer larger than the accepted tar stream plus 0.1% and 64 KiB can
    only be refused after its download: it is refused before it.
    """
    plain = _tar_limit(max_bytes, max_entries)
    return plain + plain // 1024 + 64 * 1024


def max_manifest_bytes(max_entries: int) -> int:
    """The largest ``manifest.json`` read into memory: 512 bytes an entry, plus 64 KiB."""
    return MANIFEST_BYTES_PER_ENTRY * max_entries + _MANIFEST_BASE


@dataclass(frozen=True)
class Extracted:
    """What an extraction wrote: the cache root, its regular files and their stored bytes."""

    root: Path
    files: int
    bytes: int
    """The cache files' sizes as stored in the layer (what the size label declares)."""
    manifest: dict[str, object]


def extract_layer(
    layer: BinaryIO,
    dest: Path,
    *,
    mount_root: str,
    expected_size: int | None,
    expected_entries: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Extracted:
    """Extract the ``io.triton.cache/`` files of a tar+gzip layer into `dest`, verified.

    The ``io.triton.cache/`` (or ``io.vllm.cache/``) prefix is stripped:
    `dest` is the cache root, what ``TRITON_CACHE_DIR`` (``VLLM_CACHE_ROOT``)
    names. `dest` must be an empty directory (or not exist yet). The layer's
    manifest must list exactly the files extracted, with their sizes and
    sha256; their total size must equal `expected_size` (the image's size
    label; None skips that check). An MCV kernel-list manifest lists no files:
    then `expected_size` is required, and `expected_entries` (the entry-count
    label; None skips it) is checked against it (`mcv.check_kernel_list`).
    Group files are rewritten so that their child paths lie
    under `mount_root`, where pods will see the cache. The gzip stream is read
    to its end, so a caller hashing it as it goes sees every byte. `layer` is
    read by a worker thread (inflating ahead); it is not touched after return.
    """
    check_mount_root(mount_root)
    created = not dest.exists()
    if created:
        dest.mkdir()
        dest.chmod(DIR_MODE)
    try:
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise KcacheError(f"{dest}: cannot extract into it: {exc.strerror}") from exc
    try:
        if os.listdir(root_fd):
            raise KcacheError(f"{dest}: extraction needs an empty directory")
        extraction = _Extraction(root_fd, dest, mount_root, max_bytes, max_entries)
        try:
            return extraction.run(layer, expected_size, expected_entries)
        except BaseException:
            _empty(root_fd)
            if created:
                dest.rmdir()
            raise
    finally:
        os.close(root_fd)


class _Extraction:
    """One extraction's state: limits, what was seen, what was written."""

    def __init__(
        self, root_fd: int, dest: Path, mount_root: str, max_bytes: int, max_entries: int
    ) -> None:
        self.root_fd = root_fd
        self.dest = dest
        self.mount_root = mount_root
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries = 0
        self.data_bytes = 0
        self.cache_bytes = 0
        self.seen: set[str] = set()
        self.stored: dict[str, tuple[int, str]] = {}
        self.manifest: bytes | None = None
        self.family: Family | None = None
        self.groups: set[str] = set()
        self.group_files = 0
        self.hash_dirs: set[str] = set()
        self.dirs = _Dirs(root_fd)

    def run(
        self, layer: BinaryIO, expected_size: int | None, expected_entries: int | None
    ) -> Extracted:
        limit = _tar_limit(self.max_bytes, self.max_entries)
        try:
            with Inflater(layer) as plain, self.dirs:
                tar = TarStream(plain, limit)
                while (header := tar.next()) is not None:
                    self._member(tar, header, expected_size)
                tar.finish()
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise CacheFormatError(f"layer: not a valid gzip stream: {exc}") from exc
        except OSError as exc:
            raise KcacheError(f"{self.dest}: extraction failed: {exc}") from exc
        manifest = self._check_manifest(expected_size, expected_entries)
        if expected_size is not None and self.cache_bytes != expected_size:
            raise CacheFormatError(
                f"layer: the cache files hold {self.cache_bytes} bytes, "
                f"the image's size label says {expected_size}"
            )
        return Extracted(self.dest, len(self.stored), self.cache_bytes, manifest)

    def _member(self, tar: TarStream, header: TarHeader, expected_size: int | None) -> None:
        name = header.name
        self.entries += 1
        if self.entries > self.max_entries:
            raise UnsafeArchiveError(
                f"layer member {name!r}: more than {self.max_entries} entries (--max-entries)"
            )
        parts, family = _judge(header)
        if self.family is None:
            self.family = family
        elif family is not self.family:
            raise UnsafeArchiveError(
                f"layer member {name!r}: under {parts[0]}/, beside members under "
                f"{self.family.cache_top}/ and {self.family.manifest_top}/; one pair only"
            )
        key = "/".join(parts)
        if key in self.seen:
            raise UnsafeArchiveError(f"layer member {name!r}: appears twice")
        self.seen.add(key)
        is_cache = parts[0] == family.cache_top
        # What MCV counts as a vLLM cache's entries: the directories in torch_compile_cache/.
        below = parts[2:] if is_cache and parts[1:2] == ("torch_compile_cache",) else ()
        if len(below) > 1 or (below and header.type == b"5"):
            self.hash_dirs.add(below[0])
        if header.type == b"5":
            if is_cache and len(parts) > 1:
                self.dirs.ensure(parts[1:], name)
            return
        if header.size > self.max_bytes - self.data_bytes:
            raise UnsafeArchiveError(
                f"layer member {name!r}: {header.size} bytes would pass the limit of "
                f"{self.max_bytes} bytes (--max-bytes)"
            )
        self.data_bytes += header.size
        if not is_cache:
            cap = max_manifest_bytes(self.max_entries)
            if header.size > cap:
                raise UnsafeArchiveError(
                    f"layer member {name!r}: a manifest of {header.size} bytes, more than the "
                    f"{cap} bytes allowed for {self.max_entries} entries (--max-entries)"
                )
            self.manifest = tar.read_all()
            return
        if expected_size is not None and self.cache_bytes + header.size > expected_size:
            raise CacheFormatError(
                f"layer member {name!r}: the cache files pass the {expected_size} bytes "
                "the image's size label declares"
            )
        self.cache_bytes += header.size
        self.stored[key] = self._write(tar, header, parts[1:])
        if len(parts) == 3 and is_group_file(parts[2]):
            self.groups.add(parts[1])
            self.group_files += 1

    def _write(self, tar: TarStream, header: TarHeader, rel: tuple[str, ...]) -> tuple[int, str]:
        """Write one cache file; its stored size and sha256."""
        name = header.name
        parent = self.dirs.ensure(rel[:-1], name)
        try:
            fd = os.open(
                rel[-1],
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                FILE_MODE,
                dir_fd=parent,
            )
        except FileExistsError as exc:
            raise UnsafeArchiveError(
                f"layer member {name!r}: collides with an earlier member"
            ) from exc
        sha = hashlib.sha256()
        try:
            os.fchmod(fd, FILE_MODE)  # the umask must not decide what pods can read
            if is_group_file(rel[-1]):
                if len(rel) < 2:
                    raise CacheFormatError(f"layer member {name!r}: a group file outside a group")
                if header.size > _MAX_GROUP_FILE:
                    raise UnsafeArchiveError(
                        f"layer member {name!r}: a group file of {header.size} bytes"
                    )
                data = tar.read_all()
                sha.update(data)
                try:
                    mounted = mounted_child_paths(
                        data, group="/".join(rel[:-1]), mount_root=self.mount_root
                    )
                except CacheFormatError as exc:
                    raise CacheFormatError(f"layer member {name!r}: {exc}") from exc
                _write_all(fd, mounted)
            else:
                while chunk := tar.read(CHUNK_SIZE):
                    sha.update(chunk)
                    _write_all(fd, chunk)
        finally:
            os.close(fd)
        return header.size, sha.hexdigest()

    def _check_manifest(
        self, expected_size: int | None, expected_entries: int | None
    ) -> dict[str, object]:
        """The layer's manifest, once it is known to describe exactly the files extracted."""
        family = self.family
        if self.manifest is None or family is None:
            where = MANIFEST_PATH if family is None else family.manifest_path
            raise CacheFormatError(f"layer: no {where}")
        where = family.manifest_path
        # Every JSON value but the first follows a ',', '[' or ':'; a count of those bounds the
        # objects json.loads would make (strings holding them only make the count larger).
        values = sum(self.manifest.count(mark) for mark in (b",", b"[", b":"))
        allowed = _VALUES_PER_FILE * len(self.stored) + _VALUES_BASE
        if values > allowed:
            raise CacheFormatError(
                f"layer: {where} holds more JSON values than {allowed}, the most a "
                f"manifest of the {len(self.stored)} files extracted can hold"
            )
        try:
            doc = json.loads(self.manifest)
        except RecursionError:
            raise CacheFormatError(f"layer: {where} is nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise CacheFormatError(f"layer: {where} is not JSON: {exc}") from exc
        if is_kernel_list(doc):
            assert isinstance(doc, dict)  # narrowed by is_kernel_list, for mypy
            if expected_size is None:
                raise CacheFormatError(
                    f"layer: {where} is MCV's kernel list, which names no file: "
                    "the image's cache-size-bytes label is needed to check the files"
                )
            check_kernel_list(
                doc, family, where=where, groups=self.groups, group_files=self.group_files,
                hash_dirs=len(self.hash_dirs), expected_entries=expected_entries,
            )  # fmt: skip
            return doc
        files = doc.get("files") if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("schemaVersion") != 1
            or not isinstance(files, list)
        ):
            raise CacheFormatError(f"layer: {where} is not a version 1 manifest")
        listed: dict[str, tuple[int, str]] = {}
        for item in files:
            path = item.get("path") if isinstance(item, dict) else None
            size = item.get("size") if isinstance(item, dict) else None
            sha = item.get("sha256") if isinstance(item, dict) else None
            if (
                not isinstance(path, str)
                or isinstance(size, bool)
                or not isinstance(size, int)
                or not isinstance(sha, str)
                or path in listed
            ):
                raise CacheFormatError(f"layer: {where}: invalid or repeated entry {item!r}")
            listed[path] = (size, sha)
        for path, (size, sha) in self.stored.items():
            if path not in listed:
                raise CacheFormatError(f"layer member {path!r}: not listed in {where}")
            if listed[path] != (size, sha):
                raise DigestMismatchError(
                    f"layer member {path!r}: {size} bytes with sha256 {sha}, "
                    f"but {where} lists {listed[path][0]} bytes with sha256 "
                    f"{listed[path][1]}"
                )
        missing = sorted(set(listed) - set(self.stored))
        if missing:
            raise CacheFormatError(
                f"layer: {where} lists {missing[0]!r} (and {len(missing) - 1} more), "
                "which the layer does not hold"
            )
        return doc


def _judge(header: TarHeader) -> tuple[tuple[str, ...], Family]:
    """The member's path components and family, if its type, mode and path are acceptable."""
    name = header.name
    kind = {
        b"1": "a hard link",
        b"2": "a symbolic link (kernel caches hold no links, so none is extracted)",
        b"3": "a character device",
        b"4": "a block device",
        b"6": "a FIFO",
    }.get(header.type)
    if kind is None and header.type not in (b"0", b"5"):
        kind = f"an unsupported member type {header.type!r}"
    if kind is not None:
        raise UnsafeArchiveError(f"layer member {name!r}: {kind}")
    if header.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
        raise UnsafeArchiveError(
            f"layer member {name!r}: setuid, setgid or sticky bit (mode {header.mode:o})"
        )
    if header.type == b"5" and header.size:
        raise UnsafeArchiveError(
            f"layer member {name!r}: a directory with {header.size} bytes of data"
        )
    if name.startswith("/"):
        raise UnsafeArchiveError(f"layer member {name!r}: an absolute path")
    parts = tuple(name.removesuffix("/").split("/") if header.type == b"5" else name.split("/"))
    if ".." in parts:
        raise UnsafeArchiveError(f"layer member {name!r}: a '..' component")
    if any(part in ("", ".") for part in parts) or "\x00" in name:
        raise UnsafeArchiveError(f"layer member {name!r}: not a normalized relative path")
    is_dir = header.type == b"5"
    family = family_of(parts[0])
    if family is not None and parts[0] == family.cache_top and (len(parts) > 1 or is_dir):
        return parts, family
    top = parts[0]
    if family is not None and (parts == (top,) if is_dir else parts == (top, _MANIFEST_NAME)):
        return parts, family
    raise UnsafeArchiveError(
        f"layer member {name!r}: outside io.triton.cache/ and {MANIFEST_PATH} "
        "(or MCV's io.vllm.cache/ and io.vllm.manifest/manifest.json)"
    )


class _Dirs:
    """Directories under the extraction root, opened without following links.

    The descriptor of the last directory used is kept: layers are sorted, so
    consecutive files share a directory.
    """

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        self._last: tuple[tuple[str, ...], int] | None = None

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *_: object) -> None:
        self._forget()

    def ensure(self, parts: tuple[str, ...], member: str) -> int:
        """A descriptor of ``<root>/<parts>``, creating what is missing (mode 0o755)."""
        if not parts:
            return self._root
        if self._last is not None and self._last[0] == parts:
            return self._last[1]
        self._forget()
        fd = self._root
        try:
            for part in parts:
                try:
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                    made = True
                except FileExistsError:
                    made = False
                child = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
                if fd != self._root:
                    os.close(fd)
                fd = child
                if made:
                    os.fchmod(fd, DIR_MODE)  # the umask must not decide what pods can read
        except OSError as exc:
            if fd != self._root:
                os.close(fd)
            if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
                raise UnsafeArchiveError(
                    f"layer member {member!r}: its directory collides with an earlier member"
                ) from exc
            raise
        self._last = (parts, fd)
        return fd

    def _forget(self) -> None:
        if self._last is not None:
            os.close(self._last[1])
            self._last = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _empty(root_fd: int) -> None:
    """Remove everything under the extraction root (never following a link)."""
    for name in os.listdir(root_fd):
        if stat.S_ISDIR(os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=root_fd)
        else:
            os.unlink(name, dir_fd=root_fd)
