"""The object store: one resourceVersion counter, a bounded event history, and watchers.

Like etcd behind the API server, every write to any resource bumps one counter,
and the object written carries the new value. Stored objects are never mutated
after they are stored (every write stores a new dict), so list snapshots, the
history and in-flight responses can share them without copying.

Everything here is synchronous and runs on the event loop, so every operation
is atomic: a watch registers and collects its replay in one step, and cannot
miss or duplicate an event.
"""

from __future__ import annotations

import copy
import json
import secrets
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tests.doubles.kubeapi import _meta
from tests.doubles.kubeapi._objects import (
    PODS,
    RESOURCES,
    ApiError,
    JsonObject,
    ResourceType,
    timestamp,
    to_wire,
)
from tests.doubles.kubeapi._pages import Pages
from tests.doubles.kubeapi._patch import apply_patch
from tests.doubles.kubeapi._selectors import Selector
from tests.doubles.kubeapi._watch import Event, Watcher, line


@dataclass(frozen=True, slots=True)
class StoreBackup:
    """What `Store.backup` saved: the objects (shared, never mutated) and the version."""

    rv: int
    objects: dict[str, dict[str, dict[str, JsonObject]]]
    pods_by_node: dict[str, set[tuple[str, str]]]


class Store:
    """In-memory objects of every served resource, with etcd-like versioning."""

    def __init__(self, *, history_limit: int) -> None:
        self._resources: dict[str, ResourceType] = dict(RESOURCES)
        """Every stored resource by qualified name, custom resources included."""
        self._objects: dict[str, dict[str, dict[str, JsonObject]]] = {r: {} for r in RESOURCES}
        self._rv = 0
        self._history: deque[Event] = deque()
        self._history_limit = history_limit
        self._floor = 0
        """Every event after this resourceVersion is still in ``_history``."""
        self._watchers: dict[str, set[Watcher]] = {r: set() for r in RESOURCES}
        self._pods_by_node: dict[str, set[tuple[str, str]]] = {}
        self._pages = Pages()
        self.listeners: list[Callable[[ResourceType, str, JsonObject], None]] = []
        """Called after every commit with (resource, event type, object): CRDs serve themselves."""

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        return self._rv

    # --- resources -----------------------------------------------------------------

    def register(self, resource: ResourceType) -> None:
        """Store objects of ``resource`` (at its storage version) from now on."""
        key = resource.qualified
        self._resources[key] = resource
        self._objects.setdefault(key, {})
        self._watchers.setdefault(key, set())

    def unregister(self, resource: ResourceType) -> None:
        """Forget ``resource`` and its objects; its watches end (its CRD was deleted)."""
        key = resource.qualified
        self._resources.pop(key, None)
        self._objects.pop(key, None)
        for watcher in self._watchers.pop(key, set()):
            watcher.queue.put_nowait(None)

    def resource(self, qualified: str) -> ResourceType | None:
        """The stored resource named ``plural`` or ``plural.group``, if any."""
        return self._resources.get(qualified)

    # --- reads -------------------------------------------------------------------

    def get(self, resource: ResourceType, namespace: str | None, name: str) -> JsonObject | None:
        """The stored object (shared: do not mutate), or ``None``."""
        return self._objects[resource.qualified].get(namespace or "", {}).get(name)

    def require(self, resource: ResourceType, namespace: str | None, name: str) -> JsonObject:
        """The stored object, or a 404 ``ApiError``."""
        obj = self.get(resource, namespace, name)
        if obj is None:
            raise ApiError.not_found(resource, name)
        return obj

    def node_names(self) -> list[str]:
        """Every node object's name and every node a pod is bound to, sorted."""
        names = set(self._objects["nodes"].get("", {}))
        names.update(node for node, pods in self._pods_by_node.items() if node and pods)
        return sorted(names)

    def _candidates(
        self, resource: ResourceType, namespace: str | None, selector: Selector
    ) -> Iterator[JsonObject]:
        node = selector.field_equals("spec.nodeName") if resource is PODS else None
        if node is not None:  # indexed: O(pods on the node), as gpufleet lists per node
            for ns, name in self._pods_by_node.get(node, ()):
                if namespace is None or ns == namespace:
                    yield self._objects["pods"][ns][name]
            return
        spaces = self._objects[resource.qualified]
        if namespace is not None:
            yield from spaces.get(namespace, {}).values()
        else:
            for objects in spaces.values():
                yield from objects.values()

    def list_objects(
        self,
        resource: ResourceType,
        namespace: str | None,
        selector: Selector,
        *,
        limit: int = 0,
        continue_token: str = "",
    ) -> JsonObject:
        """A ``<Kind>List`` body, paginated with ``limit``/``continue`` as the server does."""
        if continue_token:
            snap_rv, items, offset = self._pages.resume(continue_token, self._floor)
        else:
            matching = [
                o for o in self._candidates(resource, namespace, selector) if selector.matches(o)
            ]
            matching.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
            snap_rv, items, offset = self._rv, matching, 0
        metadata: JsonObject = {"resourceVersion": str(snap_rv)}
        end = offset + limit if limit > 0 else len(items)
        if end < len(items):
            metadata["continue"] = self._pages.remember(snap_rv, items, end)
            metadata["remainingItemCount"] = len(items) - end
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": metadata,
            "items": items[offset:end],
        }

    def check_list_version(
        self, resource_version: str, match: str, *, continue_token: str, limit: int
    ) -> None:
        """A list read at an exact, expired resourceVersion answers 410; others see the present.

        As on the real server: ``resourceVersionMatch=Exact``, or a paginated
        list (``limit``) at a version other than 0 without a match (the
        legacy rule: etcd is read at that revision), is answered at that
        exact version, so 410 once it is compacted. A ``continue`` token
        carries its own version: sending one other than ``"0"`` with it is a 400.
        """
        if continue_token and resource_version not in ("", "0"):
            raise ApiError.bad_request(
                "specifying resource version is not allowed when using continue"
            )
        if resource_version not in ("", "0") and _parse_rv(resource_version) > self._rv:
            raise ApiError.too_large_resource_version(_parse_rv(resource_version), self._rv)
        exact = match == "Exact" or (match == "" and limit > 0 and not continue_token)
        if exact and resource_version not in ("", "0"):
            rv = _parse_rv(resource_version)
            if rv < self._floor:
                raise ApiError.expired(f"too old resource version: {rv} ({self._floor + 1})")

    # --- writes ------------------------------------------------------------------

    def create(
        self, resource: ResourceType, namespace: str | None, body: Any, *, keep_uid: bool = False
    ) -> JsonObject:
        """Store a new object from a request body; 409 AlreadyExists if the name is taken."""
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError.bad_request("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if resource.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError.bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(
                422, "Invalid", "metadata.name: Required value: name or generateName is required"
            )
        if self.get(resource, namespace, name) is not None:
            raise ApiError.already_exists(resource, name)
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        if not (keep_uid and meta.get("uid")):
            meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = timestamp()
        _meta.prepare_create(resource, obj)
        if resource.admit is not None:
            obj = resource.admit(obj)
        return self._commit(resource, "ADDED", None, obj)

    def replace(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
    ) -> JsonObject:
        """PUT: optimistic concurrency on ``metadata.resourceVersion`` (409 when stale)."""
        current = self.require(resource, namespace, name)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError.bad_request("the body of the request must be a JSON object")
        body_name = body.get("metadata", {}).get("name")
        if body_name not in (None, name):
            raise ApiError.bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        return self._write(resource, current, copy.deepcopy(body), subresource)

    def patch(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        content_type: str,
        body: bytes,
        *,
        subresource: str | None = None,
    ) -> JsonObject:
        """PATCH with a merge, strategic-merge (as merge) or JSON patch."""
        current = self.require(resource, namespace, name)
        return self._write(resource, current, apply_patch(content_type, current, body), subresource)

    def mutate(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        change: Callable[[JsonObject], None],
    ) -> JsonObject:
        """Apply ``change`` to a copy of the object and store it (test-side writes)."""
        current = self.require(resource, namespace, name)
        new = copy.deepcopy(current)
        change(new)
        meta = new.setdefault("metadata", {})
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self._write(resource, current, new, "*")

    def _write(
        self, resource: ResourceType, current: JsonObject, new: JsonObject, subresource: str | None
    ) -> JsonObject:
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError.bad_request("metadata must be an object")
        sent_rv = meta.get("resourceVersion")
        if sent_rv not in (None, "") and sent_rv != current["metadata"]["resourceVersion"]:
            raise ApiError.conflict(resource, current["metadata"]["name"])
        new["apiVersion"], new["kind"] = resource.api_version, resource.kind
        new = _meta.prepare_update(resource, current, new, subresource)
        if resource.admit is not None:
            new = resource.admit(new)
        if subresource != "*" and _meta.unchanged(current, new):
            return current  # nothing to write: no new version, no event, as etcd is spared
        written = self._commit(resource, "MODIFIED", current, new)
        if _meta.finalized(written):  # the last finalizer went: the deletion completes
            return self._commit(resource, "DELETED", written, dict(written))
        return written

    def delete(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        preconditions: Mapping[str, Any] | None = None,
    ) -> JsonObject:
        """Remove the object (DELETED), or mark it deleting while finalizers hold it (MODIFIED).

        There is no graceful termination: an object without finalizers goes at once.
        """
        current = self.require(resource, namespace, name)
        wanted = preconditions or {}
        if wanted.get("resourceVersion") not in (None, current["metadata"]["resourceVersion"]):
            raise ApiError.conflict(resource, name)
        if wanted.get("uid") not in (None, current["metadata"]["uid"]):
            raise ApiError.conflict(resource, name)
        if _meta.held_by_finalizers(current):
            if current["metadata"].get("deletionTimestamp"):
                return current
            return self._commit(resource, "MODIFIED", current, _meta.marked_deleting(current))
        final = {**current, "metadata": {**current["metadata"], "deletionTimestamp": timestamp()}}
        return self._commit(resource, "DELETED", current, final)

    def _commit(
        self, resource: ResourceType, event_type: str, old: JsonObject | None, new: JsonObject
    ) -> JsonObject:
        self._rv += 1
        new["metadata"] = {**new["metadata"], "resourceVersion": str(self._rv)}
        meta = new["metadata"]
        space = self._objects[resource.qualified].setdefault(meta.get("namespace") or "", {})
        if event_type == "DELETED":
            del space[meta["name"]]
        else:
            space[meta["name"]] = new
        if resource is PODS:
            self._index_pod(old, None if event_type == "DELETED" else new)
        event = Event(self._rv, resource.qualified, event_type, old, new)
        self._history.append(event)
        while len(self._history) > self._history_limit:
            self._floor = self._history.popleft().rv
        for watcher in self._watchers[resource.qualified]:
            watcher.offer(event)
        for listener in self.listeners:
            listener(resource, event_type, new)
        return new

    def _index_pod(self, old: JsonObject | None, new: JsonObject | None) -> None:
        for obj, add in ((old, False), (new, True)):
            if obj is None:
                continue
            node = obj.get("spec", {}).get("nodeName") or ""
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            keys = self._pods_by_node.setdefault(node, set())
            if add:
                keys.add(key)
            else:
                keys.discard(key)

    # --- watches -----------------------------------------------------------------

    def watch(
        self,
        resource: ResourceType,
        namespace: str | None,
        selector: Selector,
        resource_version: str,
        *,
        wire: ResourceType | None = None,
    ) -> Watcher:
        """Open a watch; its queue already holds the replay.

        ``""`` or ``"0"``: a synthetic ADDED per current object. ``N``: exactly
        the events after ``N``, or 410 Expired when they are no longer kept.
        Objects are sent as ``wire`` (a served version of ``resource``) shows them.
        """
        watcher = Watcher(resource, namespace, selector, wire)
        if resource_version in ("", "0"):
            for obj in self._candidates(resource, namespace, selector):
                if selector.matches(obj):
                    encoded = json.dumps(to_wire(watcher.wire, obj), separators=(",", ":")).encode()
                    watcher.queue.put_nowait(line("ADDED", encoded))
        else:
            since = _parse_rv(resource_version)
            if since > self._rv:
                raise ApiError.too_large_resource_version(since, self._rv)
            if since < self._floor:
                raise ApiError.expired(f"too old resource version: {since} ({self._floor + 1})")
            replay: list[Event] = []
            for event in reversed(self._history):
                if event.rv <= since:
                    break
                if event.resource == resource.qualified:
                    replay.append(event)
            for event in reversed(replay):
                watcher.offer(event)
        self._watchers[resource.qualified].add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        """Forget a watch whose stream has ended."""
        self._watchers.get(watcher.resource.qualified, set()).discard(watcher)

    def backup(self) -> StoreBackup:
        """Every object and the version counter now, as an etcd snapshot holds them."""
        return StoreBackup(
            rv=self._rv,
            objects={r: {ns: dict(objs) for ns, objs in spaces.items()}
                     for r, spaces in self._objects.items()},
            pods_by_node={node: set(keys) for node, keys in self._pods_by_node.items()},
        )  # fmt: skip

    def restore(self, backup: StoreBackup) -> None:
        """Go back to ``backup``, as an etcd restore does: versions go backwards.

        Open watches end (the API server restarts), the history is gone, and
        the counter goes on from the backup's version, so versions handed out
        after the backup are handed out again, to other writes.
        """
        self._objects = {r: {ns: dict(objs) for ns, objs in backup.objects.get(r, {}).items()}
                         for r in self._resources}  # fmt: skip
        self._pods_by_node = {node: set(keys) for node, keys in backup.pods_by_node.items()}
        self._rv = backup.rv
        self._history.clear()
        self._floor = backup.rv
        self._pages.clear()
        self.drop_watches()

    def expire_history(self) -> None:
        """Forget every past event: resuming from any older resourceVersion answers 410."""
        self._history.clear()
        self._floor = self._rv

    def drop_watches(self) -> int:
        """End every open watch stream; the number of streams dropped."""
        dropped = 0
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.queue.put_nowait(None)
                dropped += 1
            watchers.clear()
        return dropped


def _parse_rv(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ApiError.bad_request(f'resourceVersion: Invalid value: "{text}"') from None
    if value < 0:
        raise ApiError.bad_request(f'resourceVersion: Invalid value: "{text}"')
    return value
