"""The device API's source of truth: GPUs in memory, a resourceVersion counter, watchers.

Kubernetes semantics, see ``docs/device-api-store.md``. Everything but
``Watcher.get`` is synchronous and runs on the event loop thread, so a write
(validate, persist, commit, fan out to every watcher) is atomic with respect to
watchers: a watcher sees either none or all of a write, and always in RV order.

Events are shared: one per write, encoded once (``events``), handed to every
watcher that wants it and kept in the history window. They never alias the
stored objects, so a careless consumer can only spoil its own and its peers'
events, never the store.

What a request may contain is checked by ``validation`` before any of this runs;
this module holds the state: objects, the counter, the history and the fan-out
to the watchers, whose consumer side (queue, batches, bookmarks, eviction) is
``watcher``.
"""

from __future__ import annotations

import uuid
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

from gpufleet.deviceapi.errors import (
    AlreadyExistsError,
    CapacityError,
    ConflictError,
    ExpiredError,
    NotFoundError,
    UnavailableError,
)
from gpufleet.deviceapi.events import ADDED, DELETED, MODIFIED, RecordedWrite, WatchItem, watch_item
from gpufleet.deviceapi.persistence import StateFile
from gpufleet.deviceapi.selector import parse
from gpufleet.deviceapi.v1alpha1 import gpu_pb2 as pb
from gpufleet.deviceapi.validation import (
    check_name,
    check_object_size,
    parse_resource_version,
    validate_meta_and_spec,
    validate_status,
)
from gpufleet.deviceapi.watcher import Watcher

MAX_OBJECT_BYTES = 256 * 1024
"""The default cap on one GPU's encoding (``MAX_OBJECT_BYTES``)."""
MAX_STORE_BYTES = 48 * 1024 * 1024
"""The default cap on every GPU's encoding together (``MAX_STORE_BYTES``): a List fits 64 MiB."""
HISTORY_BYTES = 64 * 1024 * 1024
"""The default cap on what the history window keeps (``WATCH_HISTORY_BYTES``)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _copy(gpu: pb.Gpu) -> pb.Gpu:
    out = pb.Gpu()
    out.CopyFrom(gpu)
    return out


def _size(gpu: pb.Gpu) -> int:
    """``gpu``'s encoded size in bytes."""
    return int(gpu.ByteSize())


def _rv_of(gpu: pb.Gpu) -> int:
    return int(gpu.metadata.resource_version)


