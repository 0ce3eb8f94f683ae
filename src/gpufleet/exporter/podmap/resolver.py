"""From a PID to the pod, namespace and container that own it.

Layer (a), `procfs`/`cgroup`, turns a PID into a pod UID and a container ID.
This module is layer (b): it turns those into names, from a node-scoped pod
informer (`PodIndex`) or, when the API server cannot be reached, from the
labels docker writes into each container's ``config.v2.json`` (`DockerLabels`).
`ProcessAttributor` ties the layers together with the caches the collection
loop needs:

- Entries are keyed by (pid, process start time), so a PID the kernel hands to
  a process of another pod never inherits the old pod.
- Entries of PIDs that are no longer on any GPU are dropped at every pass.
- A pod process whose pod is not known yet (the informer has not seen it) is
  a negative result, cached for `negative_ttl` seconds and then looked up
  again; /proc is not read again for it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.exporter.podmap.cgroup import CgroupRef
from gpufleet.exporter.podmap.procfs import ProcessInfo, ProcFs
from gpufleet.exporter.snapshot import Owner

__all__ = [
    "DockerLabels",
    "OwnerLookup",
    "PodIndex",
    "ProcessAttributor",
    "ProcessIdentity",
    "bare_container_id",
    "label_name",
]

log = logging.getLogger(__name__)

OwnerLookup = Callable[[CgroupRef], Owner | None]
"""Names for a cgroup's pod UID and container ID; None when unknown."""

_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def bare_container_id(container_id: str) -> str:
    """``containerd://abc`` (a pod status's form) to ``abc`` (the cgroup's form)."""
    _, sep, rest = container_id.partition("://")
    return rest if sep else container_id


def label_name(pod_label: str) -> str:
    """The Prometheus label a pod label is copied to.

    ``app.kubernetes.io/name`` becomes ``label_app_kubernetes_io_name``.
    """
    return "label_" + _LABEL_CHARS.sub("_", pod_label)


MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
"""On a mirror pod: the UID the kubelet gave the static pod it stands for."""


@dataclass(frozen=True, slots=True)
class _PodRecord:
    namespace: str
    name: str
    containers: Mapping[str, str]
    """bare container id -> container name, over every kind of container status."""
    labels: tuple[tuple[str, str], ...]


def _uid_of(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("uid") or "").lower()


