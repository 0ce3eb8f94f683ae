"""Durable records of the volumes the CSI plugin has published: what is mounted where, for whom.

The node process must know after a restart (a crash, a SIGKILL, an upgrade) which store entries
pods still mount, or GC would collect a mounted cache. Mounts survive the process; these records
say what each one is. One JSON file per volume id, under ``<store>/publications/``, named by the
sha256 of the volume id (a volume id is the kubelet's ``csi-<hex>``, but a file name must not
trust a client). A record is written whole: a temporary file, fsync, rename, fsync of the
directory. A record alone proves nothing: `PublicationLog.live` keeps those whose target is
still a mount of their source in mountinfo, so a record left by a crash between the unmount and
the removal is harmless. GC's "in use" set is::

    {(p.digest, p.mount_root) for p in log.live(read_mountinfo())}

A record file that is unreadable, malformed or larger than any record can be (`MAX_RECORD_BYTES`)
is logged once and moved aside (``<name>.corrupt``), never crashing the process that reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.kcache.cluster import CLUSTER_CACHE, NAMESPACED_CACHE, CacheKey, PodInfo
from gpufleet.kcache.errors import KcacheError
from gpufleet.kcache.mounts import MountEntry, mounted_from

__all__ = ["MAX_RECORD_BYTES", "PUBLICATIONS", "Publication", "PublicationError", "PublicationLog"]

_log = logging.getLogger(__name__)

PUBLICATIONS = "publications"
"""The store's directory of publication records (``<store>/publications/``)."""
MAX_RECORD_BYTES = 64 * 1024
"""No honest record comes near this (paths ≤ 4 KiB, names ≤ 253 characters)."""
_SUFFIX = ".json"
_ASIDE = ".corrupt"
_VERSION = 1
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class PublicationError(KcacheError):
    """A publication record cannot be written or removed; the message names the file."""


@dataclass(frozen=True, slots=True)
class Publication:
    """One published volume: the bind mount of `source` at `target_path` for `pod`."""

    volume_id: str
    target_path: Path
    cache: CacheKey
    pod: PodInfo
    digest: str
    mount_root: str
    source: Path
    """The store entry mounted at the target."""
    created_target: bool
    """The plugin made the target directory, so Unpublish removes it."""
    published_at: float
    """Seconds since the epoch."""

    def to_json(self) -> dict[str, Any]:
        """The record as written to disk."""
        return {
            "version": _VERSION,
            "volume_id": self.volume_id,
            "target_path": os.fspath(self.target_path),
            "cache": {
                "kind": self.cache.kind,
                "namespace": self.cache.namespace,
                "name": self.cache.name,
            },
            "pod": {
                "namespace": self.pod.namespace,
                "name": self.pod.name,
                "uid": self.pod.uid,
                "service_account": self.pod.service_account,
            },
            "digest": self.digest,
            "mount_root": self.mount_root,
            "source": os.fspath(self.source),
            "created_target": self.created_target,
            "published_at": self.published_at,
        }

    @classmethod
    def from_json(cls, record: object) -> Publication:
        """The publication in `record`; ValueError when it is not a well-formed record."""
        if not isinstance(record, dict) or record.get("version") != _VERSION:
            raise ValueError("not a version 1 publication record")
        cache, pod = record.get("cache"), record.get("pod")
        if not isinstance(cache, dict) or not isinstance(pod, dict):
            raise ValueError("cache and pod must be objects")
        kind = _str(cache, "kind")
        namespace = cache.get("namespace")
        if namespace is not None and not isinstance(namespace, str):
            raise ValueError("cache.namespace must be a string or null")
        if kind == NAMESPACED_CACHE.kind:
            key = CacheKey("GKMCache", namespace, _str(cache, "name"))
        elif kind == CLUSTER_CACHE.kind:
            key = CacheKey("ClusterGKMCache", namespace, _str(cache, "name"))
        else:
            raise ValueError(f"unknown cache kind {kind!r}")
        published_at = record.get("published_at")
        created = record.get("created_target")
        if not isinstance(published_at, int | float) or isinstance(published_at, bool):
            raise ValueError("published_at must be a number")
        if not isinstance(created, bool):
            raise ValueError("created_target must be a boolean")
        return cls(
            volume_id=_str(record, "volume_id"),
            target_path=Path(_str(record, "target_path")),
            cache=key,
            pod=PodInfo(
                namespace=_str(pod, "namespace"),
                name=_str(pod, "name"),
                uid=_str(pod, "uid"),
                service_account=_str(pod, "service_account"),
            ),
            digest=_str(record, "digest"),
            mount_root=_str(record, "mount_root"),
            source=Path(_str(record, "source")),
            created_target=created,
            published_at=float(published_at),
        )


