"""A write's watch events: encoded once, shared by every watcher, filtered per selector.

One ``WatchItem`` per write is handed to every watcher that wants it (and kept
in the history window), together with its wire encoding, made once when the
event is recorded, so the server sends the same bytes to every watcher without
serializing per watcher. A ``RecordedWrite`` is one write in the store's
history window; a watcher with a label selector receives its variant of it
(``filtered``), built lazily and once per write. Consumers must treat events
as read-only.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from gpufleet.deviceapi.selector import Selector
from gpufleet.deviceapi.v1alpha1 import gpu_pb2 as pb

ADDED = pb.WatchEvent.ADDED
MODIFIED = pb.WatchEvent.MODIFIED
DELETED = pb.WatchEvent.DELETED
BOOKMARK = pb.WatchEvent.BOOKMARK


class WatchItem(NamedTuple):
    """A queued event, shared by every watcher that receives it (read-only).

    ``wire`` is the event's encoding; ``head`` is what precedes it as one entry
    of ``WatchEventBatch.events`` (field 1, length-delimited), so a batch's wire
    form is the concatenation of ``head + wire`` of its events. ``at`` is when
    the write was recorded (``time.monotonic``), which bounds a sender's linger.
    """

    rv: int
    event: pb.WatchEvent
    wire: bytes
    head: bytes
    at: float = 0.0


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_BATCH_EVENTS_TAG = b"\x0a"  # WatchEventBatch.events: field 1, wire type 2


def watch_item(rv: int, event: pb.WatchEvent, at: float = 0.0) -> WatchItem:
    """``event`` at ``rv``, encoded (once: the item is shared from then on).

    ``at`` is when the write was recorded; 0 (long ago) for items never worth a
    linger (replays, the initial ADDED burst, bookmarks).
    """
    wire = event.SerializeToString()
    return WatchItem(rv, event, wire, _BATCH_EVENTS_TAG + _varint(len(wire)), at)


class RecordedWrite:
    """One write in the history window, with its per-selector variants built lazily.

    ``cost`` is what the window is charged for keeping it; ``prev`` is the
    object before a MODIFIED write.
    """

    __slots__ = (
        "_added",
        "_deleted",
        "_labels",
        "_prev_labels",
        "at",
        "cost",
        "item",
        "prev",
        "rv",
    )

    def __init__(
        self, rv: int, event: pb.WatchEvent, prev: pb.Gpu | None, prev_size: int = 0
    ) -> None:
        """``event`` written at ``rv``, recorded now; ``prev_size`` is ``prev``'s encoded size."""
        self.rv = rv
        self.at = time.monotonic()
        self.item: WatchItem = watch_item(rv, event, self.at)
        self.prev = prev  # the object before a MODIFIED write (never mutated: copy-on-write)
        # What the window is charged for keeping this record: twice the encoded size
        # of each object it holds (the event's and the previous one), once for the
        # message and once for its encoding or the filtered variant built from it.
        self.cost = 2 * (len(self.item.wire) + prev_size)
        self._labels: dict[str, str] | None = None
        self._prev_labels: dict[str, str] | None = None
        self._added: WatchItem | None = None
        self._deleted: WatchItem | None = None

    def filtered(self, selector: Selector) -> WatchItem | None:
        """What a watcher with ``selector`` receives for this write, if anything.

        As in Kubernetes: a MODIFIED object that starts matching arrives as ADDED,
        one that stops matching as DELETED (its last matching state, at this RV).
        """
        event = self.item[1]
        if self._labels is None:
            self._labels = dict(event.object.metadata.labels)
        now = selector.matches(self._labels)
        if event.type != MODIFIED or self.prev is None:
            return self.item if now else None
        if self._prev_labels is None:
            self._prev_labels = dict(self.prev.metadata.labels)
        before = selector.matches(self._prev_labels)
        if now and before:
            return self.item
        if now:
            if self._added is None:
                added = pb.WatchEvent(type=ADDED)
                added.object.CopyFrom(event.object)
                self._added = watch_item(self.rv, added, self.at)
            return self._added
        if before:
            if self._deleted is None:
                deleted = pb.WatchEvent(type=DELETED)
                deleted.object.CopyFrom(self.prev)
                deleted.object.metadata.resource_version = str(self.rv)
                self._deleted = watch_item(self.rv, deleted, self.at)
            return self._deleted
        return None
