"""Watch matching pods and process each ready pod once per UID, on the leader only.

Split the way kopf splits an operator: *observation* (a pod informer and a node
informer feed events), *queueing* (a deduplicating work queue keyed by pod
UID), and *processing* (workers hand a pod and its Node to a ``PodProcessor``,
with retries). A failed pod goes back to the queue to wait out its own backoff;
its worker is free at once, so pods on a hung node hold up no other pod. The
processor is the only part that differs between the inventory controller
(exec nvidia-smi) and check mode (exec a command).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from gpufleet.core.retry import Backoff
from gpufleet.inventory.errors import InventoryError
from gpufleet.inventory.workqueue import DEFAULT_BACKOFF, WorkQueue

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]
"""A Kubernetes object in its JSON shape."""


def meta(obj: Obj, field: str, default: Any = None) -> Any:
    """``obj.metadata.<field>``."""
    return (obj.get("metadata") or {}).get(field, default)


def pod_is_ready(pod: Obj) -> bool:
    """Phase Running and every container ready: gpuid's rule for "worth an exec"."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or meta(pod, "deletionTimestamp"):
        return False
    containers = status.get("containerStatuses") or []
    return bool(containers) and all(c.get("ready") for c in containers)


class Unfinished(InventoryError):
    """Part of a pod's work is done; the retry calls ``resume`` rather than starting over.

    The controller raises it when some exporters took a pod's readings and
    others did not: the retry hands the same readings to the others, without
    exec'ing the pod again.
    """

    def __init__(self, message: str, resume: Callable[[], Awaitable[None]]) -> None:
        super().__init__(message)
        self.resume = resume


class PodProcessor(Protocol):
    """What to do with one ready pod; raise to have it retried (``Unfinished`` to resume)."""

    async def process(self, pod: Obj, node: Obj) -> None:
        """Process ``pod``, running on ``node``."""
        ...


