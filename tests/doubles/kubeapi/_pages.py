"""Paginated lists: the snapshots behind ``continue`` tokens.

A first page of a list with ``limit`` keeps the whole matching list as it was
(objects are shared, never mutated), so every later page comes from the same
consistent snapshot, as etcd serves pages at the first page's revision. Only
the newest snapshots are kept; an older token, or one from before a
compaction, answers 410 Expired.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from collections import OrderedDict

from tests.doubles.kubeapi._objects import ApiError, JsonObject

SNAPSHOTS_KEPT = 32
"""Paginated list snapshots kept for ``continue`` tokens; older tokens answer 410."""


class Pages:
    """The kept snapshots, by id."""

    def __init__(self) -> None:
        self._snapshots: OrderedDict[int, tuple[int, list[JsonObject]]] = OrderedDict()
        self._ids = itertools.count(1)

    def remember(self, snap_rv: int, items: list[JsonObject], offset: int) -> str:
        """Keep ``items`` (listed at ``snap_rv``); the token of the page from ``offset``."""
        snap_id = next(self._ids)
        self._snapshots[snap_id] = (snap_rv, items)
        while len(self._snapshots) > SNAPSHOTS_KEPT:
            self._snapshots.popitem(last=False)
        token = json.dumps({"id": snap_id, "rv": snap_rv, "start": offset}).encode()
        return base64.urlsafe_b64encode(token).decode()

    def resume(self, token: str, floor: int) -> tuple[int, list[JsonObject], int]:
        """(version, items, offset) of a token; 410 when forgotten or older than ``floor``."""
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            snap_id, snap_rv, offset = int(data["id"]), int(data["rv"]), int(data["start"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise ApiError.bad_request(f"invalid continue token {token!r}") from None
        snapshot = self._snapshots.get(snap_id)
        if snapshot is None or snap_rv < floor:
            raise ApiError.expired(
                "The provided continue parameter is too old to display a consistent list "
                "result. You can start a new list without the continue parameter."
            )
        return snapshot[0], snapshot[1], offset

    def clear(self) -> None:
        """Forget every snapshot (an etcd restore)."""
        self._snapshots.clear()
