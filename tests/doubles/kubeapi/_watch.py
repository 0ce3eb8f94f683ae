"""Watch streams: events as watchers see them, and the pump that writes them out.

An `Event` is one write; its JSON is rendered once per served version and
shared by every watcher. A `Watcher` filters events by namespace and selector
and queues ready-to-send lines; `pump` writes them to the HTTP stream, with
bookmarks and the ``timeoutSeconds`` deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.doubles.kubeapi._objects import JsonObject, ResourceType, to_wire
from tests.doubles.kubeapi._selectors import Selector


@dataclass(slots=True)
class Event:
    """One write, as watchers see it; its JSON is rendered once per version and shared."""

    rv: int
    resource: str
    type: str
    old: JsonObject | None
    new: JsonObject
    _json: dict[tuple[int, str], bytes] = field(default_factory=dict)

    def encoded(self, obj: JsonObject, wire: ResourceType) -> bytes:
        key = (id(obj), wire.version)
        if key not in self._json:
            self._json[key] = json.dumps(to_wire(wire, obj), separators=(",", ":")).encode()
        return self._json[key]


def line(event_type: str, encoded_object: bytes) -> bytes:
    return b'{"type":"%s","object":%s}\n' % (event_type.encode(), encoded_object)


class Watcher:
    """One open watch: filters events and queues them as ready-to-send JSON lines.

    ``wire`` is the version the watcher asked for: objects are sent as it shows
    them. A ``None`` in ``queue`` means the store dropped the watch.
    """

    def __init__(
        self,
        resource: ResourceType,
        namespace: str | None,
        selector: Selector,
        wire: ResourceType | None = None,
    ) -> None:
        self.resource = resource
        self.wire = wire if wire is not None else resource
        self.namespace = namespace
        self.selector = selector
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def _selects(self, obj: JsonObject | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.selector.matches(obj)

    def offer(self, event: Event) -> None:
        """Queue ``event`` as this watcher sees it.

        As on the real server, an object that starts or stops matching the
        selector is ADDED or DELETED for this watcher, not MODIFIED.
        """
        if event.type == "DELETED":
            if self._selects(event.old):
                self.queue.put_nowait(line("DELETED", event.encoded(event.new, self.wire)))
            return
        was, now = self._selects(event.old), self._selects(event.new)
        if now:
            encoded = event.encoded(event.new, self.wire)
            self.queue.put_nowait(line("MODIFIED" if was else "ADDED", encoded))
        elif was:
            self.queue.put_nowait(line("DELETED", event.encoded(event.new, self.wire)))


async def pump(
    response: web.StreamResponse,
    watcher: Watcher,
    *,
    deadline: float | None,
    bookmark_interval: float | None,
    stopping: asyncio.Event,
    current_version: Callable[[], int],
) -> None:
    """Write ``watcher``'s events to ``response`` until the deadline, a drop or ``stopping``.

    With ``bookmark_interval`` (seconds) a BOOKMARK carrying ``current_version()``
    goes out that often while the watcher has nothing queued.
    """
    bookmarks = bookmark_interval is not None
    interval = bookmark_interval if bookmark_interval is not None else 1.0
    next_bookmark = time.monotonic() + interval
    while not stopping.is_set():
        lines: list[bytes] = []
        dropped = False
        while not watcher.queue.empty():  # send a backlog (a replay) in one write
            item = watcher.queue.get_nowait()
            if item is None:
                dropped = True
                break
            lines.append(item)
        if lines:
            await response.write(b"".join(lines))
        if dropped:
            return
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return
        if bookmarks and now >= next_bookmark:
            # The queue is empty, so this watcher has seen every write up to now.
            await response.write(bookmark(watcher.wire, current_version()))
            next_bookmark = now + interval
        wait = min(
            deadline - now if deadline is not None else interval,
            next_bookmark - now if bookmarks else interval,
        )
        try:
            item = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.001))
        except TimeoutError:
            continue
        if item is None:
            return
        await response.write(item)


def bookmark(resource: ResourceType, resource_version: int) -> bytes:
    """A BOOKMARK event line carrying ``resource_version``."""
    event = {
        "type": "BOOKMARK",
        "object": {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(resource_version)},
        },
    }
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"
