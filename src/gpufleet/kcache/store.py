"""The node's content-addressed store of extracted caches: ``<root>/sha256/<hex>/``.

A cache lands in the store whole or not at all: it is filled in a temporary
directory on the same filesystem, flushed, renamed into place, and only then
is its completion marker (``<root>/sha256/<hex>.complete``) written. A
directory without a marker is a crash's leftover and is redone. One lock
file per digest (``flock``) lets one installer fill while the others wait.
See docs/kcache-image.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gpufleet.kcache.errors import KcacheError

__all__ = ["CacheStore"]

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_MARKER_SUFFIX = ".complete"
_DIR_MODE = 0o755


class CacheStore:
    """Extracted caches by manifest digest, installed atomically and at most once.

    With ``durable=False`` nothing is flushed to disk before the marker is
    written (tests and benchmarks); a power loss may then leave a marked but
    incomplete cache.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable

    def path(self, manifest_digest: str) -> Path:
        """``<root>/sha256/<hex>/``: where the cache of `manifest_digest` lies once installed."""
        return self.root / "sha256" / _hex(manifest_digest)

    def is_complete(self, manifest_digest: str) -> bool:
        """Whether the cache of `manifest_digest` is installed (its marker exists)."""
        return self._marker(_hex(manifest_digest)).is_file() and self.path(manifest_digest).is_dir()

    def install(self, manifest_digest: str, fill: Callable[[Path], None]) -> Path:
        """Install the cache of `manifest_digest` with ``fill(tmp_dir)``, unless it is there.

        `fill` gets an empty directory (mode 0o755) on the store's filesystem.
        If it raises, the directory is removed and the error passes on. A
        caller that finds another installer at work waits for it and then
        returns the finished path without calling `fill`.
        """
        hex_ = _hex(manifest_digest)
        target = self.path(manifest_digest)
        if self.is_complete(manifest_digest):
            return target
        for sub in ("sha256", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        with self._locked(hex_):
            if self.is_complete(manifest_digest):
                return target
            self._clear_leftovers(hex_, target)
            tmp = Path(tempfile.mkdtemp(prefix=f"{hex_}.", dir=self.root / "tmp"))
            try:
                tmp.chmod(_DIR_MODE)  # mkdtemp's 0o700 would hide the cache from pods
                fill(tmp)
                if self.durable:
                    _sync_filesystem(tmp)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._sync_dir(target.parent)
            self._write_marker(hex_)
        return target

    def _marker(self, hex_: str) -> Path:
        return self.root / "sha256" / f"{hex_}{_MARKER_SUFFIX}"

    @contextlib.contextmanager
    def _locked(self, hex_: str) -> Iterator[None]:
        # flock belongs to the open file description: threads of one process exclude
        # each other as processes do, since each installer opens the file itself.
        fd = os.open(self.root / "locks" / f"{hex_}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _clear_leftovers(self, hex_: str, target: Path) -> None:
        """Remove what a crashed installer of this digest left (we hold its lock)."""
        if target.exists() or target.is_symlink():
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        for stale in (self.root / "tmp").glob(f"{hex_}.*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _write_marker(self, hex_: str) -> None:
        marker = self._marker(hex_)
        tmp = marker.with_name(f".{marker.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"sha256:{hex_}\n".encode())
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


def _hex(manifest_digest: str) -> str:
    match = _DIGEST.fullmatch(manifest_digest)
    if match is None:
        raise KcacheError(f"{manifest_digest!r}: not a sha256 digest (sha256:<64 lowercase hex>)")
    return match.group(1)


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
