"""What is mounted where (``/proc/self/mountinfo``); the CSI plugin's read-only bind mounts.

The CSI Node service serves a store entry to a pod by bind-mounting it at the kubelet's target
path, **read-only always**: a bind mount first (``MS_BIND``), then a remount of that bind with
``MS_RDONLY`` (``mount --bind`` + ``mount -o remount,bind,ro``), through mount(2) itself. A
failed remount undoes the bind, so a writable view of the store is never left behind. The
remount keeps the flags the source's mount has (``nosuid``, ``nodev``, ``noexec``, atime) and
adds ``nosuid,nodev``: the kernel refuses to clear a flag that a less privileged mount namespace
locked, and a kernel cache never needs setuid files or devices.

`os.path.ismount` cannot see a bind mount within one filesystem, so "is it mounted, and from
what" is answered from mountinfo: `read_mountinfo` parses it (octal escapes such as ``\\040``
decoded), `mounted_at` finds the topmost mount at a path and `mounted_from` says whether that
mount shows a given source directory.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.kcache.errors import KcacheError

__all__ = [
    "MountEntry",
    "MountError",
    "bind_read_only",
    "mounted_at",
    "mounted_from",
    "parse_mountinfo",
    "read_mountinfo",
    "unmount",
]

MOUNTINFO = Path("/proc/self/mountinfo")

# <linux/mount.h>
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_RELATIME = 0x200000
_UMOUNT_NOFOLLOW = 0x8
# statvfs f_flag bits and the mount flags that keep them on a remount.
_KEPT_FLAGS = (
    (os.ST_NOSUID, _MS_NOSUID),
    (os.ST_NODEV, _MS_NODEV),
    (os.ST_NOEXEC, _MS_NOEXEC),
    (os.ST_NOATIME, _MS_NOATIME),
    (os.ST_NODIRATIME, _MS_NODIRATIME),
    (os.ST_RELATIME, _MS_RELATIME),
)


class MountError(KcacheError):
    """A mount or unmount failed, or mountinfo cannot be read; the message names the paths."""


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of mountinfo (proc(5)): a mount, where it is and what it shows."""

    mount_id: int
    parent_id: int
    root: str
    """The directory of the filesystem this mount shows (``/`` unless a bind of a subtree)."""
    mount_point: Path
    options: frozenset[str]
    """The per-mount options (field 6): ``ro`` or ``rw``, ``nosuid``, ``relatime``…"""
    fstype: str
    source: str
    device: str = ""
    """``major:minor`` of the filesystem: with `root`, what the mount shows."""
    optional: tuple[str, ...] = ()
    """Optional fields such as ``shared:1`` or ``master:2`` (propagation)."""
    super_options: frozenset[str] = field(default_factory=frozenset)

    @property
    def read_only(self) -> bool:
        """The mount itself is read-only (whatever its filesystem is)."""
        return "ro" in self.options


def _unescape(field_bytes: bytes) -> str:
    """A mountinfo field with its ``\\ooo`` escapes (space, tab, newline, ``\\``) undone."""
    if b"\\" not in field_bytes:
        return os.fsdecode(field_bytes)
    out = bytearray()
    i = 0
    while i < len(field_bytes):
        octal = field_bytes[i + 1 : i + 4]
        if (
            field_bytes[i] == ord("\\")
            and len(octal) == 3
            and all(ord("0") <= c <= ord("7") for c in octal)
        ):
            out.append(int(octal, 8) & 0xFF)
            i += 4
        else:
            out.append(field_bytes[i])
            i += 1
    return os.fsdecode(bytes(out))


def _parse_line(line: bytes) -> MountEntry:
    fields = line.split(b" ")
    try:
        separator = fields.index(b"-", 6)
    except ValueError:
        raise ValueError("no '-' separator after the optional fields") from None
    if len(fields) < separator + 3:
        raise ValueError("fewer than 3 fields after the separator")
    return MountEntry(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        device=os.fsdecode(fields[2]),
        root=_unescape(fields[3]),
        mount_point=Path(_unescape(fields[4])),
        options=frozenset(os.fsdecode(fields[5]).split(",")),
        optional=tuple(os.fsdecode(f) for f in fields[6:separator] if f),
        fstype=_unescape(fields[separator + 1]),
        source=_unescape(fields[separator + 2]),
        super_options=frozenset(
            os.fsdecode(fields[separator + 3]).split(",") if len(fields) > separator + 3 else ()
        ),
    )


