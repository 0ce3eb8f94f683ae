"""The long-running inventory commands: controller, check mode and node agent.

Each wires the same parts: exporters behind spooled pipelines running in the
background, the health server (/metrics, /healthz, /readyz), and a clean stop
on SIGTERM (stop working, flush what the exporters will take, leave the rest
in the spool). The controller and check mode add the pod informers, the work
loop and, optionally, leader election.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from gpufleet.core.http import HealthServer
from gpufleet.core.retry import Backoff
from gpufleet.core.signals import stop_on_signals
from gpufleet.gpu.select import SourceChoice, open_source
from gpufleet.inventory.check import CheckProcessor
from gpufleet.inventory.config import (
    AgentSettings,
    CheckSettings,
    ControllerSettings,
    ExportSettings,
    PodWatchSettings,
)
from gpufleet.inventory.controller import SmiProcessor
from gpufleet.inventory.delivery import Delivery, DeliveryPipeline
from gpufleet.inventory.local import resolve_machine_id, scan_once
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.podwork import ControllerMetrics, PodProcessor, PodWorkLoop
from gpufleet.inventory.wiring import add_readiness_checks, close_deliveries, open_delivery
from gpufleet.kube.client import Kube, connect
from gpufleet.kube.identity import machine_id
from gpufleet.kube.lease import LeaderElector
from gpufleet.kube.watch import Informer

log = logging.getLogger(__name__)

# How long a stopping process gives its exporters to take what is spooled.
STOP_GRACE_S = 10.0


@dataclass
class Runtime:
    """What a long-running command holds; built and torn down by ``runtime()``."""

    settings: ExportSettings
    registry: CollectorRegistry
    deliveries: list[Delivery] = field(default_factory=list)
    senders: list[asyncio.Task[None]] = field(default_factory=list)
    server: HealthServer | None = None


@contextlib.asynccontextmanager
async def runtime(
    settings: ExportSettings, *, server_port: int, registry: CollectorRegistry | None
) -> AsyncIterator[Runtime]:
    """Open the exporters, start their senders and the health server; undo it all after."""
    rt = Runtime(settings, REGISTRY if registry is None else registry)
    export_metrics = ExportMetrics(rt.registry)
    try:
        for kind in settings.exporter_type:
            rt.deliveries.append(open_delivery(kind, settings, export_metrics))
        rt.senders = [
            asyncio.create_task(d.run()) for d in rt.deliveries if isinstance(d, DeliveryPipeline)
        ]
        rt.server = HealthServer(
            port=server_port, registry=rt.registry, setting="--server-port, SERVER_PORT"
        )
        add_readiness_checks(rt.server, rt.deliveries)
        yield rt
    finally:
        if rt.server is not None:
            await rt.server.stop()
        for delivery in rt.deliveries:
            delivery.stop()
        if rt.senders:
            # A last flush; whatever the exporters do not take stays in the spool.
            _, late = await asyncio.wait(rt.senders, timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*rt.senders, return_exceptions=True)
        await close_deliveries(rt.deliveries)


# --- controller and check mode ------------------------------------------------------


ProcessorFactory = Callable[[Any, Sequence[Delivery], ControllerMetrics], PodProcessor]


async def run_pod_watch(
    settings: PodWatchSettings,
    make_processor: ProcessorFactory,
    *,
    kube: Kube | None = None,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[PodWorkLoop, HealthServer], None] | None = None,
) -> None:
    """Watch the matching pods and process each ready one until ``stop`` is set.

    Without ``stop``, SIGTERM or SIGINT stops it.

    ``started`` is called once everything runs (tests use it to reach the work
    loop and the health server's port).
    """
    if stop is None:
        with stop_on_signals() as stop:
            return await run_pod_watch(
                settings, make_processor, kube=kube, registry=registry, stop=stop,
                started=started,
            )  # fmt: skip
    own_kube = kube is None
    if kube is None:
        kube = await connect(settings)
    try:
        async with runtime(settings, server_port=settings.server_port, registry=registry) as rt:
            metrics = ControllerMetrics(rt.registry)
            pods = Informer(
                kube.core.list_namespaced_pod,
                namespace=settings.namespace,
                label_selector=settings.label_selector or None,
                backoff=Backoff(initial=0.5, factor=2.0, cap=30.0),
            )
            nodes = Informer(kube.core.list_node, backoff=Backoff(initial=0.5, cap=30.0))
            work = PodWorkLoop(
                pods=pods,
                nodes=nodes,
                processor=make_processor(kube, rt.deliveries, metrics),
                metrics=metrics,
                workers=settings.workers,
                max_retries=settings.max_retries,
                backoff=settings.pod_backoff,
                resync=settings.resync,
            )
            pods.add_handlers(
                on_add=work.on_pod_add, on_update=work.on_pod_update, on_delete=work.on_pod_delete
            )
            assert rt.server is not None
            rt.server.add_readiness_check("informers", _synced(pods, nodes))
            tasks = [asyncio.create_task(pods.run()), asyncio.create_task(nodes.run())]
            elector: LeaderElector | None = None
            lease_kube: Kube | None = None
            if settings.leader_election:
                # Its own client and limiter: renewals must not queue behind execs.
                lease_kube = kube.for_leader_election()
                elector = LeaderElector.from_settings(lease_kube, settings)
                rt.server.add_readiness_check("leader-election", _elector_ok(elector))
                tasks.append(asyncio.create_task(_follow_leadership(elector, work, pods, nodes)))
            else:
                tasks.append(asyncio.create_task(_lead_when_synced(work, pods, nodes)))
            await rt.server.start()
            log.info(
                "watching pods",
                extra={"namespace": settings.namespace, "selector": settings.label_selector,
                       "leader_election": settings.leader_election, "port": rt.server.port},
            )  # fmt: skip
            if started is not None:
                started(work, rt.server)
            try:
                await _until(stop, tasks)
            finally:
                await work.close()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if elector is not None:
                    await elector.release()
                if lease_kube is not None:
                    await lease_kube.close()
    finally:
        if own_kube:
            await kube.close()


async def _until(stop: asyncio.Event, tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Wait for ``stop``; a background task that dies is a fatal error, not a silent one."""
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _synced(*informers: Informer) -> Callable[[], Any]:
    async def check() -> bool:
        # `ready`: synced, and not relisting after the versions went backwards.
        return all(i.ready for i in informers)

    return check


def _elector_ok(elector: LeaderElector) -> Callable[[], Any]:
    async def check() -> bool:
        # The leader, or a standby that reaches the lease: either can take over.
        return bool(elector.healthy)

    return check


async def _lead_when_synced(work: PodWorkLoop, *informers: Informer) -> None:
    for informer in informers:
        await informer.synced.wait()
    await work.start_leading()
    await asyncio.Event().wait()


async def _follow_leadership(
    elector: LeaderElector, work: PodWorkLoop, *informers: Informer
) -> None:
    """Work while leading; stop at once when the lease is lost."""
    for informer in informers:
        await informer.synced.wait()
    runner = asyncio.create_task(elector.run())
    try:
        while True:
            await elector.leading.wait()
            await work.start_leading()
            await elector.not_leading.wait()
            await work.stop_leading()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def controller_processor(settings: ControllerSettings) -> ProcessorFactory:
    """The inventory controller: nvidia-smi in each device-plugin pod."""

    def make(kube: Any, deliveries: Sequence[Delivery], metrics: ControllerMetrics) -> PodProcessor:
        return SmiProcessor(
            kube, cluster=settings.cluster_name, container=settings.container,
            command=settings.smi_argv, timeout=settings.timeout, deliveries=deliveries,
            metrics=metrics, node_labels=settings.node_labels,
        )  # fmt: skip

    return make


def check_processor(settings: CheckSettings) -> ProcessorFactory:
    """Check mode: COMMAND in each pod, FORCE_RESTART on failure."""

    def make(kube: Any, deliveries: Sequence[Delivery], metrics: ControllerMetrics) -> PodProcessor:
        return CheckProcessor(
            kube, container=settings.container, command=settings.command,
            timeout=settings.timeout, force_restart=settings.force_restart, metrics=metrics,
        )  # fmt: skip

    return make


# --- node agent -----------------------------------------------------------------------


async def run_agent(
    settings: AgentSettings,
    *,
    kube: Kube | None = None,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Scan this node's GPUs at start and every SCAN_INTERVAL until ``stop`` (or a signal)."""
    if stop is None:
        with stop_on_signals() as stop:
            return await run_agent(settings, kube=kube, registry=registry, stop=stop, clock=clock)
    own_kube = kube is None
    choice = SourceChoice(simulate=settings.simulate, nvml=settings.simulate is None)
    choice.validate()
    try:
        if kube is None:
            kube = await connect(settings)
        async with runtime(settings, server_port=settings.server_port, registry=registry) as rt:
            assert rt.server is not None
            await rt.server.start()
            from_node: str | None = None
            while not stop.is_set():
                from_node = from_node or await _node_machine(kube, settings.node_name)
                machine = from_node or resolve_machine_id(None, settings.dmi_dir)
                source = await asyncio.to_thread(open_source, choice)
                try:
                    await scan_once(
                        source, rt.deliveries, cluster=settings.cluster_name,
                        node=settings.node_name, machine=machine, source_label=choice.label,
                        delivery_timeout=None, clock=clock,
                    )  # fmt: skip
                except Exception:  # one failed scan must not end the agent
                    log.exception("scan failed", extra={"node": settings.node_name})
                finally:
                    source.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), settings.scan_interval)
    finally:
        if own_kube and kube is not None:
            await kube.close()


async def _node_machine(kube: Kube, node_name: str) -> str | None:
    """The machine from this Node's providerID; ``None`` (logged) if the API can't say."""
    try:
        response = await kube.core.read_node(node_name, _preload_content=False)
        return machine_id(await response.json())
    except Exception as exc:
        log.warning(
            "cannot identify the machine from the Node; using DMI until the API answers",
            extra={"node": node_name, "error": str(exc)},
        )
        return None
