"""Writing one provider's GPUs to the device API: register, adopt, update spec and status.

The provider's side of the ownership rules in ``provider``'s docstring, and
nothing else: a ``Registrar`` makes the server agree with what a
``TrackedGpus`` holds. It creates a GPU (with its status, so a server that
restarted empty gets it back in one write) or adopts the object that exists,
brings its spec and labels up to date, and merges the provider's status into
the server's (``health.merged_status``), reading again and retrying on
``ConflictError``. A write that would change nothing is not sent.

What the provider believes is ``tracking``; when to write is ``provider``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from gpufleet.deviceapi.errors import (
    AlreadyExistsError,
    ConflictError,
    DeviceApiError,
    NotFoundError,
    UnavailableError,
)
from gpufleet.deviceapi.health import CONDITION_HEALTHY, copy_xid, merged_status
from gpufleet.deviceapi.tracking import TrackedGpu, TrackedGpus
from gpufleet.deviceapi.v1alpha1.gpu_pb2 import Gpu, GpuList, GpuStatus, ObjectMeta

__all__ = ["GpuApi", "Registrar"]

_log = logging.getLogger("gpufleet.deviceapi.provider")
"""The provider's logger: these lines are the provider's, whichever module says them."""

_CONFLICT_RETRIES = 8


class GpuApi(Protocol):
    """The part of ``DeviceApiClient`` the provider uses (tests may pass a fake)."""

    async def create(self, gpu: Gpu) -> Gpu:
        """Create ``gpu``; ``AlreadyExistsError`` if its name is taken."""
        ...

    async def get(self, name: str) -> Gpu:
        """The GPU called ``name``; ``NotFoundError`` if there is none."""
        ...

    async def list(self, label_selector: str = "") -> GpuList:
        """Every GPU matching ``label_selector``."""
        ...

    async def update(self, gpu: Gpu) -> Gpu:
        """Apply spec, labels and annotations; ``ConflictError`` on a stale resourceVersion."""
        ...

    async def update_status(self, gpu: Gpu) -> Gpu:
        """Apply status only; ``ConflictError`` on a stale resourceVersion."""
        ...


class Registrar:
    """Writes the GPUs of ``gpus`` through ``client``; one write at a time per GPU."""

    def __init__(self, client: GpuApi, gpus: TrackedGpus, clock: Callable[[], datetime]) -> None:
        """Write what ``gpus`` holds; ``clock`` stamps condition transitions."""
        self._client = client
        self._gpus = gpus
        self._now = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._first_registration = True
        self.created = 0
        """GPU objects this provider created (a counter: re-creations after a restart too)."""

    async def reconcile(self) -> bool:
        """Make the server agree with the provider: register what is missing, fix status.

        Returns whether every tracked GPU is now registered. ``UnavailableError``
        propagates (the caller reconnects); other errors are logged per GPU.
        """
        listing = await self._client.list()
        present = {item.metadata.name: item for item in listing.items}
        gpus = self._gpus
        if gpus.orphans:
            gpus.adopt_orphans(listing.items)
        for tracked in list(gpus.by_name.values()):
            try:
                current = present.get(tracked.name)
                if current is None or not tracked.registered:
                    current = await self._register(tracked)
                elif _needs_spec_update(current, tracked):
                    current = await self._update_spec(tracked, current)
                await self.apply(tracked, current)
            except UnavailableError:
                raise
            except DeviceApiError as exc:
                _log.error("cannot reconcile GPU", extra={"gpu": tracked.name, "error": str(exc)})
        self._first_registration = False
        return all(tracked.registered for tracked in gpus.by_name.values())

    async def apply(self, tracked: TrackedGpu, current: Gpu | None = None) -> Gpu:
        """Merge the provider's status into the server's, retrying on conflict; no-ops skip."""
        lock = self._locks.get(tracked.name)
        if lock is None:
            lock = self._locks[tracked.name] = asyncio.Lock()
        async with lock:
            for _ in range(_CONFLICT_RETRIES):
                if current is None:
                    try:
                        current = await self._client.get(tracked.name)
                    except NotFoundError:
                        current = await self._register(tracked)
                status = merged_status(
                    current.status,
                    tracked.verdict(),
                    list(tracked.xids),
                    current.metadata.generation,
                    self._now(),
                )
                if status == current.status:
                    return current
                wanted = Gpu()
                wanted.CopyFrom(current)
                wanted.status.CopyFrom(status)
                try:
                    written = await self._client.update_status(wanted)
                except ConflictError:
                    current = None
                    continue
                except NotFoundError:
                    current = await self._register(tracked)
                    continue
                _log.info(
                    "GPU status written",
                    extra={
                        "gpu": tracked.name,
                        "healthy": _own_status(status),
                        "recommended_action": status.recommended_action,
                        "resource_version": written.metadata.resource_version,
                    },
                )
                return written
        raise ConflictError(f"{tracked.name}: status update kept conflicting")

    async def _register(self, tracked: TrackedGpu) -> Gpu:
        """Create the GPU, or adopt the existing object and bring its spec up to date."""
        wanted = Gpu(
            metadata=ObjectMeta(name=tracked.name, labels=tracked.labels), spec=tracked.spec
        )
        # Created with its status, so a server that restarted empty gets it back in one write.
        wanted.status.CopyFrom(
            merged_status(GpuStatus(), tracked.verdict(), list(tracked.xids), 1, self._now())
        )
        try:
            current = await self._client.create(wanted)
            self.created += 1
            _log.info("GPU registered", extra={"gpu": tracked.name, "gpu_uuid": tracked.uuid})
        except AlreadyExistsError:
            current = await self._client.get(tracked.name)
            if _needs_spec_update(current, tracked):
                current = await self._update_spec(tracked, current)
        if self._first_registration and not tracked.xids and current.status.last_xids:
            # A restarted provider keeps the XID history the previous one wrote.
            tracked.xids.extend(copy_xid(record) for record in current.status.last_xids)
        tracked.registered = True
        return current

    async def _update_spec(self, tracked: TrackedGpu, current: Gpu) -> Gpu:
        for _ in range(_CONFLICT_RETRIES):
            wanted = Gpu()
            wanted.CopyFrom(current)
            if tracked.complete or not current.spec.uuid:
                wanted.spec.CopyFrom(tracked.spec)
            wanted.metadata.labels.update(tracked.labels)
            try:
                return await self._client.update(wanted)
            except ConflictError:
                current = await self._client.get(tracked.name)
                if not _needs_spec_update(current, tracked):
                    return current
        raise ConflictError(f"{tracked.name}: spec update kept conflicting")


def _needs_spec_update(current: Gpu, tracked: TrackedGpu) -> bool:
    labels_missing = any(
        current.metadata.labels.get(key) != value for key, value in tracked.labels.items()
    )
    if not tracked.complete:
        # What a fault told us must not overwrite a fuller spec written earlier.
        return labels_missing or not current.spec.uuid
    return labels_missing or current.spec != tracked.spec


def _own_status(status: GpuStatus) -> str:
    for condition in status.conditions:
        if condition.type == CONDITION_HEALTHY:
            return str(condition.status)
    return ""