class ControllerMetrics:
    """The pod-processing metrics of the controller and check mode."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.gpu_count = Gauge(
            "gpuid_gpu_count_total",
            "GPUs read from a node at its last successful read (a gauge despite the name, "
            "which is gpuid's).",
            ["cluster", "node"],
            registry=reg,
        )
        self.processed = Counter(
            "gpufleet_pods_processed",
            "Pods processed, by result: success, retry (an attempt failed), gave_up.",
            ["result"],
            registry=reg,
        )
        self.exec_duration = Histogram(
            "gpufleet_exec_duration_seconds",
            "Time of one exec in a pod, successful or not.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=reg,
        )
        self.queue_depth = Gauge(
            "gpufleet_workqueue_depth", "Pods waiting for a worker.", registry=reg
        )
        self.leader = Gauge(
            "gpufleet_leader", "1 while this replica is the leader and works, else 0.",
            registry=reg,
        )  # fmt: skip


class InformerLike(Protocol):
    """The part of ``gpufleet.kube.watch.Informer`` the loop uses."""

    synced: asyncio.Event

    def get(self, namespace: str | None, name: str) -> Obj | None: ...

    def items(self) -> list[Obj]: ...


@dataclass(frozen=True, slots=True)
class _PodKey:
    namespace: str
    name: str


class PodWorkLoop:
    """Queue ready pods by UID and process each once, with retries, while leading.

    A pod is processed once per UID: a relist, a resumed watch or an update of
    an already-processed pod does not process it again. A pod that failed
    ``max_retries`` times is given up (one log line, one metric) and processed
    again on its next update. Between attempts the pod waits in the queue for
    its own ``backoff`` step, holding no worker. With ``resync`` every ready pod
    is processed again every ``resync`` seconds.
    """

    def __init__(
        self,
        *,
        pods: InformerLike,
        nodes: InformerLike,
        processor: PodProcessor,
        metrics: ControllerMetrics,
        workers: int = 16,
        max_retries: int = 5,
        backoff: Backoff | None = None,
        resync: float = 0.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pods = pods
        self.nodes = nodes
        self.processor = processor
        self.metrics = metrics
        self.workers = workers
        self.max_retries = max_retries
        self.backoff = backoff or DEFAULT_BACKOFF
        self.resync = resync
        self.queue = WorkQueue(on_depth=metrics.queue_depth.set, backoff=self.backoff, rand=rand)
        self._by_uid: dict[str, _PodKey] = {}
        self._done: set[str] = set()
        # What is left of a pod's partly done work (see Unfinished), by UID.
        self._resume: dict[str, Callable[[], Awaitable[None]]] = {}
        self._leading = False
        self._tasks: list[asyncio.Task[None]] = []

    # --- observation: informer handlers ------------------------------------------

    async def on_pod_add(self, pod: Obj) -> None:
        """A pod appeared (or a relist found one we did not have)."""
        await self._consider(pod)

    async def on_pod_update(self, old: Obj, new: Obj) -> None:
        """A pod changed: it may just have become ready."""
        await self._consider(new)

    async def on_pod_delete(self, pod: Obj) -> None:
        """A pod is gone: never process it, and forget it was processed."""
        uid = str(meta(pod, "uid", ""))
        self._by_uid.pop(uid, None)
        self._done.discard(uid)
        self._resume.pop(uid, None)
        await self.queue.forget(uid)

    async def _consider(self, pod: Obj) -> None:
        uid = str(meta(pod, "uid", ""))
        if not uid:
            return
        self._by_uid[uid] = _PodKey(str(meta(pod, "namespace", "")), str(meta(pod, "name", "")))
        if self._leading and uid not in self._done and pod_is_ready(pod):
            await self.queue.add(uid)

    # --- leadership --------------------------------------------------------------

    async def start_leading(self) -> None:
        """Start the workers and queue every ready pod not processed yet."""
        if self._leading:
            return
        self._leading = True
        self.metrics.leader.set(1)
        log.info("leading: processing pods", extra={"workers": self.workers})
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        if self.resync > 0:
            self._tasks.append(asyncio.create_task(self._resync_loop()))
        for pod in self.pods.items():
            await self._consider(pod)

    async def stop_leading(self) -> None:
        """Stop work at once: cancel the workers and drop the queue."""
        if not self._leading:
            return
        self._leading = False
        self.metrics.leader.set(0)
        log.warning("not leading: stopped processing pods")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._resume.clear()  # the next leader (maybe this one again) reads afresh
        await self.queue.clear()

    @property
    def leading(self) -> bool:
        """Whether the workers run."""
        return self._leading

    # --- processing --------------------------------------------------------------

    async def _worker(self, number: int) -> None:
        while True:
            uid = await self.queue.get()
            if uid is None:
                return
            try:
                await self._process(uid)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the worker: log and go on
                log.exception("pod processing crashed", extra={"uid": uid, "worker": number})
            finally:
                await self.queue.done(uid)

    def _current(self, uid: str) -> Obj | None:
        key = self._by_uid.get(uid)
        if key is None:
            return None
        pod = self.pods.get(key.namespace, key.name)
        if pod is None or meta(pod, "uid") != uid or not pod_is_ready(pod):
            return None
        return pod

    async def _process(self, uid: str) -> None:
        """One attempt; a failure sends the pod to wait out its backoff in the queue."""
        pod = self._current(uid)
        if pod is None or uid in self._done:
            # Deleted, replaced, no longer ready, or done meanwhile.
            self._resume.pop(uid, None)
            await self.queue.reset(uid)
            return
        where = {"pod": f"{meta(pod, 'namespace')}/{meta(pod, 'name')}", "uid": uid}
        try:
            resume = self._resume.pop(uid, None)
            if resume is not None:
                await resume()
            else:
                node_name = str((pod.get("spec") or {}).get("nodeName") or "")
                node = self.nodes.get(None, node_name)
                if node is None:
                    raise LookupError(f"node {node_name!r} of the pod is not in the node informer")
                await self.processor.process(pod, node)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, Unfinished):
                self._resume[uid] = exc.resume
            attempt = self.queue.failures(uid) + 1
            if attempt > self.max_retries:
                self.metrics.processed.labels("gave_up").inc()
                self._resume.pop(uid, None)
                await self.queue.reset(uid)
                log.error(
                    "giving up on pod until its next update",
                    extra={**where, "attempts": attempt, "error": str(exc) or repr(exc)},
                )
                return
            self.metrics.processed.labels("retry").inc()
            delay = await self.queue.retry_later(uid)
            log.warning(
                "pod processing failed; retrying",
                extra={**where, "attempt": attempt, "retry_in_s": round(delay, 3),
                       "error": str(exc) or repr(exc)},
            )  # fmt: skip
            return
        self._done.add(uid)
        await self.queue.reset(uid)
        self.metrics.processed.labels("success").inc()

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync)
            log.info("resync: reading every ready pod again")
            self._done.clear()
            for pod in self.pods.items():
                await self._consider(pod)

    async def close(self) -> None:
        """Stop the workers."""
        await self.stop_leading()
        await self.queue.close()
