"""The agent: watch the caches, pull what the node's GPUs can use, report, collect garbage.

- Two informers (GKMCache in every namespace, ClusterGKMCache) feed `NodeState`. A cache whose
  status names a new ``resolvedImage`` gets a pull task: `Puller.pull` in a worker thread, and
  on failure (a registry outage, a refused image) the digest is ``Error`` with the reason and
  is tried again after an exponential backoff (`core.retry.Backoff`), for as long as the cache
  wants it. Nothing is ``Extracted`` before the store's marker says the entry is whole.
- Every change of the state marks its cache dirty; one writer task turns the dirty caches into
  node object writes and one Node label patch, coalescing bursts, and writes nothing when
  nothing changed (see `nodeobject`).
- A cache that is deleted (or being deleted) keeps its digests while a pod here mounts them;
  once none does, its node object goes and GC removes its store entries, unless another cache
  resolves to the same digest.
- GC (`collect`, the ``gc`` module's function) runs after every change that can free an
  entry and every ``KCACHE_GC_INTERVAL``, never before both informers have listed (until then
  every cache would look unwanted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from gpufleet.core.retry import Backoff
from gpufleet.kcache.cluster import CLUSTER_CACHE, NAMESPACED_CACHE, CacheKey, node_label_key
from gpufleet.kcache.node.gpus import NodeGpus
from gpufleet.kcache.node.nodeobject import NodeLabels, NodeObjects, node_status
from gpufleet.kcache.node.pull import Puller, PullOutcome
from gpufleet.kcache.node.state import CacheSpec, NodeState, Phase, cache_key_of
from gpufleet.kcache.node.threads import in_daemon_thread
from gpufleet.kcache.store import CacheStore, StoredCache

__all__ = ["Agent", "Collect", "InformerFactory"]

log = logging.getLogger(__name__)


MAX_MESSAGE = 2048
"""The most characters of a condition message (the CRD allows 32 KiB; a reason is short)."""


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


class Collect(Protocol):
    """The GC: remove unwanted, unused entries (and LRU ones over the budget); returns them."""

    def __call__(
        self,
        store: CacheStore,
        *,
        wanted: set[str],
        in_use: set[tuple[str, str]],
        max_bytes: int | None,
    ) -> list[StoredCache]:
        """Blocking; the agent runs it in a worker thread."""
        ...


class _Informer(Protocol):
    synced: asyncio.Event

    @property
    def ready(self) -> bool: ...

    def add_handlers(self, *, on_add: Any, on_update: Any, on_delete: Any) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


InformerFactory = Callable[[str], _Informer]
"""An informer of the cache kind named (``GKMCache`` or ``ClusterGKMCache``)."""


class Agent:
    """Keeps the node's store, node objects and labels in line with the caches."""

    def __init__(
        self,
        state: NodeState,
        puller: Puller,
        *,
        gpus: NodeGpus,
        node_name: str,
        informers: InformerFactory,
        objects: NodeObjects,
        labels: NodeLabels,
        collect: Collect,
        max_bytes: int | None = None,
        gc_interval: float = 300.0,
        backoff: Backoff | None = None,
        write_backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.state = state
        self.puller = puller
        self.gpus = gpus
        self.node_name = node_name
        self.objects = objects
        self.labels = labels
        self._collect = collect
        self._max_bytes = max_bytes
        self._gc_interval = gc_interval
        self._backoff = backoff or Backoff(initial=1.0, cap=300.0)
        self._write_backoff = write_backoff or Backoff(initial=0.5, cap=30.0)
        self._sleep = sleep
        self._rand = rand
        self.informers = {
            NAMESPACED_CACHE.kind: informers(NAMESPACED_CACHE.kind),
            CLUSTER_CACHE.kind: informers(CLUSTER_CACHE.kind),
        }
        for informer in self.informers.values():
            informer.add_handlers(
                on_add=self._on_add, on_update=self._on_update, on_delete=self._on_delete
            )
        self._pulls: dict[tuple[CacheKey, str], asyncio.Task[None]] = {}
        self._dirty: set[CacheKey] = set()
        self._wake = asyncio.Event()
        self._gc_wake = asyncio.Event()
        self._gc_lock = asyncio.Lock()
        self.pulls_total = 0
        self.pull_failures_total = 0
        self.gc_removed_total = 0
        state.on_change(self._mark)

    # Readiness ----------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """Both informers have listed (and are not relisting after an etcd restore)."""
        return all(informer.ready for informer in self.informers.values())

    # Informer events ------------------------------------------------------------------------

    async def _on_add(self, obj: Any) -> None:
        self._take(obj)

    async def _on_update(self, old: Any, new: Any) -> None:
        self._take(new)

    async def _on_delete(self, obj: Any) -> None:
        key = cache_key_of(obj)
        self.state.forget_cache(key)
        self.collect_soon()

    def _take(self, obj: Any) -> None:
        spec = CacheSpec.from_object(obj)
        before = self.state.cache(spec.key)
        digest = self.state.set_cache(spec)
        if digest is not None and spec.resolved_image is not None:
            self._start_pull(spec.key, digest, spec.resolved_image)
        if before is not None and (
            before.resolved_digest != spec.resolved_digest or spec.deleting != before.deleting
        ):
            self.collect_soon()

    def _mark(self, key: CacheKey) -> None:
        self._dirty.add(key)
        self._wake.set()

    # Pulls ------------------------------------------------------------------------------------

    def _start_pull(self, key: CacheKey, digest: str, image: str) -> None:
        running = self._pulls.get((key, digest))
        if running is not None and not running.done():
            running.cancel()
        task = asyncio.create_task(self._pull(key, digest, image), name=f"pull {key} {digest}")
        self._pulls[(key, digest)] = task
        task.add_done_callback(lambda t: self._pull_done(key, digest, t))

    def _pull_done(self, key: CacheKey, digest: str, task: asyncio.Task[None]) -> None:
        if self._pulls.get((key, digest)) is task:
            del self._pulls[(key, digest)]

    def _still_wanted(self, key: CacheKey, digest: str, image: str) -> bool:
        state = self.state.digest_state(key, digest)
        return state is not None and state.image == image

    async def _pull(self, key: CacheKey, digest: str, image: str) -> None:
        attempt = 0
        self.state.update(key, digest, phase=Phase.DOWNLOADING, message="")
        while self._still_wanted(key, digest, image):
            self.pulls_total += 1
            try:
                outcome: PullOutcome = await in_daemon_thread(self.puller.pull, image, digest)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Never give up while the cache wants it (GKM's agent never retried).
                self.pull_failures_total += 1
                delay = self._backoff.delay(attempt, self._rand)
                attempt += 1
                message = _bounded(f"{type(exc).__name__}: {exc}")
                log.warning(
                    "pull failed, retrying",
                    extra={"cache": str(key), "image": image, "error": message,
                           "retry_in": round(delay, 3)},
                )  # fmt: skip
                if self._still_wanted(key, digest, image):
                    self.state.update(key, digest, phase=Phase.ERROR, message=message)
                await self._sleep(delay)
                continue
            if not self._still_wanted(key, digest, image):
                break
            if not outcome.compatible:
                self.state.update(
                    key, digest, phase=Phase.INCOMPATIBLE, message=_bounded(outcome.message),
                    verdicts=outcome.verdicts,
                )  # fmt: skip
                log.info("incompatible with this node", extra={
                    "cache": str(key), "digest": digest, "reason": outcome.message,
                })  # fmt: skip
                return
            self.state.update(
                key, digest, phase=Phase.EXTRACTED, message="", verdicts=outcome.verdicts,
                mount_root=outcome.mount_root, size=outcome.size, path=outcome.path,
            )  # fmt: skip
            log.info("cache ready", extra={"cache": str(key), "digest": digest})
            return
        self.collect_soon()  # no longer wanted: what it pulled may go

    # Writing node objects and labels -----------------------------------------------------------

    async def _write_forever(self) -> None:
        await self._wait_synced()
        await self._prune()
        # Whatever changed before we listened (the mounts found at start) is written too.
        self._dirty.update(self.state.keys())
        self._wake.set()
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            keys, self._dirty = sorted(self._dirty), set()
            try:
                await self.write(keys)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._write_backoff.delay(attempt, self._rand)
                attempt += 1
                log.warning("writing node objects failed, retrying", extra={
                    "error": f"{type(exc).__name__}: {exc}", "retry_in": round(delay, 3),
                })  # fmt: skip
                self._dirty.update(keys)
                await self._sleep(delay)
                self._wake.set()

    async def _prune(self) -> None:
        """Once listed: drop node objects and labels of caches that went while we were down."""
        attempt = 0
        while True:
            try:
                await self.objects.prune(self.state.keys())
                await self.labels.prune({node_label_key(key) for key in self.state.caches})
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._write_backoff.delay(attempt, self._rand)
                attempt += 1
                log.warning("pruning node objects and labels failed, retrying", extra={
                    "error": f"{type(exc).__name__}: {exc}", "retry_in": round(delay, 3),
                })  # fmt: skip
                await self._sleep(delay)

    async def write(self, keys: Collection[CacheKey]) -> None:
        """Bring the node objects and the Node labels of `keys` in line with the state."""
        failed: list[CacheKey] = []
        error: Exception | None = None
        for key in keys:
            content = node_status(self.state, key, node_name=self.node_name, gpus=self.gpus)
            try:
                await self.objects.sync(key, content)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed.append(key)
                error = exc
        await self.labels.apply({node_label_key(key): self.state.label(key) for key in keys})
        if error is not None:
            self._dirty.update(failed)
            raise error

    # GC ------------------------------------------------------------------------------------

    def collect_soon(self) -> None:
        """Run GC soon (coalesced with other requests)."""
        self._gc_wake.set()

    async def collect_now(self) -> list[StoredCache]:
        """Run GC once, now; never before the informers have listed."""
        if not self.synced:
            return []
        async with self._gc_lock:
            wanted = self.state.wanted()
            in_use = self.state.in_use()
            removed = await asyncio.to_thread(
                self._collect, self.puller.store, wanted=wanted, in_use=in_use,
                max_bytes=self._max_bytes,
            )  # fmt: skip
            if removed:
                self.gc_removed_total += len(removed)
                kept = {entry.digest for entry in self.puller.store.caches()}
                await asyncio.to_thread(self.puller.forget_labels, kept | wanted)
                log.info("collected store entries", extra={
                    "removed": [f"{e.digest} {e.mount_root}" for e in removed],
                })  # fmt: skip
            self._forget_removed(removed)
        return removed

    def _forget_removed(self, removed: list[StoredCache]) -> None:
        """A wanted digest evicted for the budget is Pending again: a pod's mount pulls it anew."""
        gone = {entry.digest for entry in removed}
        for key, state in list(self.state.pulls()):
            if state.digest not in gone or state.phase is not Phase.EXTRACTED:
                continue
            if self.puller.store.installed(state.digest, state.mount_root or "") is None:
                self.state.update(
                    key, state.digest, phase=Phase.PENDING, path=None,
                    message="evicted from the store for its disk budget (KCACHE_STORE_MAX_BYTES); "
                    "pulled again when a pod mounts it",
                )  # fmt: skip

    def want(self, key: CacheKey) -> None:
        """A pod asks for `key`: pull its resolved digest if nothing is pulling it."""
        spec = self.state.cache(key)
        if spec is None or spec.resolved_digest is None or spec.resolved_image is None:
            return
        state = self.state.digest_state(key, spec.resolved_digest)
        if state is None or state.phase is not Phase.PENDING:
            return
        task = self._pulls.get((key, spec.resolved_digest))
        if task is None or task.done():
            self._start_pull(key, spec.resolved_digest, spec.resolved_image)

    async def _collect_forever(self) -> None:
        await self._wait_synced()
        self._gc_wake.set()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._gc_interval):
                    await self._gc_wake.wait()
            self._gc_wake.clear()
            try:
                await self.collect_now()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("GC failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    # Running ---------------------------------------------------------------------------------

    async def _wait_synced(self) -> None:
        for informer in self.informers.values():
            await informer.synced.wait()
        self.state.synced = True

    async def run(self) -> None:
        """Watch, pull, write and collect until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                for kind, informer in self.informers.items():
                    group.create_task(informer.run(), name=f"informer {kind}")
                group.create_task(self._write_forever(), name="node objects")
                group.create_task(self._collect_forever(), name="gc")
        finally:
            for task in list(self._pulls.values()):
                task.cancel()
            for task in list(self._pulls.values()):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
