"""Which pod (and container) a process belongs to, read from ``/proc/<pid>/cgroup``.

Each line of that file is ``hierarchy-id:controllers:path``. The kubelet places
every pod in a cgroup named after the pod UID, and the runtime puts each
container in a child of it, so the path names both. The shapes differ by
cgroup driver and runtime:

* cgroupfs driver (v1 and v2, also the k3s default):
  ``/kubepods[/burstable|/besteffort]/pod<uid>/<container-id>``; CRI-O writes
  the leaf as ``crio-<id>`` and its monitor as ``crio-conmon-<id>``.
* systemd driver (kubeadm, OpenShift, rke2, k3s under systemd >= 244):
  ``/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/<leaf>``
  with ``_`` in place of ``-`` in the UID, and a leaf of
  ``cri-containerd-<id>.scope``, ``crio-<id>.scope`` (CRI-O may nest a
  ``/container`` cgroup below it) or ``docker-<id>.scope``. Guaranteed pods have
  no QoS slice, and ``--cgroup-root=kubelet.slice`` (kind) prefixes every slice
  name with ``kubelet-``.
* a systemd ``cgroupsPath`` taken literally by a runtime left on cgroupfs:
  ``/kubepods-<qos>-pod<uid>.slice:cri-containerd:<id>``.

The path can sit below any parent (kind and k3d nodes are Docker containers,
CI runners add ``/actions_job/<id>``), and when the reader is in a cgroup
namespace it is relative to the reader's own cgroup (``/../../besteffort/...``),
so ``kubepods`` itself may be out of sight. The parser therefore looks for the
pod segment anywhere in the path and trusts it only when it carries a
well-formed UID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CgroupRef", "parse_cgroup"]

# The kernel prints at most a PATH_MAX path per line; anything much longer is not
# a real cgroup file, and skipping it keeps the parse cheap whatever it is fed.
_MAX_LINE = 8192

# A pod UID (8-4-4-4-12, with "_" for "-" in systemd slice names), or the
# 32-hex UID the kubelet gives a static pod (the MD5 of its manifest and
# source), which its mirror pod carries in the kubernetes.io/config.mirror
# annotation.
_UID = (
    r"(?P<uid>[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}"
    r"[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}|[0-9a-fA-F]{32})"
)

# cgroupfs driver: the segment is exactly "pod" + UID.
_CGROUPFS_POD = re.compile(r"pod" + _UID, re.ASCII)

# systemd driver: "kubepods-pod<uid>.slice", "kubepods-besteffort-pod<uid>.slice",
# with any "<root>-" prefix that --cgroup-root adds ("kubelet-kubepods-...").
# Requiring "kubepods" keeps other UUID-named slices out.
_SYSTEMD_POD = re.compile(
    r"(?:[\w.]+-)*kubepods(?:-[a-z]+)?-pod" + _UID + r"\.slice"
    r"(?::[\w-]+:(?P<literal_id>[^:/]*))?",
    re.ASCII,
)

# The container's own cgroup, directly below the pod's. Only hex ids are taken:
# containerd, CRI-O and Docker all use 64 hex digits, and a shorter or longer
# hex id is still unambiguous; any other leaf (the CRI-O conmon monitor, a
# runtime we do not know) leaves the container unknown rather than guessed.
_HEX_ID = r"([0-9a-fA-F]{12,128})"
_SCOPE_LEAF = re.compile(r"(?:cri-containerd|crio|docker)-" + _HEX_ID + r"\.scope", re.ASCII)
_PLAIN_LEAF = re.compile(r"(?:crio-)?" + _HEX_ID, re.ASCII)
_BARE_ID = re.compile(_HEX_ID, re.ASCII)


@dataclass(frozen=True, slots=True)
class CgroupRef:
    """The pod, and when known the container, that a process's cgroup names."""

    pod_uid: str
    """Canonical pod UID: lower-case, with dashes (8-4-4-4-12); for a static
    pod, the kubelet's 32 lower-case hex digits."""
    container_id: str | None
    """Bare runtime container id (no ``containerd://``, ``cri-containerd-`` or
    ``.scope``); None when only the pod level is known."""


def parse_cgroup(text: str) -> CgroupRef | None:
    """The pod (and container) a process belongs to, from the text of /proc/<pid>/cgroup.

    Returns None for processes outside any pod and for text that is not a
    cgroup file; it never raises. When lines disagree (cgroup v1 and v2 mounted
    side by side), the unified ``0::`` line wins if it names a pod, otherwise the
    first line that names one does.

    A process in CRI-O's ``crio-conmon-<id>`` cgroup is attributed to its pod
    with ``container_id`` None: conmon lives in the pod but is not the workload.
    """
    first: CgroupRef | None = None
    for line in text.split("\n"):
        if len(line) > _MAX_LINE:
            continue
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        # The path itself may contain ':' (the literal systemd form), so only the
        # first two separate fields.
        if not sep or not sep2 or not path.startswith("/") or "pod" not in path:
            continue
        unified = hierarchy == "0" and controllers == ""
        # Once a v1 line has named a pod only the unified line can change the
        # answer, and v1 files repeat one path a dozen times.
        if first is not None and not unified:
            continue
        ref = _parse_path(path)
        if ref is None:
            continue
        if unified:
            return ref
        first = ref
    return first


def _parse_path(path: str) -> CgroupRef | None:
    """The pod and container named by one cgroup path, or None."""
    segments = path.split("/")
    # The outermost pod wins: below it may sit a nested kubelet's pods (kind or
    # k3s run inside a pod), which this node's API server does not know.
    for index, segment in enumerate(segments):
        if not segment.startswith("pod") and "-pod" not in segment:
            continue
        match = _CGROUPFS_POD.fullmatch(segment)
        literal_id: str | None = None
        if match is None:
            match = _SYSTEMD_POD.fullmatch(segment)
            if match is None:
                continue
            literal_id = match.group("literal_id")
        uid = match.group("uid").lower().replace("_", "-")
        if literal_id is not None:
            bare = _BARE_ID.fullmatch(literal_id)
            return CgroupRef(uid, bare.group(1).lower() if bare else None)
        leaf = segments[index + 1] if index + 1 < len(segments) else ""
        return CgroupRef(uid, _container_id(leaf))
    return None


def _container_id(leaf: str) -> str | None:
    """The container id in the cgroup segment below the pod's, or None."""
    match = _SCOPE_LEAF.fullmatch(leaf) or _PLAIN_LEAF.fullmatch(leaf)
    return match.group(1).lower() if match else None
