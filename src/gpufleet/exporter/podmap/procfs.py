"""Process facts read from a proc root: start time, owner, command line and pod.

NVML reports host PIDs, so in the DaemonSet the exporter reads the host's
``/proc`` mounted at ``/host/proc``. Every process can exit at any moment while
it is being read, so each read here answers None instead of raising when a
file vanishes, cannot be read or holds something unexpected.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpufleet.exporter.errors import ExporterError
from gpufleet.exporter.podmap.cgroup import CgroupRef, parse_cgroup

__all__ = ["HOST_PROC", "LOCAL_PROC", "ProcFs", "ProcessInfo", "resolve_host_proc"]

log = logging.getLogger(__name__)

HOST_PROC = Path("/host/proc")
"""Where the DaemonSet mounts the host's /proc."""
LOCAL_PROC = Path("/proc")
"""This process's own /proc: right when the exporter runs on the host itself."""

# Upper bounds on what one read takes in. /proc files report size 0, so a bound
# is the only thing that stops a huge command line (ARG_MAX is megabytes) from
# being copied whole for every new process; these comfortably hold real files.
_STAT_LIMIT = 4096
_STATUS_LIMIT = 16384
_CMDLINE_LIMIT = 16384
_CGROUP_LIMIT = 65536

# Field 22 of /proc/<pid>/stat, counted from the first field after "(comm)",
# which is field 3.
_START_TIME_INDEX = 22 - 3


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What the exporter knows about one host process."""

    pid: int
    start_time: int
    """Field 22 of /proc/<pid>/stat (clock ticks since boot); with ``pid`` it
    identifies a process across PID reuse."""
    uid: int
    """Real uid, from the ``Uid:`` line of /proc/<pid>/status."""
    username: str
    """The name of ``uid``, or ``str(uid)`` when it has none."""
    command: str
    """The arguments of /proc/<pid>/cmdline joined by spaces; ``[comm]`` when
    there are none (kernel threads, zombies)."""
    cgroup: CgroupRef | None
    """The pod and container the process runs in; None outside any pod."""


def _passwd_name(uid: int) -> str | None:
    """The passwd name of ``uid``, or None when there is no entry for it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


class ProcFs:
    """Reads process facts under a proc root.

    In the DaemonSet the root is the host's /proc mounted at /host/proc, because
    NVML names processes by their host PIDs.
    """

    def __init__(self, root: Path, *, user_name: Callable[[int], str | None] | None = None) -> None:
        """Read under ``root``; ``user_name`` names a uid (default: the passwd database)."""
        self._root = root
        self._user_name = user_name if user_name is not None else _passwd_name
        # Uids are few and their names rarely change, while a lookup can mean a
        # file read or an NSS call, so every answer (unknown included) is kept.
        self._names: dict[int, str] = {}

    @property
    def root(self) -> Path:
        """The proc root this reads under."""
        return self._root

    def start_time(self, pid: int) -> int | None:
        """The start time of ``pid`` in clock ticks since boot; None if it is gone or unreadable."""
        stat = self._stat(pid)
        return stat[1] if stat is not None else None

    def read(self, pid: int) -> ProcessInfo | None:
        """Everything known about ``pid``; None if it is gone, unreadable or exits while read."""
        stat = self._stat(pid)
        if stat is None:
            return None
        comm, start_time = stat
        base = self._root / str(pid)
        status = _read(base / "status", _STATUS_LIMIT)
        cmdline = _read(base / "cmdline", _CMDLINE_LIMIT)
        cgroup = _read(base / "cgroup", _CGROUP_LIMIT)
        if status is None or cmdline is None or cgroup is None:
            return None
        uid = _real_uid(status)
        if uid is None:
            log.debug("no Uid line in %s", base / "status")
            return None
        username = self._username(uid)
        # The files above are read one after another; if the PID died and was
        # reused meanwhile they would describe two processes. The start time
        # read again tells that apart, and also catches an exit halfway through.
        if self.start_time(pid) != start_time:
            return None
        return ProcessInfo(
            pid=pid,
            start_time=start_time,
            uid=uid,
            username=username,
            command=_command(cmdline, comm),
            cgroup=parse_cgroup(cgroup.decode("utf-8", "replace")),
        )

    def pids(self) -> list[int]:
        """The numeric entries of the proc root, sorted (for tests and debugging)."""
        try:
            with os.scandir(self._root) as entries:
                return sorted(int(entry.name) for entry in entries if _is_pid(entry.name))
        except OSError as exc:
            raise ExporterError(f"cannot list proc root {self._root}: {exc}") from exc

    def _stat(self, pid: int) -> tuple[str, int] | None:
        """(comm, start time) from /proc/<pid>/stat, or None."""
        path = self._root / str(pid) / "stat"
        data = _read(path, _STAT_LIMIT)
        if data is None:
            return None
        parsed = _parse_stat(data)
        if parsed is None:
            log.debug("malformed %s", path)
        return parsed

    def _username(self, uid: int) -> str:
        """The cached name of ``uid``, or its number when it has none."""
        name = self._names.get(uid)
        if name is None:
            name = self._user_name(uid) or str(uid)
            self._names[uid] = name
        return name


