"""The CSI Node service: publish a ready cache into a pod, read-only; take it away again.

`NodePublishVolume` checks the request in this order, each refusal one gRPC code:

1. ``volume_id``, ``target_path``, ``volume_capability`` present (INVALID_ARGUMENT);
2. the capability is a mount, not a block device (INVALID_ARGUMENT);
3. the volume context: inline ephemeral, the pod info present, exactly one cache, DNS-1123
   names (`attributes`; INVALID_ARGUMENT);
4. the target is ``<kubelet dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount`` for
   this pod's uid, without symlinks (`targets`; INVALID_ARGUMENT);
5. ``csi.gkm.io/namespace``, when given, is the pod's namespace (PERMISSION_DENIED);
6. idempotency: the same volume already published at this target for the same cache and pod
   answers OK at once; another volume (or something else) mounted at the target, or this
   volume for another cache or pod, is ALREADY_EXISTS; this volume live at another target is
   FAILED_PRECONDITION;
7. `VolumeSource.prepare` (the node state): its `VolumeError` subclasses map to UNAVAILABLE
   (still pulling; the kubelet retries), FAILED_PRECONDITION (no GPU of the node fits, the
   message says why), NOT_FOUND, PERMISSION_DENIED and INVALID_ARGUMENT (`refusals` holds
   the table, and answers every refusal with its code and one log line).

Then it makes the target directory (remembering whether it did), writes the publication record
durably, bind-mounts the store entry there **read-only, whatever ``readonly`` says** (a cache
shared by every pod of the node must not be writable by one of them; GKM's driver mounted it
read-write unless the pod asked otherwise), checks in mountinfo that the mount is there and
read-only, and tells the node state (`VolumeSource.published`). The record comes before the
mount so that a crash in between leaves a record without a mount (harmless: `live` ignores
it) rather than a mount nobody knows of, which GC could collect.

`NodeUnpublishVolume` of a volume it published unmounts the target, removes the target
directory if it made it, drops the record and tells the node state; anything it does not know
(never published, already unpublished, a record lost) is OK, and it never unmounts what it did
not mount. Requests for one target or volume id run one at a time. One log line per publish and
unpublish, with the pod and the cache; never the secrets, the mount flags or the whole context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
import grpc.aio

from gpufleet.kcache import mounts
from gpufleet.kcache.cluster import PreparedVolume, VolumeRequest, VolumeSource
from gpufleet.kcache.csi.attributes import check_volume_id, read_volume_context
from gpufleet.kcache.csi.refusals import abort, refuse, status_code
from gpufleet.kcache.csi.targets import TargetChecker
from gpufleet.kcache.csi.v1 import csi_pb2, csi_pb2_grpc
from gpufleet.kcache.errors import (
    InvalidVolumeError,
    KcacheError,
    VolumeError,
)
from gpufleet.kcache.mounts import MountEntry, mounted_at, mounted_from
from gpufleet.kcache.publications import Publication, PublicationLog

__all__ = ["NodeServicer"]

_log = logging.getLogger(__name__)

_TARGET_MODE = 0o750
_MAX_UNMOUNTS = 8  # mounts stacked at one target by repeated crashes; more is not ours


class _Locks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, *keys: str) -> AsyncIterator[None]:
        """Hold every lock of `keys`, taken in one order so two holders never deadlock."""
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(keys)):
                lock, users = self._locks.get(key, (asyncio.Lock(), 0))
                self._locks[key] = (lock, users + 1)
                stack.callback(self._release, key)
                await stack.enter_async_context(lock)
            yield

    def _release(self, key: str) -> None:
        lock, users = self._locks[key]
        if users == 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)


class NodeServicer(csi_pb2_grpc.NodeServicer):
    """``csi.v1.Node`` for inline ephemeral cache volumes.

    `source` is the node state that says which store entry a request gets; `publications`
    the durable records (``<store>/publications``); `bind`, `unmount` and `mountinfo` the
    mount functions (`gpufleet.kcache.mounts`, replaceable in tests); `clock` stamps records.
    """

    def __init__(
        self,
        source: VolumeSource,
        *,
        kubelet_dir: Path,
        node_id: str,
        publications: PublicationLog,
        bind: Callable[[Path, Path], None] = mounts.bind_read_only,
        unmount: Callable[[Path], None] = mounts.unmount,
        mountinfo: Callable[[], Sequence[MountEntry]] = mounts.read_mountinfo,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._targets = TargetChecker(kubelet_dir)
        self._node_id = node_id
        self._log = publications
        self._bind = bind
        self._unmount = unmount
        self._mountinfo = mountinfo
        self._clock = clock
        self._locks = _Locks()

    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.aio.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        """The node's name; no volume limit, no topology."""
        return csi_pb2.NodeGetInfoResponse(node_id=self._node_id)

    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        """None: publish and unpublish only (no STAGE_UNSTAGE_VOLUME, no stats)."""
        return csi_pb2.NodeGetCapabilitiesResponse()

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.aio.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        """Bind the cache's store entry read-only at the target; see the module docstring."""
        try:
            volume = self._read_publish(request)
            async with self._locks.hold(
                f"volume:{volume.volume_id}", f"target:{volume.target_path}"
            ):
                await self._publish(volume)
        except Exception as exc:
            await abort(context, _log, "volume publish refused", request.volume_id, exc)
        return csi_pb2.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.aio.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        """Undo a publish; a volume or target it does not know is OK."""
        try:
            volume_id, target = self._read_unpublish(request)
            async with self._locks.hold(f"volume:{volume_id}", f"target:{target}"):
                await self._unpublish(volume_id, target)
        except Exception as exc:
            await abort(context, _log, "volume unpublish refused", request.volume_id, exc)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- publish ------------------------------------------------------------------------------

    def _read_publish(self, request: csi_pb2.NodePublishVolumeRequest) -> VolumeRequest:
        try:
            check_volume_id(request.volume_id)
            if not request.target_path:
                raise InvalidVolumeError("target_path is required")
            if not request.HasField("volume_capability"):
                raise InvalidVolumeError("volume_capability is required")
            capability = request.volume_capability
            if capability.WhichOneof("access_type") != "mount":
                raise InvalidVolumeError(
                    "volume_capability must be a mount volume: a kernel cache is a directory,"
                    " not a block device"
                )
            attributes = read_volume_context(request.volume_context)
            target = self._targets.check(request.target_path, pod_uid=attributes.pod.uid)
        except InvalidVolumeError as exc:
            refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        pod = attributes.pod
        if attributes.namespace_attribute not in (None, pod.namespace):
            refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"pod {pod.namespace}/{pod.name} may not mount a GKMCache of namespace"
                f" {attributes.namespace_attribute}: a pod mounts GKMCaches of its own namespace"
                " only (use a ClusterGKMCache to share one)",
            )
        return VolumeRequest(
            volume_id=request.volume_id,
            target_path=target.path,
            volume_name=target.volume_name,
            cache=attributes.cache,
            pod=pod,
        )

    async def _publish(self, request: VolumeRequest) -> None:
        target = request.target_path
        entries, existing, records = await asyncio.to_thread(self._state, request.volume_id)
        if existing is not None and mounted_from(existing.target_path, existing.source, entries):
            if existing.target_path != target:
                refuse(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {request.volume_id} is already published at {existing.target_path}",
                )
            if existing.cache != request.cache or existing.pod != request.pod:
                refuse(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"volume {request.volume_id} is published at {target} for {existing.cache}"
                    f" and pod {existing.pod.namespace}/{existing.pod.name}, not as asked",
                )
            _log.info("volume already published", extra=_context(request, existing.digest))
            return
        for other in records:
            if (
                other.target_path == target
                and other.volume_id != request.volume_id
                and mounted_from(other.target_path, other.source, entries)
            ):
                refuse(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{target} already holds volume {other.volume_id}",
                )
        prepared = await self._prepare(request)
        at_target = mounted_at(target, entries)
        if at_target is not None:
            if at_target.read_only and mounted_from(target, prepared.path, entries):
                # Ours, its record lost (moved aside as corrupt): record it again.
                await self._record(request, prepared, created_target=False)
                await self._tell_published(request, prepared)
                _log.info("volume already published", extra=_context(request, prepared.digest))
                return
            refuse(grpc.StatusCode.ALREADY_EXISTS, f"something else is mounted at {target}")
        created = await asyncio.to_thread(_make_target, target)
        if not created and existing is not None and existing.target_path == target:
            created = existing.created_target  # made by an attempt that crashed after mkdir
        await self._record(request, prepared, created_target=created)
        try:
            await asyncio.to_thread(self._mount, prepared.path, target)
        except KcacheError as exc:
            await asyncio.to_thread(self._forget, request.volume_id, target, created)
            refuse(grpc.StatusCode.INTERNAL, f"cannot mount the cache at {target}: {exc}")
        await self._tell_published(request, prepared)
        _log.info("volume published", extra=_context(request, prepared.digest))

    def _state(
        self, volume_id: str
    ) -> tuple[Sequence[MountEntry], Publication | None, list[Publication]]:
        try:
            return self._mountinfo(), self._log.get(volume_id), self._log.all()
        except KcacheError as exc:
            refuse(grpc.StatusCode.INTERNAL, str(exc))

    async def _prepare(self, request: VolumeRequest) -> PreparedVolume:
        try:
            prepared = await self._source.prepare(request)
        except VolumeError as exc:
            refuse(status_code(exc), str(exc))
        except Exception as exc:
            refuse(grpc.StatusCode.INTERNAL, f"preparing {request.cache} failed: {exc}", cause=exc)
        if not prepared.path.is_absolute() or not prepared.path.is_dir():
            refuse(grpc.StatusCode.INTERNAL, f"store entry {prepared.path} is not a directory")
        return prepared

    async def _record(
        self, request: VolumeRequest, prepared: PreparedVolume, *, created_target: bool
    ) -> None:
        publication = Publication(
            volume_id=request.volume_id,
            target_path=request.target_path,
            cache=request.cache,
            pod=request.pod,
            digest=prepared.digest,
            mount_root=prepared.mount_root,
            source=prepared.path,
            created_target=created_target,
            published_at=self._clock(),
        )
        try:
            await asyncio.to_thread(self._log.record, publication)
        except KcacheError as exc:
            if created_target:
                await asyncio.to_thread(_remove_target, request.target_path)
            refuse(grpc.StatusCode.INTERNAL, str(exc))

    def _mount(self, source: Path, target: Path) -> None:
        """Bind read-only, then make sure mountinfo agrees; undo it if not."""
        self._bind(source, target)
        entries = self._mountinfo()
        entry = mounted_at(target, entries)
        if entry is not None and entry.read_only and mounted_from(target, source, entries):
            return
        with contextlib.suppress(KcacheError):
            self._unmount(target)
        raise KcacheError(f"{target} is not a read-only mount of {source} after mounting")

    def _forget(self, volume_id: str, target: Path, created_target: bool) -> None:
        with contextlib.suppress(KcacheError):
            self._log.remove(volume_id)
        if created_target:
            _remove_target(target)

    async def _tell_published(self, request: VolumeRequest, prepared: PreparedVolume) -> None:
        try:
            await self._source.published(request, prepared)
        except Exception:
            # The mount is in place and recorded; the node state rebuilds from the records.
            _log.exception("node state failed to note a publish", extra=_context(request, None))

    # -- unpublish ----------------------------------------------------------------------------

    def _read_unpublish(self, request: csi_pb2.NodeUnpublishVolumeRequest) -> tuple[str, Path]:
        try:
            check_volume_id(request.volume_id)
            if not request.target_path:
                raise InvalidVolumeError("target_path is required")
            target = self._targets.check(request.target_path, require_parent=False)
            return request.volume_id, target.path
        except InvalidVolumeError as exc:
            refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _unpublish(self, volume_id: str, target: Path) -> None:
        entries, record, _ = await asyncio.to_thread(self._state, volume_id)
        context = {"volume_id": volume_id, "target": os.fspath(target)}
        if record is None or record.target_path != target:
            removed = await asyncio.to_thread(_remove_unmounted_target, target, entries)
            _log.info(
                "unpublish of a volume not published here",
                extra={**context, "removed_target": removed},
            )
            return
        try:
            await asyncio.to_thread(self._unmount_all, target, record.source)
        except KcacheError as exc:
            refuse(grpc.StatusCode.INTERNAL, str(exc))
        removed = record.created_target and await asyncio.to_thread(_remove_target, target)
        try:
            await asyncio.to_thread(self._log.remove, volume_id)
        except KcacheError as exc:
            refuse(grpc.StatusCode.INTERNAL, str(exc))
        try:
            await self._source.unpublished(volume_id)
        except Exception:
            _log.exception("node state failed to note an unpublish", extra=context)
        _log.info(
            "volume unpublished",
            extra={
                **context,
                "pod": f"{record.pod.namespace}/{record.pod.name}",
                "pod_uid": record.pod.uid,
                "cache": str(record.cache),
                "digest": record.digest,
                "removed_target": removed,
            },
        )

    def _unmount_all(self, target: Path, source: Path) -> None:
        """Unmount the mounts of `source` stacked at `target` (repeated crashes), only those."""
        for _ in range(_MAX_UNMOUNTS):
            if not mounted_from(target, source, self._mountinfo()):
                return
            self._unmount(target)
        raise KcacheError(f"{target} is still mounted after {_MAX_UNMOUNTS} unmounts")


