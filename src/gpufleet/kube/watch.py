"""An informer: a local cache of one kind of object, kept current by list+watch.

The pattern is client-go's (`tools/cache`) and kopf's watch loop, in one place:

1. **List** (paginated) and remember the list's `resourceVersion`; the cache
   becomes exactly the listed objects. The first list asks for
   `resourceVersion=0`, as client-go's reflector does: the API server serves
   it from its watch cache instead of reading every object from etcd, which
   is what makes a DaemonSet's start-up over thousands of nodes cheap.
2. **Watch** from that version with bookmarks and a server-side timeout, so
   the server ends the stream every few minutes and the informer reconnects.
   Every event and every BOOKMARK moves the remembered version forward.
3. When a stream **ends or drops**, watch again from the last version seen:
   no relist, nothing missed, nothing announced twice.
4. When the server says the version is too old (**410 Gone**, as an HTTP
   status or as an ERROR event in the stream), **relist** and announce only
   what really changed against the cache: objects added, updated (a new
   `resourceVersion`) or deleted in the meantime; an object found under a
   cached name with another UID was deleted and created again, and is
   announced as a delete of the old one and an add of the new one, so
   consumers keyed by UID never keep the old UID. As client-go's reflector
   does, the relist asks for the last version seen (data at least that
   fresh, never older), and only if that list is refused as too old (410)
   falls back to a consistent read (no `resourceVersion`). Never "0" again:
   a lagging watch cache could hand back a state older than one already seen.
5. Any other failure backs off (`core.retry.Backoff`) and tries again.
6. A **resourceVersion that goes backwards** (an event, bookmark or list older
   than a version already seen, or a 504 "Too large resource version" for
   the version held) means the API server's store went back in time, as
   after an etcd restore. The cache can no longer be trusted, and versions
   may now repeat with other contents: the informer logs a warning, is not
   `ready` until it has relisted with a consistent read, and announces every
   object of that relist as changed. (Versions are compared as numbers when
   they are numbers, as etcd's are; an opaque one is never compared.)

Objects are the API's own JSON as dicts (camelCase keys, `metadata.name`),
not the generated models: a watch over thousands of pods would spend most of
its time building models nobody reads, and dicts are what `identity.machine_id`
and the inventory controller take anyway. Treat them as read-only: the
cache holds the same dicts the handlers receive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from gpufleet.core.retry import Backoff
from gpufleet.kube.client import api_status, call_json

__all__ = [
    "AddHandler",
    "DeleteHandler",
    "Informer",
    "KubeObject",
    "UpdateHandler",
    "object_key",
]

log = logging.getLogger(__name__)

KubeObject = Mapping[str, Any]
"""An API object as the server's JSON: `{"metadata": {...}, "spec": {...}, ...}`.

Read-only on purpose: the cache and every handler share the same object.
"""

_Json = dict[str, Any]

AddHandler = Callable[[KubeObject], Awaitable[None]]
UpdateHandler = Callable[[KubeObject, KubeObject], Awaitable[None]]
DeleteHandler = Callable[[KubeObject], Awaitable[None]]

# A stream that ends this quickly without a single event is a server or proxy
# refusing to hold a watch open; reconnecting at once would spin.
_MIN_HEALTHY_WATCH = 1.0
# How much longer than the server-side timeout a read may wait before the
# connection is presumed dead (the server sends nothing while nothing changes).
_READ_GRACE = 30.0


class _Expired(Exception):
    """The resourceVersion we hold is too old for the server: relist."""


class _WentBack(Exception):
    """The server's versions went backwards (an etcd restore?): relist consistently."""

    def __init__(self, seen: str, newest: int) -> None:
        super().__init__(f"resourceVersion {seen} after {newest}")
        self.seen = seen
        self.newest = newest


class _TooLarge(Exception):
    """The server has not seen the version we hold: a lagging cache, or versions went back.

    A consistent relist tells which (its version is older than ours only in
    the second case).
    """


