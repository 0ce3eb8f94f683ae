"""The node's content-addressed store of extracted caches, by manifest digest and mount root.

An extracted cache is only right for one mount root: its ``__grp__`` files name
the absolute paths pods will see its files at. So the store keys a cache by
both, ``<root>/caches/sha256/<hex>/<mount key>/``, where the mount key is the
sha256 of the mount root; the same image extracted for two mount roots is two
directories, each naming its own root.

A cache lands in the store whole or not at all: it is filled in a temporary
directory on the same filesystem, flushed, renamed into place, and only then
is its completion marker (``<mount key>.complete``, beside the directory,
recording the digest and the mount root) written. A directory without a marker
is a crash's leftover and is redone. One lock file per digest and mount root
(``flock``) lets one installer fill while the others wait. A temporary
directory whose lock nobody holds is a killed installer's leftover: the first
install of a `CacheStore` sweeps every one of them (`sweep`), whatever its
digest, and what a killed `remove` left.

`derive` makes a digest's entry for another mount root from an installed one,
with no network: a copy whose group files name the new root. `remove` drops an
entry (marker first, under its lock). For garbage collection (gc.py) each
marker also records the entry's size on disk, measured once at install, and
its mtime is the entry's last use (`touch`), so the least-recently-used order
survives restarts. See docs/kcache-image.md and docs/kcache-cluster.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpufleet.kcache.errors import CacheFormatError, KcacheError
from gpufleet.kcache.groups import (
    check_mount_root,
    is_group_file,
    mounted_child_paths,
    stored_child_paths,
)

__all__ = ["CacheStore", "CacheUsage", "StoredCache", "mount_key"]

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_HEX = re.compile(r"[0-9a-f]{64}")
_TMP_NAME = re.compile(r"([0-9a-f]{64}-[0-9a-f]{64})\.[^/]+")
_MARKER_SUFFIX = ".complete"
_DIR_MODE = 0o755
_FILE_MODE = 0o644
_MAX_GROUP_FILE = 16 << 20  # as extraction: a group file is read whole, so it is bounded
CACHES = "caches"
"""The store's top directory of installed caches (``<root>/caches/sha256/...``)."""