def resolve_host_proc(
    requested: Path | None, *, host: Path = HOST_PROC, local: Path = LOCAL_PROC
) -> Path:
    """The proc root behind ``--host-proc``.

    The requested path if one is given (an ExporterError if it is not a
    directory); otherwise ``host`` when it exists and looks like a procfs (it
    has a numeric entry or ``self``), else ``local``.
    """
    if requested is not None:
        if not requested.is_dir():
            raise ExporterError(f"--host-proc {requested}: no such directory")
        return requested
    return host if _looks_like_procfs(host) else local


def _looks_like_procfs(path: Path) -> bool:
    """Whether ``path`` is a directory holding a process entry or ``self``."""
    try:
        with os.scandir(path) as entries:
            return any(entry.name == "self" or _is_pid(entry.name) for entry in entries)
    except OSError:
        return False


def _is_pid(name: str) -> bool:
    """Whether a proc entry name is a PID (ASCII digits only, unlike str.isdigit)."""
    return name.isascii() and name.isdigit()


def _read(path: Path, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of ``path``; None on any OSError (gone, denied, not a file)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except OSError as exc:
        # Processes exit all the time; this is the normal case, not news.
        log.debug("cannot read %s: %s", path, exc)
        return None


def _parse_stat(data: bytes) -> tuple[str, int] | None:
    """(comm, start time) from the text of /proc/<pid>/stat, or None if malformed."""
    # comm may itself hold spaces and ')', so it ends at the last ')'.
    opening = data.find(b"(")
    closing = data.rfind(b")")
    if opening < 0 or closing < opening:
        return None
    fields = data[closing + 1 :].split()
    if len(fields) <= _START_TIME_INDEX:
        return None
    raw = fields[_START_TIME_INDEX]
    if not raw.isdigit():
        return None
    return data[opening + 1 : closing].decode("utf-8", "replace"), int(raw)


def _real_uid(status: bytes) -> int | None:
    """The real uid from the ``Uid:`` line of /proc/<pid>/status, or None."""
    for line in status.split(b"\n"):
        if line.startswith(b"Uid:"):
            fields = line[4:].split()
            if fields and fields[0].isdigit():
                return int(fields[0])
            return None
    return None


def _command(cmdline: bytes, comm: str) -> str:
    """The command line as ps shows it: NUL-separated arguments joined by spaces."""
    # The kernel ends the last argument with a NUL too; a process that rewrote
    # its argv (setproctitle) may leave a run of them.
    args = cmdline.rstrip(b"\0")
    if not args:
        return f"[{comm}]"
    return args.replace(b"\0", b" ").decode("utf-8", "replace")