_TOO_LARGE = "Too large resource version"


def _too_large(status: object, message: object) -> bool:
    """Whether an error is the server's "Too large resource version" (504)."""
    return status == 504 and _TOO_LARGE in str(message or "")


def _number(version: str | None) -> int | None:
    return int(version) if version and version.isdigit() else None


def object_key(obj: KubeObject) -> str:
    """The cache key of an object: `namespace/name`, or `name` for cluster-scoped ones."""
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name") or "")
    namespace = metadata.get("namespace")
    return f"{namespace}/{name}" if namespace else name


def _uid(obj: KubeObject) -> str:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("uid") or "")


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _resource_version(obj: KubeObject) -> str | None:
    metadata = obj.get("metadata") or {}
    version = metadata.get("resourceVersion")
    return str(version) if version else None


class Informer:
    """Keep a local cache of the objects `list_func` lists, and announce changes.

    `list_func` is a generated list method, such as `kube.core.list_namespaced_pod`
    (then pass `namespace`), `kube.core.list_node` or
    `kube.core.list_pod_for_all_namespaces`. Register async handlers with
    `on_add`, `on_update` and `on_delete` before `run()`. Handlers run one
    event at a time, in the order of the events, after the cache already
    shows the change; an exception in a handler is logged and the informer
    carries on. A handler that blocks holds up every later event, so it
    should hand work to a queue rather than do it.

    `synced` is set once the first list is in the cache (and its objects have
    been announced as added). With `resync` (seconds; None or 0 for never),
    every cached object is announced again as `on_update(obj, obj)` that often,
    which is how client-go consumers retry work they dropped.
    """

    def __init__(
        self,
        list_func: Callable[..., Awaitable[Any]],
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        backoff: Backoff | None = None,
        resync: float | None = None,
        watch_timeout: int = 300,
        page_size: int = 500,
        request_timeout: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if resync is not None and resync < 0:
            raise ValueError(f"resync must be >= 0 or None, got {resync!r}")
        if watch_timeout < 1:
            raise ValueError(f"watch_timeout must be >= 1 second, got {watch_timeout!r}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size!r}")
        self._list_func = list_func
        self._args: tuple[str, ...] = (namespace,) if namespace is not None else ()
        self._selectors: dict[str, str] = {}
        if label_selector:
            self._selectors["label_selector"] = label_selector
        if field_selector:
            self._selectors["field_selector"] = field_selector
        self._backoff = backoff if backoff is not None else Backoff()
        self._resync = resync or None
        self._watch_timeout = watch_timeout
        self._page_size = page_size
        self._request_timeout = request_timeout
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self._what = getattr(list_func, "__name__", "objects") + (
            f" in {namespace}" if namespace else ""
        )

        self._cache: dict[str, _Json] = {}
        self._resource_version: str | None = None
        self._newest: int | None = None  # the highest numeric version seen
        self._went_back = False  # until a consistent relist after versions went backwards
        self._list_consistently = False  # after "too large": the next list reads etcd
        self.versions_went_back = 0
        """How many times the server's resourceVersion was seen going backwards."""
        self._add_handlers: list[AddHandler] = []
        self._update_handlers: list[UpdateHandler] = []
        self._delete_handlers: list[DeleteHandler] = []
        # Resync and the watch loop both announce events; one at a time keeps
        # every handler's view of an object in order.
        self._dispatch_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._delivered = 0  # watch events applied, to tell progress from a failing loop
        self.synced = asyncio.Event()
        """Set once the first list is cached and announced."""

    # Handlers ---------------------------------------------------------------

    def on_add(self, handler: AddHandler) -> AddHandler:
        """Call `handler(obj)` for each object that appears; usable as a decorator."""
        self._add_handlers.append(handler)
        return handler

    def on_update(self, handler: UpdateHandler) -> UpdateHandler:
        """Call `handler(old, new)` for each change to a cached object."""
        self._update_handlers.append(handler)
        return handler

    def on_delete(self, handler: DeleteHandler) -> DeleteHandler:
        """Call `handler(obj)` with the last state of each object that goes away."""
        self._delete_handlers.append(handler)
        return handler

    def add_handlers(
        self,
        *,
        on_add: AddHandler | None = None,
        on_update: UpdateHandler | None = None,
        on_delete: DeleteHandler | None = None,
    ) -> None:
        """Register several handlers at once (client-go's `AddEventHandler` shape)."""
        if on_add is not None:
            self.on_add(on_add)
        if on_update is not None:
            self.on_update(on_update)
        if on_delete is not None:
            self.on_delete(on_delete)

    # The cache --------------------------------------------------------------

    def get(self, namespace: str | None, name: str) -> KubeObject | None:
        """The cached object, or None; pass None or "" as namespace for cluster-scoped kinds."""
        return self._cache.get(f"{namespace}/{name}" if namespace else name)

    def items(self) -> list[KubeObject]:
        """A snapshot of every cached object."""
        return list(self._cache.values())

    def __len__(self) -> int:
        return len(self._cache)

    def __iter__(self) -> Iterator[KubeObject]:
        return iter(self.items())

    @property
    def ready(self) -> bool:
        """Synced, and not relisting after the server's versions went backwards (for /readyz)."""
        return self.synced.is_set() and not self._went_back

    @property
    def resource_version(self) -> str | None:
        """The last resourceVersion seen (list, event or bookmark): where a watch resumes."""
        return self._resource_version

    # Running ----------------------------------------------------------------

    async def run(self) -> None:
        """List, then watch, until `stop()` is called or the task is cancelled."""
        if self._task is not None:
            raise RuntimeError("this informer is already running")
        self._stopping = False
        task = asyncio.create_task(self._main(), name=f"informer {self._what}")
        self._task = task
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # stop() cancelled the inner task: a normal end. Our own caller
            # cancelling us must propagate.
            if self._stopping and (current is None or current.cancelling() == 0):
                return
            raise
        finally:
            self._task = None

    async def stop(self) -> None:
        """End `run()` and wait until it has; the cache keeps its last contents."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        task.cancel()
        await asyncio.wait([task])

    async def _main(self) -> None:
        if self._resync is None:
            await self._observe()
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self._observe())
            group.create_task(self._resync_forever(self._resync))

    async def _observe(self) -> None:
        attempt = 0
        must_list = True
        while True:
            delivered = self._delivered
            error: Exception | None = None
            try:
                if must_list:
                    await self._list_and_sync()
                    must_list = False
                if await self._watch_once():
                    attempt = 0
                    continue
                # Otherwise the stream ended at once, empty: back off quietly.
            except (_WentBack, _TooLarge) as back:
                must_list = True
                if isinstance(back, _WentBack):
                    self._note_went_back(back)
                else:
                    self._list_consistently = True
                    log.info(
                        "resource version too large for the server, relisting",
                        extra={"informer": self._what, "resource_version": self._resource_version},
                    )
                if attempt == 0 or self._delivered > delivered:
                    attempt = 1
                    continue
            except _Expired:
                must_list = True
                log.info("watch expired, relisting", extra={"informer": self._what})
                # Expected now and then (etcd compaction, a long outage): relist
                # at once, unless relisting keeps expiring with nothing between.
                if attempt == 0 or self._delivered > delivered:
                    attempt = 1
                    continue
            except Exception as exc:
                # Never die: a long-running process depends on this cache.
                error = exc
            if self._delivered > delivered:
                attempt = 0  # events flowed before the failure: the server is fine
            delay = self._backoff.delay(attempt, self._rand)
            attempt += 1
            if error is not None:
                log.warning(
                    "list/watch failed, retrying",
                    extra={
                        "informer": self._what,
                        "error": f"{type(error).__name__}: {error}",
                        "status": api_status(error),
                        "retry_in": round(delay, 3),
                    },
                )
            await self._sleep(delay)

    async def _list(self, resource_version: str) -> tuple[list[_Json], str | None]:
        """Every object, page by page; `resource_version` ("0" or "") goes with the first page.

        "0" lets the API server answer from its watch cache; "" (sent as no
        parameter) is a consistent read. The `continue` pages carry the
        first page's snapshot in their token, so they send no version.
        """
        items: list[_Json] = []
        version: str | None = None
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {**self._selectors, "limit": self._page_size}
            if token:
                kwargs["_continue"] = token
            elif resource_version:
                kwargs["resource_version"] = resource_version
            try:
                body = await call_json(
                    self._list_func,
                    *self._args,
                    _request_timeout=self._request_timeout,
                    **kwargs,
                )
            except ApiException as exc:
                if api_status(exc) == 410:
                    # The continue token expired mid-list: start over.
                    raise _Expired from exc
                if _too_large(api_status(exc), exc.body) and resource_version:
                    raise _TooLarge from exc
                raise
            items.extend(item for item in body.get("items") or () if isinstance(item, dict))
            metadata = body.get("metadata") or {}
            # Every page of one list is the same snapshot; the first page's
            # version is the one to watch from.
            version = version or metadata.get("resourceVersion") or None
            token = metadata.get("continue") or None
            if not token:
                return items, version

    async def _list_and_sync(self) -> None:
        # The first list may come from the watch cache at any version; a
        # relist must not go back in time (see the module notes).
        consistent = self._went_back or self._list_consistently
        list_from = "" if consistent else self._resource_version or "0"
        try:
            items, version = await self._list(list_from)
        except _Expired:
            if list_from in ("", "0"):
                raise
            # Compacted away: a consistent read is the only list left.
            log.info(
                "resource version too old to list at, listing afresh",
                extra={"informer": self._what, "resource_version": list_from},
            )
            items, version = await self._list("")
        except _TooLarge:
            items, version = await self._list("")
        self._list_consistently = False
        listed = _number(version)
        if listed is not None and self._newest is not None and listed < self._newest:
            self._note_went_back(_WentBack(str(version), self._newest))
        # Versions may repeat with other contents after going back: announce all.
        suspect = self._went_back
        fresh = {object_key(obj): obj for obj in items}
        async with self._dispatch_lock:
            old = self._cache
            self._cache = fresh
            self._resource_version = version
            self._newest = listed if suspect else _max(self._newest, listed)
            first = not self.synced.is_set() or suspect
            for key, obj in fresh.items():
                before = old.get(key)
                if before is not None and _uid(before) != _uid(obj):
                    # Deleted and created again under its name while we were
                    # away: another object, so its old self must go first.
                    await self._announce_delete(before)
                    before = None
                if before is None:
                    await self._announce_add(obj)
                elif first or _resource_version(before) != _resource_version(obj):
                    await self._announce_update(before, obj)
            for key, gone in old.items():
                if key not in fresh:
                    await self._announce_delete(gone)
        log.debug(
            "listed",
            extra={"informer": self._what, "objects": len(fresh), "resource_version": version},
        )
        self.synced.set()
        if suspect:
            self._went_back = False
            log.info("relisted after the resourceVersion went backwards", extra={
                "informer": self._what, "objects": len(fresh), "resource_version": version,
            })  # fmt: skip

    def _note_went_back(self, back: _WentBack) -> None:
        if not self._went_back:
            self.versions_went_back += 1
            log.warning(
                "resourceVersion went backwards (an etcd restore?): "
                "not ready until a consistent relist",
                extra={"informer": self._what, "resource_version": back.seen,
                       "newest_seen": back.newest},
            )  # fmt: skip
        self._went_back = True

    def _advance(self, version: str | None) -> None:
        """Move the held version to `version`; `_WentBack` if it is older than one seen."""
        if not version:
            return
        number = _number(version)
        if number is not None and self._newest is not None and number < self._newest:
            raise _WentBack(version, self._newest)
        self._newest = _max(self._newest, number)
        self._resource_version = version

    async def _watch_once(self) -> bool:
        """Follow one watch stream to its end; True if it delivered any event."""
        started = self._clock()
        kwargs: dict[str, Any] = {
            **self._selectors,
            "watch": True,
            "allow_watch_bookmarks": True,
            "timeout_seconds": self._watch_timeout,
            "_preload_content": False,
            "_request_timeout": aiohttp.ClientTimeout(
                sock_connect=self._request_timeout,
                sock_read=self._watch_timeout + _READ_GRACE,
            ),
        }
        if self._resource_version:
            kwargs["resource_version"] = self._resource_version
        response = await self._list_func(*self._args, **kwargs)
        events = 0
        try:
            if response.status == 410:
                raise _Expired
            if not 200 <= response.status <= 299:
                body = await response.read()
                if _too_large(response.status, body.decode("utf-8", errors="replace")):
                    raise _TooLarge
                error = ApiException(status=response.status, reason=response.reason)
                error.body = body.decode("utf-8", errors="replace")
                raise error
            while True:
                line = await response.content.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                await self._apply(json.loads(line))
                events += 1
                self._delivered += 1
        finally:
            # A half-read stream must not go back to the connection pool.
            response.close()
        return events > 0 or self._clock() - started >= _MIN_HEALTHY_WATCH

    async def _apply(self, event: _Json) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"watch event without an object: {str(event)[:200]}")
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Expired
            if _too_large(code, obj.get("message")):
                raise _TooLarge
            error = ApiException(status=code, reason=f"{obj.get('reason')}: {obj.get('message')}")
            raise error
        version = _resource_version(obj)
        if kind == "BOOKMARK":
            self._advance(version)
            return
        key = object_key(obj)
        async with self._dispatch_lock:
            self._advance(version)
            if kind in ("ADDED", "MODIFIED"):
                before = self._cache.get(key)
                if before is not None and version and _resource_version(before) == version:
                    return  # already known (a replay after a reconnect): not a change
                self._cache[key] = obj
                if before is not None and _uid(before) != _uid(obj):
                    await self._announce_delete(before)  # a missed DELETED: another object
                    before = None
                if before is None:
                    await self._announce_add(obj)
                else:
                    await self._announce_update(before, obj)
            elif kind == "DELETED":
                gone = self._cache.pop(key, None)
                if gone is not None:
                    await self._announce_delete(obj)
            else:
                log.warning(
                    "unknown watch event type", extra={"informer": self._what, "type": kind}
                )

    async def _resync_forever(self, period: float) -> None:
        await self.synced.wait()
        while True:
            await self._sleep(period)
            for key in list(self._cache):
                async with self._dispatch_lock:
                    obj = self._cache.get(key)
                    if obj is not None:
                        await self._announce_update(obj, obj)

    # Dispatch ---------------------------------------------------------------

    async def _announce_add(self, obj: KubeObject) -> None:
        for handler in self._add_handlers:
            await self._call(handler, "add", obj, obj)

    async def _announce_update(self, old: KubeObject, new: KubeObject) -> None:
        for handler in self._update_handlers:
            await self._call(handler, "update", new, old, new)

    async def _announce_delete(self, obj: KubeObject) -> None:
        for handler in self._delete_handlers:
            await self._call(handler, "delete", obj, obj)

    async def _call(
        self, handler: Callable[..., Awaitable[None]], event: str, obj: KubeObject, *args: Any
    ) -> None:
        try:
            await handler(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # One bad object must not stop the informer for everyone else.
            log.error(
                "informer handler failed",
                extra={
                    "informer": self._what,
                    "event": event,
                    "object": object_key(obj),
                    "handler": getattr(handler, "__qualname__", repr(handler)),
                    "error": f"{type(exc).__name__}: {exc}",
                },
                exc_info=exc,
            )