class GpuStore:
    """GPUs in memory (optionally durable in SQLite), one RV counter, history, watchers.

    Without a state file the counter starts at the clock's microseconds since the
    Unix epoch, and with one it never starts below that either: a watcher holding
    an RV from an earlier incarnation of the store then always gets Expired and
    relists, instead of resuming into a reused RV range and silently missing events.
    """

    def __init__(
        self,
        *,
        max_gpus: int = 4096,
        history: int = 10_000,
        watch_queue: int = 1024,
        max_conditions: int = 32,
        max_object_bytes: int = MAX_OBJECT_BYTES,
        max_store_bytes: int = MAX_STORE_BYTES,
        history_bytes: int = HISTORY_BYTES,
        state_file: Path | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if min(max_gpus, watch_queue, max_conditions, max_object_bytes) < 1 or history < 0:
            raise ValueError(
                "max_gpus, watch_queue, max_conditions and max_object_bytes must be >= 1,"
                " history >= 0"
            )
        if max_store_bytes < max_object_bytes or history_bytes < 0:
            raise ValueError("max_store_bytes must be >= max_object_bytes, history_bytes >= 0")
        self._max_gpus = max_gpus
        self._max_object_bytes = max_object_bytes
        self._max_store_bytes = max_store_bytes
        self._history_max_bytes = history_bytes
        self._history_bytes = 0
        self._history_size = history
        self._watch_queue = watch_queue
        self._max_conditions = max_conditions
        self._clock = clock
        self._objects: dict[str, pb.Gpu] = {}
        self._history: deque[RecordedWrite] = deque()
        self._watchers: list[Watcher] = []
        # ADDED items of the current objects for watches from "": built (and
        # encoded) once per object version, however many watchers start from "".
        self._added_items: dict[str, WatchItem] = {}
        self._closed = False
        self.evicted_total = 0
        """Watchers evicted because their queue overflowed (a counter)."""
        self._state = StateFile(state_file) if state_file is not None else None
        floor = int(clock().timestamp() * 1_000_000)
        if self._state is not None:
            loaded = self._state.load()
            for gpu in loaded.gpus:
                gpu.DiscardUnknownFields()  # written by an older server that kept them
                self._objects[gpu.metadata.name] = gpu
            floor = max(floor, loaded.resource_version)
        # The encoded size of each stored object, and of all together (at most
        # max_store_bytes), kept so that a write never encodes the old object again.
        self._sizes = {name: _size(gpu) for name, gpu in self._objects.items()}
        self._bytes = sum(self._sizes.values())
        self._rv = floor
        # Every event with rv > _window_start is in the history (none is, after start).
        self._window_start = floor

    # -- reads -----------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The RV of the latest write (the counter)."""
        return self._rv

    @property
    def gpu_count(self) -> int:
        """How many GPUs the store holds."""
        return len(self._objects)

    @property
    def object_bytes(self) -> int:
        """The encoded size of every stored GPU together (at most ``max_store_bytes``)."""
        return self._bytes

    @property
    def history_bytes(self) -> int:
        """What the history window keeps, as charged per record (at most ``history_bytes``).

        Twice the encoded size of each object a record holds: see ``RecordedWrite``.
        """
        return self._history_bytes

    @property
    def history_length(self) -> int:
        """How many writes the history window holds (at most ``history``)."""
        return len(self._history)

    @property
    def watcher_count(self) -> int:
        """How many watchers are open."""
        return len(self._watchers)

    def get(self, name: str) -> pb.Gpu:
        """A copy of one GPU; ``NotFoundError`` if absent."""
        check_name(name, "name")
        return _copy(self._stored(name))

    def list(self, label_selector: str = "") -> pb.GpuList:
        """Copies of the GPUs matching ``label_selector``, sorted by name, at the current RV."""
        selector = parse(label_selector)
        out = pb.GpuList(resource_version=str(self._rv))
        objects = self._objects
        names = sorted(objects)
        if selector.empty:
            out.items.extend(objects[n] for n in names)
        else:
            out.items.extend(
                objects[n] for n in names if selector.matches(objects[n].metadata.labels)
            )
        return out

    # -- writes ----------------------------------------------------------------

    def create(self, gpu: pb.Gpu) -> pb.Gpu:
        """Store a new GPU; the server sets uid, creation_timestamp, generation and RV.

        Status, if given, is stored too (validated like ``update_status``).
        """
        self._check_open()
        meta = gpu.metadata
        check_name(meta.name)
        validate_meta_and_spec(gpu)
        validate_status(gpu.status, self._max_conditions)
        if meta.name in self._objects:
            raise AlreadyExistsError(f"gpu {meta.name!r} already exists")
        if len(self._objects) >= self._max_gpus:
            raise CapacityError(f"the store holds its maximum of {self._max_gpus} GPUs")
        new = pb.Gpu()
        new.metadata.name = meta.name
        new.metadata.uid = str(uuid.uuid4())
        new.metadata.generation = 1
        new.metadata.creation_timestamp.FromDatetime(self._clock())
        new.metadata.labels.update(meta.labels)
        new.metadata.annotations.update(meta.annotations)
        new.spec.CopyFrom(gpu.spec)
        self._apply_status(new, gpu.status, None)
        new.DiscardUnknownFields()
        return self._commit(new, ADDED, None)

    def update(self, gpu: pb.Gpu) -> pb.Gpu:
        """Apply spec, labels and annotations (status is ignored); needs the current RV."""
        self._check_open()
        check_name(gpu.metadata.name)
        validate_meta_and_spec(gpu)
        stored = self._checked_current(gpu)
        new = _copy(stored)
        new.spec.CopyFrom(gpu.spec)
        new.metadata.labels.clear()
        new.metadata.labels.update(gpu.metadata.labels)
        new.metadata.annotations.clear()
        new.metadata.annotations.update(gpu.metadata.annotations)
        new.DiscardUnknownFields()
        if new == stored:
            return _copy(stored)
        if new.spec != stored.spec:
            new.metadata.generation += 1
        return self._commit(new, MODIFIED, stored)

    def update_status(self, gpu: pb.Gpu) -> pb.Gpu:
        """Apply only status (spec and metadata are ignored); needs the current RV."""
        self._check_open()
        check_name(gpu.metadata.name)
        validate_status(gpu.status, self._max_conditions)
        stored = self._checked_current(gpu)
        new = _copy(stored)
        self._apply_status(new, gpu.status, stored.status)
        new.DiscardUnknownFields()
        if new == stored:
            return _copy(stored)
        return self._commit(new, MODIFIED, stored)

    def delete(self, name: str, *, resource_version: str = "", uid: str = "") -> pb.Gpu:
        """Remove a GPU; optional RV and uid preconditions. Returns it at the deletion's RV."""
        self._check_open()
        check_name(name, "name")
        want_rv = parse_resource_version(resource_version)
        stored = self._stored(name)
        if want_rv is not None and want_rv != _rv_of(stored):
            raise ConflictError(
                f"gpu {name!r}: precondition failed: resourceVersion {want_rv} is not the"
                f" current {stored.metadata.resource_version}"
            )
        if uid and uid != stored.metadata.uid:
            raise ConflictError(
                f"gpu {name!r}: precondition failed: uid {uid!r} is not the current"
                f" {stored.metadata.uid!r}"
            )
        rv = self._rv + 1
        deleted = _copy(stored)
        deleted.metadata.resource_version = str(rv)
        if self._state is not None:
            self._state.delete(name, rv)
        self._rv = rv
        del self._objects[name]
        self._bytes -= self._sizes.pop(name)
        self._added_items.pop(name, None)
        event = pb.WatchEvent(type=DELETED)
        event.object.CopyFrom(deleted)
        self._publish(RecordedWrite(rv, event, None))
        return deleted

    # -- watch -----------------------------------------------------------------

    def watch(self, resource_version: str = "", label_selector: str = "") -> Watcher:
        """Events after ``resource_version`` (``""``/``"0"``: current state as ADDED), then live.

        ``ExpiredError`` if events after it have left the history window, or if it is
        newer than the store (an RV from before a restart without the state file).
        """
        self._check_open()
        parsed = parse(label_selector)
        selector = None if parsed.empty else parsed
        since = parse_resource_version(resource_version)
        backlog: list[WatchItem] = []
        initial = not since
        if not since:
            objects: Iterable[pb.Gpu] = sorted(self._objects.values(), key=_rv_of)
            if selector is not None:
                objects = (o for o in objects if selector.matches(o.metadata.labels))
            backlog = [self._added_item(o) for o in objects]
            since = self._rv
        elif since > self._rv:
            raise ExpiredError(
                f"resourceVersion {since} is newer than the store's {self._rv} (the store"
                " restarted without its state); relist"
            )
        elif since < self._window_start:
            raise ExpiredError(
                f"too old resourceVersion {since}: events after it have left the history"
                f" window (which starts after {self._window_start}); relist"
            )
        else:
            start = bisect_right(self._history, since, key=lambda rec: rec.rv)
            for record in islice(self._history, start, None):
                item = record.item if selector is None else record.filtered(selector)
                if item is not None:
                    backlog.append(item)
        watcher = Watcher(
            selector,
            backlog,
            self._watch_queue,
            since,
            position=lambda: self._rv,
            on_close=self._forget,
            initial=initial,
        )
        self._watchers.append(watcher)
        return watcher

    def close(self) -> None:
        """Close every watcher and the state file; later calls raise (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for watcher in self._watchers:
            watcher.shut()
        self._watchers.clear()
        if self._state is not None:
            self._state.close()

    # -- internals -------------------------------------------------------------

    def _added_item(self, gpu: pb.Gpu) -> WatchItem:
        name = gpu.metadata.name
        rv = _rv_of(gpu)
        cached = self._added_items.get(name)
        if cached is None or cached[0] != rv:
            cached = self._added_items[name] = watch_item(rv, pb.WatchEvent(type=ADDED, object=gpu))
        return cached

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the device API store is closed")

    def _stored(self, name: str) -> pb.Gpu:
        try:
            return self._objects[name]
        except KeyError:
            raise NotFoundError(f"gpu {name!r} not found") from None

    def _checked_current(self, gpu: pb.Gpu) -> pb.Gpu:
        """The stored object, if ``gpu`` names it with its current RV (and uid, if given)."""
        meta = gpu.metadata
        want_rv = parse_resource_version(meta.resource_version, "metadata.resource_version")
        stored = self._stored(meta.name)
        current = stored.metadata.resource_version
        if want_rv is None:
            raise ConflictError(
                f"gpu {meta.name!r}: metadata.resource_version is required for an update"
                f" (optimistic concurrency); the current resourceVersion is {current}"
            )
        if want_rv != int(current):
            raise ConflictError(
                f"gpu {meta.name!r}: the object has been modified; resourceVersion {want_rv} is"
                f" stale, the current resourceVersion is {current}"
            )
        if meta.uid and meta.uid != stored.metadata.uid:
            raise ConflictError(
                f"gpu {meta.name!r}: uid {meta.uid!r} does not match the current"
                f" {stored.metadata.uid!r} (the GPU was deleted and recreated)"
            )
        return stored

    def _apply_status(self, new: pb.Gpu, status: pb.GpuStatus, old: pb.GpuStatus | None) -> None:
        """Copy ``status`` into ``new``, keeping last_transition_time where status is unchanged."""
        new.status.CopyFrom(status)
        before = {c.type: c for c in old.conditions} if old is not None else {}
        now: datetime | None = None
        for cond in new.status.conditions:
            prior = before.get(cond.type)
            if prior is not None and prior.status == cond.status:
                cond.last_transition_time.CopyFrom(prior.last_transition_time)
            elif not cond.HasField("last_transition_time"):
                now = now or self._clock()
                cond.last_transition_time.FromDatetime(now)

    def _commit(self, new: pb.Gpu, kind: pb.WatchEvent.Type, prev: pb.Gpu | None) -> pb.Gpu:
        """Check the sizes, persist, store and publish ``new`` at the next RV; returns a copy.

        ``new`` holds no unknown fields (the caller discarded them): a field this
        server does not know is never stored, persisted or served again.
        """
        rv = self._rv + 1
        new.metadata.resource_version = str(rv)
        size = check_object_size(new, self._max_object_bytes)
        name = new.metadata.name
        prev_size = self._sizes.get(name, 0) if prev is not None else 0
        total = self._bytes + size - prev_size
        # Bounds what a List (every object in one message) sends: see docs/limits.md.
        if total > self._max_store_bytes and total > self._bytes:
            raise CapacityError(
                f"gpu {new.metadata.name!r}: the store would hold {total} bytes of objects,"
                f" more than the {self._max_store_bytes} allowed (MAX_STORE_BYTES)"
            )
        if self._state is not None:
            self._state.put(new, rv)  # first: a failed write leaves the store unchanged
        self._rv = rv
        self._bytes = total
        self._sizes[name] = size
        self._objects[name] = new
        event = pb.WatchEvent(type=kind)
        event.object.CopyFrom(new)
        self._publish(RecordedWrite(rv, event, prev, prev_size))
        return _copy(new)

    def _publish(self, record: RecordedWrite) -> None:
        """Append to the history window and fan out; never waits on a watcher."""
        history = self._history
        history.append(record)
        self._history_bytes += record.cost
        # Bounded by count and by bytes: the oldest records leave first, and the
        # window then starts after the last one that left.
        while history and (
            len(history) > self._history_size or self._history_bytes > self._history_max_bytes
        ):
            gone = history.popleft()
            self._history_bytes -= gone.cost
            self._window_start = gone.rv
        evicted: list[Watcher] = []
        item = record.item
        # Watchers usually share a few selectors: decide once per selector text.
        decided: dict[str, WatchItem | None] = {}
        for watcher in self._watchers:
            selector = watcher.selector
            if selector is None:
                got = item
            else:
                text = selector.text
                if text in decided:
                    maybe = decided[text]
                else:
                    maybe = decided[text] = record.filtered(selector)
                if maybe is None:
                    continue
                got = maybe
            if not watcher.offer(got):
                evicted.append(watcher)
        for watcher in evicted:
            watcher.evict()
            self._forget(watcher)
            self.evicted_total += 1

    def _forget(self, watcher: Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)