def parse_mountinfo(text: bytes) -> list[MountEntry]:
    """The entries of mountinfo `text`, in its order (parents before the mounts on them)."""
    entries = []
    for number, line in enumerate(text.split(b"\n"), start=1):
        if not line:
            continue
        try:
            entries.append(_parse_line(line))
        except ValueError as exc:
            raise MountError(f"mountinfo line {number}: {exc}: {line[:200]!r}") from None
    return entries


def read_mountinfo(path: Path = MOUNTINFO) -> list[MountEntry]:
    """The mounts this process sees, from `path` (``/proc/self/mountinfo``)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise MountError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_mountinfo(text)


def mounted_at(path: Path, entries: Sequence[MountEntry]) -> MountEntry | None:
    """The topmost mount whose mount point is `path` (the one a lookup of `path` sees), or None.

    `path` is compared as given (absolute and normalised, as mountinfo writes mount points).
    Of several mounts stacked at one point, the top one is not the parent of another there.
    """
    stacked = [e for e in entries if e.mount_point == path]
    if not stacked:
        return None
    parents = {e.parent_id for e in stacked}
    on_top = [e for e in stacked if e.mount_id not in parents]
    return (on_top or stacked)[-1]


def _containing(path: Path, entries: Sequence[MountEntry]) -> MountEntry | None:
    """The mount a lookup of `path` ends in: the topmost one at its longest mounted prefix."""
    for candidate in (path, *path.parents):
        entry = mounted_at(candidate, entries)
        if entry is not None:
            return entry
    return None


def _shown_root(path: Path, entries: Sequence[MountEntry]) -> tuple[str, str] | None:
    """(device, directory in that filesystem) that `path` is, as a bind mount of it would show."""
    entry = _containing(path, entries)
    if entry is None:
        return None
    relative = path.relative_to(entry.mount_point)
    root = os.path.normpath(os.path.join(entry.root, relative)) if relative.parts else entry.root
    return entry.device, root


def mounted_from(target: Path, source: Path, entries: Sequence[MountEntry]) -> bool:
    """`target` is a mount point showing the directory `source` (a bind mount of it).

    Compared by filesystem and directory within it, so it holds however the source's own
    filesystem is mounted in this namespace. `source` is resolved first; it need not exist.
    """
    entry = mounted_at(target, entries)
    if entry is None:
        return False
    shown = _shown_root(Path(os.path.realpath(source)), entries)
    return shown is not None and (entry.device, entry.root) == shown


def _libc_mount(source: str | None, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    src = None if source is None else os.fsencode(source)
    if libc.mount(src, os.fsencode(target), None, ctypes.c_ulong(flags), None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _kept_flags(path: Path) -> int:
    flags = os.statvfs(path).f_flag
    return sum(mount_flag for st_flag, mount_flag in _KEPT_FLAGS if flags & st_flag)


def bind_read_only(source: Path, target: Path) -> None:
    """Bind-mount the directory `source` at `target` (an existing directory), read-only.

    Raises `MountError` naming both; on a failed remount the bind is undone first.
    """
    try:
        _libc_mount(os.fspath(source), os.fspath(target), _MS_BIND)
    except OSError as exc:
        raise MountError(f"bind mount of {source} at {target}: {exc.strerror}") from None
    try:
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _kept_flags(target)
        _libc_mount(None, os.fspath(target), flags)
    except OSError as exc:
        reason = exc.strerror
        try:
            unmount(target)
        except MountError as undo:
            reason = f"{reason}; undoing the bind failed too: {undo}"
        raise MountError(f"read-only remount of {target}: {reason}") from None


def unmount(target: Path) -> None:
    """Unmount the topmost mount at `target` (never following a symlink there).

    Raises `MountError` when nothing is mounted there or the mount is busy.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(target), _UMOUNT_NOFOLLOW) != 0:
        code = ctypes.get_errno()
        what = "not a mount point" if code == errno.EINVAL else os.strerror(code)
        raise MountError(f"unmount of {target}: {what}")