def mount_key(mount_root: str) -> str:
    """The directory name a mount root's caches get: the sha256 (hex) of the mount root.

    A hash, not the path itself: a mount root may be longer than a file name
    may be, and holds slashes. The marker keeps the mount root in clear.
    """
    return hashlib.sha256(check_mount_root(mount_root).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredCache:
    """One installed cache: the image it came from, the mount root it was made for, its path."""

    digest: str
    mount_root: str
    path: Path


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """An installed cache with what garbage collection weighs: its size and its last use."""

    cache: StoredCache
    size_bytes: int
    """Bytes on disk (allocated blocks of its files and directories), measured at install."""
    last_used: float
    """Seconds since the epoch: the install, or the latest `CacheStore.touch`."""


class CacheStore:
    """Extracted caches by manifest digest and mount root, installed atomically and at most once.

    With ``durable=False`` nothing is flushed to disk before the marker is
    written (tests and benchmarks); a power loss may then leave a marked but
    incomplete cache.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable
        self._swept = False

    def path(self, manifest_digest: str, mount_root: str) -> Path:
        """``<root>/caches/sha256/<hex>/<mount key>/``: where the cache lies once installed.

        The cache of `manifest_digest` whose ``__grp__`` files name `mount_root`.
        """
        return self._digest_dir(_hex(manifest_digest)) / mount_key(mount_root)

    def installed(self, manifest_digest: str, mount_root: str) -> Path | None:
        """The path of `manifest_digest`'s cache made for `mount_root`; None if not installed."""
        path = self.path(manifest_digest, mount_root)
        return path if self._complete(path) else None

    def is_complete(self, manifest_digest: str, mount_root: str) -> bool:
        """Whether the cache of `manifest_digest` for `mount_root` is installed (marker and all)."""
        return self.installed(manifest_digest, mount_root) is not None

    def caches(self) -> list[StoredCache]:
        """Every installed cache, sorted by digest then mount root (read from the markers).

        A marker that cannot be read, or whose directory is gone, is left out:
        such a cache is not installed, and the next install of it redoes it.
        """
        found: list[StoredCache] = []
        for marker in sorted((self.root / CACHES / "sha256").glob(f"*/*{_MARKER_SUFFIX}")):
            record = _read_marker(marker)
            if record is None:
                continue
            try:
                path = self.path(record.digest, record.mount_root)
            except KcacheError:
                continue
            if path == marker.with_suffix("") and path.is_dir():
                found.append(StoredCache(record.digest, record.mount_root, path))
        return sorted(found, key=lambda c: (c.digest, c.mount_root))

    def usage(self) -> list[CacheUsage]:
        """Every installed cache with its size on disk and its last use, as `caches` orders them.

        What garbage collection plans from. An entry removed while this runs is
        left out.
        """
        found: list[CacheUsage] = []
        for cache in self.caches():
            try:
                size = self.entry_size(cache.digest, cache.mount_root)
                last_used = self._marker(cache.path).stat().st_mtime
            except (KcacheError, FileNotFoundError):
                continue
            found.append(CacheUsage(cache, size, last_used))
        return found

    def entry_size(self, manifest_digest: str, mount_root: str) -> int:
        """The bytes on disk of an installed cache: its files' and directories' allocated blocks.

        Measured once, when it is installed, and kept in its marker
        (``size_bytes``), so GC never walks a cache again. A marker from before
        sizes were recorded gets one the first time it is asked (its last use
        is kept). `KcacheError` if the cache is not installed.
        """
        target = self.path(manifest_digest, mount_root)
        marker = self._marker(target)
        record = _read_marker(marker) if target.is_dir() else None
        if record is not None and record.size_bytes is not None:
            return record.size_bytes
        if record is None:
            raise KcacheError(f"{manifest_digest} for mount root {mount_root!r}: not installed")
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        with self._locked(self._lock_name(target)):
            record = _read_marker(marker) if target.is_dir() else None
            if record is None:
                raise KcacheError(f"{manifest_digest} for mount root {mount_root!r}: not installed")
            if record.size_bytes is not None:
                return record.size_bytes
            size = _disk_usage(target)
            before = marker.stat()
            self._write_marker(target, manifest_digest, mount_root, size)
            os.utime(marker, ns=(before.st_atime_ns, before.st_mtime_ns))
            return size

    def touch(self, manifest_digest: str, mount_root: str, *, when: float | None = None) -> bool:
        """Record a use of the cache now (or at `when`, seconds since the epoch).

        The last use is the marker's mtime: set at install, moved by every
        touch (``utime``, no flush: a power loss may roll it back a little), so
        it outlives the process and the GC's least-recently-used order with
        it. Returns False, and records nothing, if the cache is not installed.
        """
        marker = self._marker(self.path(manifest_digest, mount_root))
        try:
            os.utime(marker, None if when is None else (when, when))
        except FileNotFoundError:
            return False
        return True

    def remove(self, manifest_digest: str, mount_root: str | None = None) -> list[StoredCache]:
        """Remove the cache of `manifest_digest` for `mount_root` (None: for every mount root).

        Under the entry's lock, so never while an installer fills it or a
        `derive` copies from it: the marker goes first, flushed, then the
        directory. A crash in between leaves a directory without a marker,
        which is not installed (never served) and which the next `sweep` or
        install of it removes. Returns the installed caches removed, in order;
        crash leftovers of the digest are cleared on the way without being
        listed. With a `mount_root`, an install of that entry in progress is
        waited for and its result removed; without one, only what is on disk
        under the digest is. The caller makes sure no pod mounts what it
        removes (gc.py).
        """
        hex_ = _hex(manifest_digest)
        if mount_root is not None:
            targets = [self.path(manifest_digest, mount_root)]
        else:
            try:
                names = os.listdir(self._digest_dir(hex_))
            except FileNotFoundError:
                names = []
            keys = {k for n in names if (k := _entry_key(n)) is not None}
            targets = [self._digest_dir(hex_) / k for k in sorted(keys)]
        removed: list[StoredCache] = []
        for target in targets:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            with self._locked(self._lock_name(target), drop=True):
                record = _read_marker(self._marker(target))
                was_installed = self._complete(target)
                self._drop_entry(target)
            if was_installed and record is not None and record.digest == manifest_digest:
                removed.append(StoredCache(manifest_digest, record.mount_root, target))
        self._drop_digest_dir(self._digest_dir(hex_))
        return removed

    def install(self, manifest_digest: str, mount_root: str, fill: Callable[[Path], None]) -> Path:
        """Install the cache of `manifest_digest` for `mount_root` with ``fill(tmp_dir)``.

        Nothing is done if it is installed already. `fill` gets an empty
        directory (mode 0o755) on the store's filesystem and must write the
        cache made for `mount_root` into it. If it raises, the directory is
        removed and the error passes on. A caller that finds another installer
        of the same digest and mount root at work waits for it and then returns
        the finished path without calling `fill`. The cache's size on disk is
        measured before it is renamed into place and kept in its marker.
        """
        hex_ = _hex(manifest_digest)
        target = self.path(manifest_digest, mount_root)
        if self._complete(target):
            return target
        name = f"{hex_}-{target.name}"
        for sub in ("tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not self._swept:
            self.sweep()
        with self._locked(name):
            if self._complete(target):
                return target
            self._clear_leftovers(name, target)
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.root / "tmp"))
            try:
                tmp.chmod(_DIR_MODE)  # mkdtemp's 0o700 would hide the cache from pods
                fill(tmp)
                size = _disk_usage(tmp)
                if self.durable:
                    _sync_filesystem(tmp)
                _rename_into(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._sync_dir(target.parent)
            self._sync_dir(target.parent.parent)  # a new <hex>/ must outlive a crash too
            self._write_marker(target, manifest_digest, mount_root, size)
        return target

    def derive(self, manifest_digest: str, from_root: str, to_root: str) -> Path:
        """Install `manifest_digest`'s cache for `to_root` from its complete `from_root` entry.

        No network: every file of the `from_root` entry is copied, and every
        ``__grp__`` file is rewritten so that its child paths name `to_root`
        (`groups.stored_child_paths`, then `groups.mounted_child_paths`), which
        is what extracting the image for `to_root` would have written. It goes
        through `install`, so the new entry is whole or absent, concurrent
        derives copy once, and a kill mid-copy leaves only a swept leftover.
        The source entry's lock is held shared meanwhile, so `remove` cannot
        take it away under the copy. Nothing is done if the `to_root` entry is
        installed already; `KcacheError` if the `from_root` one is not.
        """
        source = self.path(manifest_digest, from_root)
        target = self.path(manifest_digest, to_root)
        if source != target and self._complete(target):
            return target
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        with self._locked(self._lock_name(source), shared=True):
            if not self._complete(source):
                raise KcacheError(
                    f"{manifest_digest}: the cache for mount root {from_root!r} is not installed; "
                    f"nothing to derive the one for {to_root!r} from"
                )
            if source == target:
                return target
            return self.install(
                manifest_digest, to_root, lambda tmp: _copy_for_root(source, tmp, to_root)
            )

    def sweep(self) -> list[Path]:
        """Remove what killed installers and removers left; returns what went.

        A fill's temporary directory lives only while its installer holds the
        lock of its digest and mount root, so one whose lock can be taken at
        once belongs to a process that was killed (SIGKILL, OOM, power loss)
        and would otherwise stay until that same cache is installed again. One
        whose lock is held is being filled and is left alone. The same goes
        for an entry directory without its marker (an installer killed between
        rename and marker, or a `remove` killed between marker and directory)
        and for a marker whose directory is gone: neither is installed, and
        both go when their lock is free. `install` calls this once per store
        object, before its first fill; the node process calls it at start.
        """
        self._swept = True
        removed: list[Path] = []
        try:
            entries = sorted((self.root / "tmp").iterdir())
        except FileNotFoundError:
            entries = []
        names = {m.group(1) for e in entries if (m := _TMP_NAME.fullmatch(e.name)) is not None}
        for name in sorted(names):
            with self._try_locked(name) as free:
                if not free:
                    continue  # a live installer is filling it
                for stale in sorted((self.root / "tmp").glob(f"{name}.*")):
                    shutil.rmtree(stale, ignore_errors=True)
                    removed.append(stale)
        for digest_dir in sorted((self.root / CACHES / "sha256").glob("*")):
            if not _HEX.fullmatch(digest_dir.name):
                continue
            keys = {k for n in digest_dir.iterdir() if (k := _entry_key(n.name)) is not None}
            for key in sorted(keys):
                target = digest_dir / key
                half_marker = self._marker_tmp(target)
                if self._complete(target) and not half_marker.exists():
                    continue
                with self._try_locked(self._lock_name(target)) as free:
                    if not free:
                        continue  # an installer between its rename and its marker
                    if half_marker.exists():  # a marker write killed before its rename
                        half_marker.unlink()
                        removed.append(half_marker)
                    if self._complete(target):
                        continue
                    removed.extend(p for p in (self._marker(target), target) if p.exists())
                    self._drop_entry(target)
            self._drop_digest_dir(digest_dir)
        return removed

    def _drop_entry(self, target: Path) -> None:
        """Marker first (flushed), then the directory and any fill leftovers; lock held."""
        marker = self._marker(target)
        if marker.exists():
            marker.unlink()
            self._sync_dir(target.parent)  # gone for good before any of its files goes
        with contextlib.suppress(FileNotFoundError):
            self._marker_tmp(target).unlink()
        self._clear_leftovers(self._lock_name(target), target)

    @staticmethod
    def _drop_digest_dir(digest_dir: Path) -> None:
        """Remove a digest's directory once it is empty (`_rename_into` makes it again)."""
        with contextlib.suppress(OSError):  # not empty, or gone already
            digest_dir.rmdir()

    @contextlib.contextmanager
    def _try_locked(self, name: str) -> Iterator[bool]:
        """Hold `name`'s lock if nobody does (yields True), else yield False at once."""
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        fd = self._lock_fd(name, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            os.close(fd)

    def _digest_dir(self, hex_: str) -> Path:
        return self.root / CACHES / "sha256" / hex_

    @staticmethod
    def _marker(target: Path) -> Path:
        return target.with_name(f"{target.name}{_MARKER_SUFFIX}")

    @staticmethod
    def _marker_tmp(target: Path) -> Path:
        """Where a marker is written before it is renamed into place."""
        return target.with_name(f".{target.name}{_MARKER_SUFFIX}.tmp")

    def _complete(self, target: Path) -> bool:
        return self._marker(target).is_file() and target.is_dir()

    @staticmethod
    def _lock_name(target: Path) -> str:
        """``<hex>-<mount key>``: the name of an entry's lock and of its fills' temp dirs."""
        return f"{target.parent.name}-{target.name}"

    @contextlib.contextmanager
    def _locked(self, name: str, *, shared: bool = False, drop: bool = False) -> Iterator[None]:
        """Hold `name`'s lock (shared or exclusive); with `drop`, its file goes before release.

        `remove` drops the lock file of an entry it removed, so lock files do
        not pile up for every digest ever seen; `_lock_fd` makes that safe.
        """
        fd = self._lock_fd(name, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        assert fd is not None  # a blocking lock is always had in the end
        try:
            yield
            if drop:
                with contextlib.suppress(FileNotFoundError):
                    (self.root / "locks" / f"{name}.lock").unlink()
        finally:
            os.close(fd)

    def _lock_fd(self, name: str, operation: int) -> int | None:
        """An open descriptor holding `name`'s flock; None if LOCK_NB found it held.

        flock belongs to the open file description: threads of one process
        exclude each other as processes do, since each locker opens the file
        itself. A lock file may be unlinked by its holder (`remove`); whoever
        then gets the lock of the unlinked file retries with the new one, so
        two lockers never hold two different files of one name.
        """
        path = self.root / "locks" / f"{name}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, operation)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _clear_leftovers(self, name: str, target: Path) -> None:
        """Remove what a crashed installer of this cache left (we hold its lock)."""
        if target.exists() or target.is_symlink():
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        for stale in (self.root / "tmp").glob(f"{name}.*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _write_marker(
        self, target: Path, manifest_digest: str, mount_root: str, size_bytes: int
    ) -> None:
        marker, tmp = self._marker(target), self._marker_tmp(target)
        fields = {"digest": manifest_digest, "mount_root": mount_root, "size_bytes": size_bytes}
        record = json.dumps(fields, sort_keys=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{record}\n".encode())
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, marker)
        self._sync_dir(marker.parent)

    def _sync_dir(self, directory: Path) -> None:
        if not self.durable:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_for_root(source: Path, dest: Path, mount_root: str) -> None:
    """Copy the cache tree `source` into the empty `dest`, group files rewritten for `mount_root`.

    Only directories and regular files are copied (extraction writes nothing
    else); anything else in the source means it is not what the store wrote.
    """

    def fail(exc: OSError) -> None:
        raise KcacheError(f"{exc.filename}: cannot be read: {exc.strerror}") from exc

    for directory, dirnames, filenames in os.walk(source, onerror=fail):
        here = Path(directory)
        rel = here.relative_to(source)
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                raise KcacheError(f"{here / name}: is a symbolic link, not a regular file")
            (dest / rel / name).mkdir(mode=_DIR_MODE)
            (dest / rel / name).chmod(_DIR_MODE)  # the umask must not decide what pods can read
        for name in sorted(filenames):
            src, out = here / name, dest / rel / name
            if not src.is_file() or src.is_symlink():
                raise KcacheError(f"{src}: is a symbolic link or special file, not a regular file")
            if is_group_file(name):
                out.write_bytes(_group_for_root(src, rel, mount_root))
            else:
                shutil.copyfile(src, out, follow_symlinks=False)
            out.chmod(_FILE_MODE)


def _group_for_root(path: Path, group: Path, mount_root: str) -> bytes:
    """A stored ``__grp__`` file's bytes with its child paths naming `mount_root`."""
    if group == Path() or path.stat().st_size > _MAX_GROUP_FILE:
        raise KcacheError(f"{path}: a group file outside a group, or over 16 MiB")
    where, rel = str(path), group.as_posix()
    try:
        stored = stored_child_paths(path.read_bytes(), group=rel, where=where)
        return mounted_child_paths(stored, group=rel, mount_root=mount_root)
    except CacheFormatError as exc:
        raise KcacheError(f"cannot derive the cache for {mount_root!r}: {exc}") from exc


def _entry_key(name: str) -> str | None:
    """The mount key an entry's directory, marker or half-written marker is named by."""
    if name.startswith(".") and name.endswith(f"{_MARKER_SUFFIX}.tmp"):
        name = name[1 : -len(".tmp")]
    key = name.removesuffix(_MARKER_SUFFIX)
    return key if _HEX.fullmatch(key) else None


def _hex(manifest_digest: str) -> str:
    match = _DIGEST.fullmatch(manifest_digest)
    if match is None:
        raise KcacheError(f"{manifest_digest!r}: not a sha256 digest (sha256:<64 lowercase hex>)")
    return match.group(1)


@dataclass(frozen=True, slots=True)
class _Marker:
    digest: str
    mount_root: str
    size_bytes: int | None
    """None in a marker written before sizes were recorded."""


def _read_marker(marker: Path) -> _Marker | None:
    """What a marker records; None for one that is missing, unreadable or malformed."""
    if not _HEX.fullmatch(marker.name.removesuffix(_MARKER_SUFFIX)):
        return None
    try:
        record = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    digest, mount_root = record.get("digest"), record.get("mount_root")
    if not isinstance(digest, str) or not isinstance(mount_root, str):
        return None
    size = record.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        size = None
    return _Marker(digest, mount_root, size)


def _disk_usage(path: Path) -> int:
    """The bytes allocated to `path` and everything below it (st_blocks, links not followed)."""
    total = path.lstat().st_blocks * 512
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                total += _disk_usage(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def _rename_into(tmp: Path, target: Path) -> None:
    """Rename a filled directory to `target`, making its parent; a concurrent `remove` may
    drop an empty parent between the mkdir and the rename, so that is retried."""
    for attempt in range(10):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, target)
            return
        except FileNotFoundError:
            if attempt == 9 or not tmp.is_dir():
                raise


def _sync_filesystem(path: Path) -> None:
    """Flush the filesystem holding `path`: one syncfs(2) instead of an fsync per file."""
    # dlopen(NULL): the process's own symbols, libc's syncfs among them on Linux.
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