class PodIndex:
    """This node's pods by UID, kept by a pod informer's add/update/delete events.

    `labels` is the `--pod-label-allowlist` pattern: pod labels whose key it
    matches (``re.fullmatch``) are copied into owners as ``label_<key>``.
    """

    def __init__(self, *, label_allowlist: re.Pattern[str] | None = None) -> None:
        self._allow = label_allowlist
        self._pods: dict[str, _PodRecord] = {}
        # A static pod's cgroup is named after the kubelet's own UID for it,
        # which the mirror pod in the API carries as an annotation: that UID
        # -> the mirror pod's UID.
        self._mirrors: dict[str, str] = {}
        self.generation = 0
        """Moves on every change, so cached negative lookups know to ask again."""

    def __len__(self) -> int:
        return len(self._pods)

    def upsert(self, pod: Mapping[str, Any]) -> None:
        """Index (or re-index) one pod object, as the API server's JSON."""
        metadata = pod.get("metadata") or {}
        uid = str(metadata.get("uid") or "")
        if not uid:
            return
        status = pod.get("status") or {}
        containers: dict[str, str] = {}
        for kind in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            for container in status.get(kind) or ():
                container_id = container.get("containerID")
                if container_id and container.get("name"):
                    containers[bare_container_id(str(container_id))] = str(container["name"])
        uid = uid.lower()
        self._pods[uid] = _PodRecord(
            namespace=str(metadata.get("namespace") or ""),
            name=str(metadata.get("name") or ""),
            containers=containers,
            labels=self._copied_labels(metadata.get("labels") or {}),
        )
        self._forget_mirror(uid)
        mirror = (metadata.get("annotations") or {}).get(MIRROR_ANNOTATION)
        if isinstance(mirror, str) and mirror:
            self._mirrors[mirror.lower()] = uid
        self.generation += 1

    def remove(self, pod: Mapping[str, Any]) -> None:
        """Forget a deleted pod."""
        uid = str((pod.get("metadata") or {}).get("uid") or "").lower()
        if self._pods.pop(uid, None) is not None:
            self._forget_mirror(uid)
            self.generation += 1

    def _forget_mirror(self, uid: str) -> None:
        for static_uid in [k for k, v in self._mirrors.items() if v == uid]:
            del self._mirrors[static_uid]

    def lookup(self, ref: CgroupRef) -> Owner | None:
        """The owner of a cgroup; the container is ``""`` when its ID is not in the pod's status.

        A static pod's cgroup names the kubelet's UID for it; its mirror pod
        (the API's copy, with its own UID) is found by its
        ``kubernetes.io/config.mirror`` annotation, and its status lists the
        static pod's containers.
        """
        record = self._pods.get(ref.pod_uid)
        if record is None:
            mirror = self._mirrors.get(ref.pod_uid)
            record = self._pods.get(mirror) if mirror is not None else None
        if record is None:
            return None
        container = record.containers.get(ref.container_id or "", "")
        return Owner(record.namespace, record.name, container, record.labels)

    async def on_add(self, pod: Mapping[str, Any]) -> None:
        """Informer handler."""
        self.upsert(pod)

    async def on_update(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """Informer handler: a container restart changes the container IDs.

        An update whose UID differs is another pod under the same name (the
        informer announces that as a delete and an add; this is a second
        guard): the old UID is forgotten, or it would own processes for ever.
        """
        if _uid_of(old) != _uid_of(new):
            self.remove(old)
        self.upsert(new)

    async def on_delete(self, pod: Mapping[str, Any]) -> None:
        """Informer handler."""
        self.remove(pod)

    def _copied_labels(self, labels: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        if self._allow is None:
            return ()
        copied: dict[str, str] = {}
        for key in sorted(labels):
            if self._allow.fullmatch(key):
                # Two pod labels may sanitize to one name; the first (sorted) wins.
                copied.setdefault(label_name(key), str(labels[key]))
        return tuple(sorted(copied.items()))


class DockerLabels:
    """Owner names from the labels the kubelet (dockershim / cri-dockerd) puts on docker containers.

    Reads ``<root>/containers/<id>/config.v2.json``. It is the fallback for
    nodes whose exporter cannot reach the API server; it knows nothing of
    containerd or cri-o containers.
    """

    _NAME = "io.kubernetes.pod.name"
    _NAMESPACE = "io.kubernetes.pod.namespace"
    _CONTAINER = "io.kubernetes.container.name"
    _MAX_BYTES = 4 * 1024 * 1024  # a config.v2.json is a few KB; refuse a runaway file

    def __init__(self, root: Path) -> None:
        self._root = root

    def lookup(self, ref: CgroupRef) -> Owner | None:
        """The owner its labels name; None for non-docker or unreadable containers."""
        container_id = ref.container_id
        if not container_id or not re.fullmatch(r"[0-9a-f]{12,128}", container_id):
            return None
        path = self._root / "containers" / container_id / "config.v2.json"
        try:
            with path.open("rb") as handle:
                raw = handle.read(self._MAX_BYTES + 1)
            if len(raw) > self._MAX_BYTES:
                raise ValueError(f"larger than {self._MAX_BYTES} bytes")
            labels = json.loads(raw)["Config"]["Labels"]
            name, namespace = labels[self._NAME], labels[self._NAMESPACE]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("unreadable docker config", extra={"path": str(path), "error": str(exc)})
            return None
        if not isinstance(name, str) or not isinstance(namespace, str):
            return None
        container = labels.get(self._CONTAINER)
        return Owner(namespace, name, container if isinstance(container, str) else "")


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """What the process series of one PID are labelled with."""

    username: str
    command: str
    owner: Owner | None


_UNKNOWN = ProcessIdentity(username="", command="", owner=None)


@dataclass(slots=True)
class _Entry:
    info: ProcessInfo | None
    identity: ProcessIdentity
    retry_at: float | None
    """When to look the owner up again; None once it is final."""
    generation: int = 0
    """The lookups' generation when the owner was last looked up."""


class ProcessAttributor:
    """PIDs to `ProcessIdentity`, cached per (pid, start time).

    `lookups` are tried in order for a pod process: typically the pod index,
    then docker's labels. Call `attribute` once per collection with every PID
    that is on a GPU; it answers for each and forgets every other PID.

    A negative lookup is asked again after `negative_ttl` seconds, or as soon
    as `generation()` moves (the pod index changed): a pod that the informer
    learns of after its first process started is named at the next pass.
    """

    def __init__(
        self,
        procfs: ProcFs,
        lookups: Iterable[OwnerLookup] = (),
        *,
        negative_ttl: float = 5.0,
        generation: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if negative_ttl < 0:
            raise ValueError(f"negative_ttl must be >= 0, got {negative_ttl!r}")
        self._procfs = procfs
        self._lookups = tuple(lookups)
        self._negative_ttl = negative_ttl
        self._generation = generation
        self._clock = clock
        self._entries: dict[tuple[int, int | None], _Entry] = {}
        self.proc_reads = 0
        """How many times /proc/<pid> was read in full (tests assert the cache by it)."""
        self.owner_lookups = 0
        """How many times the owner lookups ran."""

    def __len__(self) -> int:
        return len(self._entries)

    def attribute(self, pids: Iterable[int]) -> dict[int, ProcessIdentity]:
        """The identity of each PID; cache entries of other PIDs are dropped."""
        now = self._clock()
        generation = self._generation()
        kept: dict[tuple[int, int | None], _Entry] = {}
        result: dict[int, ProcessIdentity] = {}
        for pid in set(pids):
            key = (pid, self._procfs.start_time(pid))
            entry = self._entries.get(key)
            if entry is None:
                entry = self._new_entry(key, now)
            elif entry.retry_at is not None and (
                now >= entry.retry_at or entry.generation != generation
            ):
                self._retry(entry, key, now)
            kept[key] = entry
            result[pid] = entry.identity
        self._entries = kept
        return result

    def _new_entry(self, key: tuple[int, int | None], now: float) -> _Entry:
        pid, start_time = key
        if start_time is None:
            # Gone, or not visible (no hostPID): nothing to read, ask again later.
            return _Entry(None, _UNKNOWN, now + self._negative_ttl)
        self.proc_reads += 1
        info = self._procfs.read(pid)
        if info is None or info.start_time != start_time:
            # It exited (or the PID was reused) between the two reads.
            return _Entry(None, _UNKNOWN, now + self._negative_ttl)
        entry = _Entry(info, ProcessIdentity(info.username, info.command, None), None)
        if info.cgroup is not None:
            self._retry(entry, key, now)
        return entry

    def _retry(self, entry: _Entry, key: tuple[int, int | None], now: float) -> None:
        if entry.info is None:
            fresh = self._new_entry(key, now)
            entry.info, entry.identity, entry.retry_at = fresh.info, fresh.identity, fresh.retry_at
            return
        ref = entry.info.cgroup
        if ref is None:
            entry.retry_at = None
            return
        self.owner_lookups += 1
        entry.generation = self._generation()
        owner = None
        for lookup in self._lookups:
            owner = lookup(ref)
            if owner is not None:
                break
        entry.identity = ProcessIdentity(entry.info.username, entry.info.command, owner)
        # A container name may still be missing (the status lags the start): retry that too.
        final = owner is not None and owner.container != ""
        entry.retry_at = None if final else now + self._negative_ttl