def _str(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


class PublicationLog:
    """The publication records in `directory` (created on first write, mode 0700).

    Methods block (file I/O and fsync): call them from a worker thread on an event loop.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _file(self, volume_id: str) -> Path:
        return self.directory / f"{hashlib.sha256(volume_id.encode()).hexdigest()}{_SUFFIX}"

    def record(self, publication: Publication) -> None:
        """Write `publication` durably, replacing any record of its volume id."""
        path = self._file(publication.volume_id)
        data = json.dumps(publication.to_json(), sort_keys=True).encode() + b"\n"
        if len(data) > MAX_RECORD_BYTES:
            raise PublicationError(
                f"{path}: record of volume {publication.volume_id!r} is {len(data)} bytes,"
                f" over {MAX_RECORD_BYTES}"
            )
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            self._sync_directory()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise PublicationError(f"{path}: cannot write the record: {exc.strerror}") from None

    def remove(self, volume_id: str) -> None:
        """Forget the record of `volume_id` durably; none there is fine."""
        path = self._file(volume_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PublicationError(f"{path}: cannot remove the record: {exc.strerror}") from None
        try:
            self._sync_directory()
        except OSError as exc:
            raise PublicationError(f"{self.directory}: cannot flush: {exc.strerror}") from None

    def get(self, volume_id: str) -> Publication | None:
        """The record of `volume_id`, or None (also for a corrupt one, moved aside)."""
        return self._load(self._file(volume_id))

    def all(self) -> list[Publication]:
        """Every readable record, by volume id; corrupt ones are logged and moved aside."""
        try:
            paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(_SUFFIX))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise PublicationError(f"{self.directory}: cannot list: {exc.strerror}") from None
        found = [p for p in map(self._load, paths) if p is not None]
        return sorted(found, key=lambda p: p.volume_id)

    def live(self, entries: Sequence[MountEntry]) -> list[Publication]:
        """The records whose target is still a mount of their source in `entries` (mountinfo)."""
        return [p for p in self.all() if mounted_from(p.target_path, p.source, entries)]

    def _load(self, path: Path) -> Publication | None:
        try:
            with path.open("rb") as file:
                data = file.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._set_aside(path, f"unreadable: {exc.strerror}")
            return None
        if len(data) > MAX_RECORD_BYTES:
            self._set_aside(path, f"over {MAX_RECORD_BYTES} bytes")
            return None
        try:
            publication = Publication.from_json(json.loads(data))
        except (ValueError, UnicodeDecodeError) as exc:
            self._set_aside(path, str(exc)[:200])
            return None
        if path != self._file(publication.volume_id):
            self._set_aside(path, "its name is not its volume id's")
            return None
        return publication

    def _set_aside(self, path: Path, reason: str) -> None:
        aside = path.with_name(path.name + _ASIDE)
        try:
            os.replace(path, aside)
        except OSError as exc:
            _log.warning(
                "corrupt publication record; cannot move it aside",
                extra={"file": os.fspath(path), "reason": reason, "error": exc.strerror},
            )
            return
        _log.warning(
            "corrupt publication record moved aside",
            extra={"file": os.fspath(path), "moved_to": os.fspath(aside), "reason": reason},
        )

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