def _context(request: VolumeRequest, digest: str | None) -> dict[str, object]:
    return {
        "volume_id": request.volume_id,
        "pod": f"{request.pod.namespace}/{request.pod.name}",
        "pod_uid": request.pod.uid,
        "cache": str(request.cache),
        "digest": digest,
        "target": os.fspath(request.target_path),
    }


def _make_target(target: Path) -> bool:
    """Create the target directory; True if this call made it."""
    try:
        os.mkdir(target, _TARGET_MODE)
    except FileExistsError:
        return False
    except OSError as exc:
        refuse(grpc.StatusCode.INTERNAL, f"cannot create {target}: {exc.strerror}")
    return True


def _remove_target(target: Path) -> bool:
    """Remove the (empty, unmounted) target directory; False when it is gone or not empty."""
    try:
        os.rmdir(target)
    except FileNotFoundError:
        return False
    except OSError as exc:
        _log.warning(
            "cannot remove a target directory",
            extra={"target": os.fspath(target), "error": exc.strerror},
        )
        return False
    return True


def _remove_unmounted_target(target: Path, entries: Sequence[MountEntry]) -> bool:
    # A publish that crashed before writing its record may have made the directory.
    if mounted_at(target, entries) is not None:
        return False
    try:
        os.rmdir(target)
    except OSError:
        return False
    return True
