"""``gpufleet cache operator``: kopf in-process, inside gpufleet's leader election.

The process serves /metrics, /healthz and /readyz from the start. With leader election
(the default) it competes for the Lease like the inventory controller; while it leads it
runs kopf (standalone: kopf's own peering is off) and the reconciler; when it loses the
Lease it stops kopf at once and competes again. ``LEADER_ELECTION=false`` runs kopf
straight away (one replica only).

kopf's records go to the standard ``kopf`` loggers, so they come out through gpufleet's
JSON (or text) handler like every other line; kopf's own handler setup
(`kopf.configure`) is never called, and its Events from log lines are off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpufleet.core.config import LogLevel
from gpufleet.core.http import HealthServer, ReadinessCheck
from gpufleet.core.signals import STOP_SIGNALS, stop_on_signals
from gpufleet.kcache.operator.api import CacheApi
from gpufleet.kcache.operator.controller import CacheController, ControllerStats
from gpufleet.kcache.operator.errors import OperatorError
from gpufleet.kcache.operator.handlers import build_registry, connection_info, operator_settings
from gpufleet.kcache.operator.resolve import RegistryOptions, Resolver, TrustSource
from gpufleet.kcache.operator.settings import OperatorSettings
from gpufleet.kube.client import Kube, connect
from gpufleet.kube.lease import LeaderElector

__all__ = ["OperatorRuntime", "run_operator"]

log = logging.getLogger(__name__)

PREFIX = "gpufleet_kcache_operator"


@dataclass
class OperatorRuntime:
    """What a running operator exposes to its health checks, metrics and tests."""

    server: HealthServer
    stats: ControllerStats = field(default_factory=ControllerStats)
    controller: CacheController | None = None
    """The reconciler of the current leadership term (None while not leading)."""
    kopf_ready: asyncio.Event | None = None
    elector: LeaderElector | None = None
    terms: int = 0
    """Leadership terms started (kopf runs), since the process started."""


class _Collector(Collector):
    """The operator's counters and gauges, read from the runtime at scrape time."""

    def __init__(self, runtime: OperatorRuntime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        stats, controller = self._runtime.stats, self._runtime.controller
        yield GaugeMetricFamily(
            f"{PREFIX}_leader", "1 while this replica leads and runs kopf, else 0.",
            value=1 if controller is not None else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{PREFIX}_caches", "GKMCaches and ClusterGKMCaches the operator knows.",
            value=controller.caches if controller is not None else 0,
        )  # fmt: skip
        for name, help_text, value in (
            ("reconciles", "Reconciles of one cache.", stats.reconciles),
            ("status_writes", "Status patches written.", stats.status_writes),
            ("resolutions", "Tag resolutions (with the signature check).", stats.resolutions),
            ("reconcile_failures", "Reconciles that failed and were retried.", stats.failures),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return []  # collected at scrape time only


class _ForeignTasks(Collection["asyncio.Task[Any]"]):
    """Every task that is not kopf's own: what kopf's shutdown must leave alone.

    kopf ends by waiting up to 5 s for, then cancelling, every task of the loop that it
    did not see at its start ("hung" tasks), taking the loop for its own. In this process
    the loop also serves /metrics and the Lease, and a test's API double: kopf may wait
    for and cancel only tasks running kopf's code (the reconciler's workers are stopped
    by `_lead` itself).
    """

    def __contains__(self, task: object) -> bool:
        coro = task.get_coro() if isinstance(task, asyncio.Task) else None
        code = getattr(coro, "cr_code", None)
        filename = code.co_filename if code is not None else ""
        return f"{os.sep}kopf{os.sep}" not in filename

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _reclaim_signals(stop: asyncio.Event | None) -> None:
    """Take SIGTERM/SIGINT back from kopf, which installs its own in the main thread.

    With `stop` (this process owns the signals) they set it, and the operator stops the
    way every gpufleet process does; without, kopf's handlers are just removed.
    """
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            if stop is None:
                loop.remove_signal_handler(signum)
            else:
                loop.add_signal_handler(signum, stop.set)


async def _lead(
    kube: Kube,
    settings: OperatorSettings,
    runtime: OperatorRuntime,
    stop: asyncio.Event,
    *,
    signals: asyncio.Event | None,
    coalesce: float,
) -> None:
    """One leadership term: the reconciler and kopf, until `stop` is set."""
    api = CacheApi(kube, event_namespace=settings.namespace)
    trust = TrustSource(api.read_secret_data, settings.namespace, settings.kcache_trust_secret)
    options = RegistryOptions(
        plain_http=settings.kcache_plain_http,
        username=settings.registry_username,
        password=(
            settings.registry_password.get_secret_value()
            if settings.registry_password is not None
            else None
        ),
        timeout=settings.kcache_resolve_timeout,
    )
    controller = CacheController(
        api, Resolver(options, trust.load, policy_source=trust.where),
        resolve_interval=settings.kcache_resolve_interval,
        cluster_access=settings.kcache_cluster_cache_access.value, coalesce=coalesce,
        stats=runtime.stats,
    )  # fmt: skip
    registry = build_registry(controller, lambda: connection_info(kube.configuration))
    ready = asyncio.Event()
    runtime.controller, runtime.kopf_ready = controller, ready
    runtime.terms += 1

    async def close_on_stop() -> None:
        # Before kopf's own shutdown waits for "hung" tasks: the workers are ours.
        await stop.wait()
        await controller.close()

    closer = asyncio.create_task(close_on_stop())
    try:
        tasks = await kopf.spawn_tasks(
            registry=registry, settings=operator_settings(), standalone=True, clusterwide=True,
            stop_flag=stop, ready_flag=ready, memo=kopf.Memo(),
        )  # fmt: skip
        _reclaim_signals(signals)
        log.info("leading: kopf started", extra={"term": runtime.terms})
        await kopf.run_tasks(tasks, ignored=_ForeignTasks())
    finally:
        stop.set()
        await closer
        runtime.controller, runtime.kopf_ready = None, None
        log.info("kopf stopped", extra={"term": runtime.terms})


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


async def _term(
    kube: Kube, settings: OperatorSettings, runtime: OperatorRuntime,
    until: Iterable[asyncio.Event], *, signals: asyncio.Event | None, coalesce: float,
) -> None:  # fmt: skip
    """Run one term until any of `until` is set; a term that ends on its own is fatal."""
    term_stop = asyncio.Event()
    term = asyncio.create_task(
        _lead(kube, settings, runtime, term_stop, signals=signals, coalesce=coalesce)
    )
    ended = asyncio.Event()
    term.add_done_callback(lambda _: ended.set())
    try:
        await _first(ended, *until)
    finally:
        term_stop.set()
        try:
            await term
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            raise OperatorError(f"kopf failed: {type(exc).__name__}: {exc}") from exc
    if ended.is_set() and not any(event.is_set() for event in until):
        raise OperatorError("kopf stopped on its own")


async def run_operator(
    settings: OperatorSettings,
    *,
    kube: Kube | None = None,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[OperatorRuntime], None] | None = None,
    coalesce: float = 0.5,
) -> None:
    """Run the operator until `stop` is set (without `stop`: until SIGTERM or SIGINT).

    `started` is called once the health server listens (tests use it to reach the
    runtime); `coalesce` is how long a cache's worker waits after an event for more.
    """
    signals: asyncio.Event | None = None
    if stop is None:
        with stop_on_signals() as signals:
            return await _run(settings, kube, registry, signals, started, coalesce, signals)
    return await _run(settings, kube, registry, stop, started, coalesce, signals)


async def _run(
    settings: OperatorSettings,
    kube: Kube | None,
    registry: CollectorRegistry | None,
    stop: asyncio.Event,
    started: Callable[[OperatorRuntime], None] | None,
    coalesce: float,
    signals: asyncio.Event | None,
) -> None:
    if settings.log_level is not LogLevel.DEBUG:
        # kopf logs every handled event at info ("Handler 'nodes' succeeded"): at debug only.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    own_kube = kube is None
    if kube is None:
        kube = await connect(settings)
    metrics = REGISTRY if registry is None else registry
    server = HealthServer(
        port=settings.server_port, registry=metrics, setting="--server-port, SERVER_PORT"
    )
    runtime = OperatorRuntime(server)
    collector = _Collector(runtime)
    metrics.register(collector)
    lease_kube: Kube | None = None
    try:
        if settings.leader_election:
            lease_kube = kube.for_leader_election()
            runtime.elector = LeaderElector.from_settings(lease_kube, settings)
        server.add_readiness_check("operator", _ready(runtime))
        await server.start()
        log.info(
            "kcache operator serving",
            extra={"port": server.port, "leader_election": settings.leader_election,
                   "namespace": settings.namespace},
        )  # fmt: skip
        if started is not None:
            started(runtime)
        if runtime.elector is None:
            await _term(kube, settings, runtime, [stop], signals=signals, coalesce=coalesce)
        else:
            await _follow(kube, settings, runtime, runtime.elector, stop, signals, coalesce)
    finally:
        await server.stop()
        metrics.unregister(collector)
        if runtime.elector is not None:
            await runtime.elector.release()
        if lease_kube is not None:
            await lease_kube.close()
        if own_kube:
            await kube.close()


async def _follow(
    kube: Kube, settings: OperatorSettings, runtime: OperatorRuntime, elector: LeaderElector,
    stop: asyncio.Event, signals: asyncio.Event | None, coalesce: float,
) -> None:  # fmt: skip
    """Lead while holding the Lease; stop kopf at once when it is lost, then compete again."""
    runner = asyncio.create_task(elector.run())
    try:
        while not stop.is_set():
            await _first(elector.leading, stop)
            if stop.is_set():
                break
            await _term(
                kube, settings, runtime, [elector.not_leading, stop], signals=signals,
                coalesce=coalesce,
            )  # fmt: skip
    finally:
        await elector.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


def _ready(runtime: OperatorRuntime) -> ReadinessCheck:
    async def check() -> bool:
        if runtime.kopf_ready is not None:
            return runtime.kopf_ready.is_set()  # leading: kopf logged in and watches
        # A standby that reaches the Lease can take over: ready.
        return runtime.elector is not None and runtime.elector.healthy

    return check
