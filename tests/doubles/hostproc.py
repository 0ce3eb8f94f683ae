"""A host ``/proc`` in a temp dir: the files the GPU exporter reads, in their real formats.

The exporter's DaemonSet mounts the host's /proc at /host/proc. Processes of
other pods cannot be made here, so tests write the four files the exporter
reads for each PID: ``stat`` (start time in field 22), ``status`` (``Uid:``),
``cmdline`` (NUL-separated) and ``cgroup``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path


def containerd_cgroup_v2(pod_uid: str, container_id: str, qos: str = "burstable") -> str:
    """A cgroup v2 file of a containerd container under the systemd driver."""
    escaped = pod_uid.replace("-", "_")
    return (
        f"0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{escaped}.slice/"
        f"cri-containerd-{container_id}.scope\n"
    )


HOST_CGROUP = "0::/system.slice/sshd.service\n"
"""The cgroup of a process that is in no pod."""


class HostProc:
    """Writes and removes fake processes under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # resolve_host_proc() recognises a procfs by a numeric entry or `self`.
        (root / "self").mkdir(exist_ok=True)

    def add(
        self,
        pid: int,
        *,
        cgroup: str = HOST_CGROUP,
        start_time: int = 1000,
        uid: int = 0,
        cmdline: Sequence[str] = ("python", "train.py"),
        comm: str = "python",
    ) -> None:
        """Create (or replace) process ``pid``."""
        directory = self.root / str(pid)
        directory.mkdir(exist_ok=True)
        # Fields 3..52 of a real stat line; field 22 (index 19 after comm) is starttime.
        rest = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12
        rest += [str(start_time)] + ["0"] * 30
        (directory / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n")
        (directory / "status").write_text(
            f"Name:\t{comm}\nState:\tS (sleeping)\nPid:\t{pid}\n"
            f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"
        )
        (directory / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in cmdline))
        (directory / "cgroup").write_text(cgroup)

    def remove(self, pid: int) -> None:
        """The process exits."""
        shutil.rmtree(self.root / str(pid))
