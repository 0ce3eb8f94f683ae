"""``gpufleet cache node``: one asyncio process, the agent and the CSI plugin sharing one state.

Start-up, in order:

1. read the GPUs once (in a worker thread: NVML is a C library);
2. sweep the store: the temporary directories of installers that were killed go;
3. rebuild the published volumes from the durable publication records whose target is still
   mounted from its store entry (``/proc/self/mountinfo``); the records of mounts that are gone
   are dropped. What is mounted is in use from the first moment, so GC never takes it;
4. serve the CSI socket (publish answers UNAVAILABLE until the informers have listed), the
   health server (``/readyz``: both informers synced and the CSI socket serving) and start the
   agent.

SIGTERM or SIGINT stops it; a mounted volume stays mounted (the kubelet unpublishes it later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry

from gpufleet.core.http import HealthServer
from gpufleet.core.retry import Backoff
from gpufleet.core.signals import stop_on_signals
from gpufleet.gpu.select import SourceChoice, open_source
from gpufleet.gpu.source import GpuSource
from gpufleet.kcache.cluster import CLUSTER_CACHE, NAMESPACED_CACHE, VolumeSource
from gpufleet.kcache.mounts import MountEntry, read_mountinfo
from gpufleet.kcache.node.agent import Agent, Collect
from gpufleet.kcache.node.gpus import read_gpus
from gpufleet.kcache.node.metrics import NodeCollector
from gpufleet.kcache.node.nodeobject import NodeLabels, NodeObjects
from gpufleet.kcache.node.pull import ClientFactory, Puller
from gpufleet.kcache.node.settings import NodeSettings
from gpufleet.kcache.node.state import NodeState, Use
from gpufleet.kcache.node.volumes import NodeVolumes
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.publications import PUBLICATIONS, PublicationLog
from gpufleet.kcache.store import CacheStore, StoredCache

if TYPE_CHECKING:
    from gpufleet.kube.client import Kube

__all__ = [
    "CsiServer", "NodeParts", "NodeProcess", "node_agent", "node_process", "rebuild_uses",
    "run_node",
]  # fmt: skip

log = logging.getLogger(__name__)


class CsiServer(Protocol):
    """The CSI gRPC server on its unix socket."""

    async def start(self) -> None:
        """Listen on the socket."""
        ...

    async def stop(self) -> None:
        """Stop serving and remove the socket."""
        ...


CsiFactory = Callable[[VolumeSource, PublicationLog, Callable[[], bool]], CsiServer]
"""Builds the CSI server for a volume source, the records and the Probe readiness."""


def rebuild_uses(
    state: NodeState,
    publications: PublicationLog,
    mountinfo: Callable[[], Sequence[MountEntry]] = read_mountinfo,
) -> list[Use]:
    """Put every live publication into `state` as a use; drop the records of dead mounts."""
    entries = mountinfo()
    live = publications.live(entries)
    alive = {p.volume_id for p in live}
    for record in publications.all():
        if record.volume_id not in alive:
            log.info("dropping the record of a volume no longer mounted", extra={
                "volume_id": record.volume_id, "target": str(record.target_path),
            })  # fmt: skip
            publications.remove(record.volume_id)
    uses = [Use(p.volume_id, p.cache, p.digest, p.mount_root, p.pod) for p in live]
    for use in uses:
        state.add_use(use)
    return uses


def registry_clients(settings: NodeSettings) -> ClientFactory:
    """One registry client per pull, with the settings' credentials, deadline and scheme."""
    password = settings.registry_password

    def client(registry: str) -> RegistryClient:
        return RegistryClient(
            registry,
            plain_http=True if settings.kcache_plain_http else None,
            username=settings.registry_username,
            password=None if password is None else password.get_secret_value(),
            deadline=settings.kcache_deadline,
        )

    return client


def _collect_garbage(
    store: CacheStore, *, wanted: set[str], in_use: set[tuple[str, str]], max_bytes: int | None
) -> list[StoredCache]:
    from gpufleet.kcache.gc import collect_garbage

    result = collect_garbage(store, wanted=wanted, in_use=in_use, max_bytes=max_bytes)
    return list(result.removed)


def default_csi_server(settings: NodeSettings) -> CsiFactory:
    """The CSI server of `kcache.csi.server` on the settings' endpoint."""

    def build(
        source: VolumeSource, publications: PublicationLog, ready: Callable[[], bool]
    ) -> CsiServer:
        from gpufleet.kcache.csi.node import NodeServicer
        from gpufleet.kcache.csi.server import CsiServer as Server

        node = NodeServicer(
            source, kubelet_dir=settings.kubelet_dir, node_id=settings.node_name,
            publications=publications,
        )  # fmt: skip
        return Server(settings.csi_endpoint, node=node, ready=ready)

    return build


@dataclass
class NodeParts:
    """The node process without its servers: the state, the agent, the volume source."""

    state: NodeState
    agent: Agent
    volumes: NodeVolumes
    store: CacheStore
    publications: PublicationLog
    uses: list[Use]
    """The volumes found mounted at start."""


@dataclass
class NodeProcess:
    """A running node process's parts, for tests."""

    parts: NodeParts
    health: HealthServer
    csi: CsiServer


@contextlib.asynccontextmanager
async def node_agent(
    settings: NodeSettings,
    *,
    source: GpuSource,
    kube: Kube,
    clients: ClientFactory | None = None,
    mountinfo: Callable[[], Sequence[MountEntry]] = read_mountinfo,
    collect: Collect | None = None,
    backoff: Backoff | None = None,
    durable: bool = True,
) -> AsyncIterator[NodeParts]:
    """Read the GPUs, sweep the store, rebuild the mounts, run the agent until the block ends."""
    from gpufleet.kcache.node.kubeapi import NodeApi
    from gpufleet.kube.watch import Informer

    gpus = await asyncio.to_thread(read_gpus, source)
    store = CacheStore(settings.kcache_store, durable=durable)
    swept = await asyncio.to_thread(store.sweep)
    if swept:
        log.info("swept the leftovers of killed installs", extra={"removed": len(swept)})
    state = NodeState()
    publications = PublicationLog(settings.kcache_store / PUBLICATIONS)
    uses = await asyncio.to_thread(rebuild_uses, state, publications, mountinfo)
    api = NodeApi(kube)
    listers = {r.kind: api.lister(r) for r in (NAMESPACED_CACHE, CLUSTER_CACHE)}
    retry_max = settings.kcache_retry_max
    puller = Puller(
        store, gpus, clients or registry_clients(settings), node_name=settings.node_name,
        max_bytes=settings.kcache_max_bytes, max_config_bytes=settings.kcache_max_config_bytes,
    )  # fmt: skip
    agent = Agent(
        state, puller, gpus=gpus, node_name=settings.node_name,
        informers=lambda kind: Informer(listers[kind]),
        objects=NodeObjects(api, settings.node_name),
        labels=NodeLabels(api, settings.node_name),
        collect=collect or _collect_garbage, max_bytes=settings.kcache_store_max_bytes,
        gc_interval=settings.kcache_gc_interval,
        backoff=backoff or Backoff(initial=min(1.0, retry_max), cap=retry_max),
    )  # fmt: skip
    volumes = NodeVolumes(
        state, store=store, read_pod=api.read_pod, review=api.access_review,
        on_unpublished=agent.collect_soon, want=agent.want,
    )  # fmt: skip
    task = asyncio.create_task(agent.run(), name="kcache node agent")
    try:
        yield NodeParts(state, agent, volumes, store, publications, uses)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def node_process(
    settings: NodeSettings,
    *,
    source: GpuSource,
    kube: Kube,
    registry: CollectorRegistry | None = None,
    csi: CsiFactory | None = None,
    **kwargs: Any,
) -> AsyncIterator[NodeProcess]:
    """The agent (`node_agent`, which takes `kwargs`), the CSI server and the health server."""
    registry = registry if registry is not None else REGISTRY
    async with node_agent(settings, source=source, kube=kube, **kwargs) as parts:
        agent = parts.agent
        serving = asyncio.Event()
        server = (csi or default_csi_server(settings))(
            parts.volumes, parts.publications, lambda: agent.synced
        )
        health = HealthServer(
            port=settings.metrics_port, registry=registry, setting="--metrics-port, METRICS_PORT"
        )

        async def caches_synced() -> bool:
            return agent.synced

        async def csi_serving() -> bool:
            return serving.is_set()

        health.add_readiness_check("caches", caches_synced)
        health.add_readiness_check("csi", csi_serving)
        collector = NodeCollector(agent, parts.volumes)
        registry.register(collector)
        try:
            await server.start()
            serving.set()
            await health.start()
            log.info("kernel cache node serving", extra={
                "node": settings.node_name, "csi_endpoint": settings.csi_endpoint,
                "store": str(settings.kcache_store), "gpus": len(agent.gpus.devices),
                "mounted": len(parts.uses), "metrics_port": health.port,
            })  # fmt: skip
            yield NodeProcess(parts, health, server)
        finally:
            await health.stop()
            serving.clear()
            await server.stop()
            registry.unregister(collector)


async def run_node(
    settings: NodeSettings,
    *,
    choice: SourceChoice,
    kube: Kube | None = None,
    stop: asyncio.Event | None = None,
    **kwargs: Any,
) -> None:
    """Run the node process until `stop` is set, or SIGTERM/SIGINT."""
    if stop is None:
        with stop_on_signals() as stop:
            return await run_node(settings, choice=choice, kube=kube, stop=stop, **kwargs)
    source = await asyncio.to_thread(open_source, choice)
    own_kube = kube is None
    try:
        if kube is None:
            from gpufleet.kube.client import connect

            kube = await connect(settings)
        async with node_process(settings, source=source, kube=kube, **kwargs):
            await stop.wait()
    finally:
        if own_kube and kube is not None:
            await kube.close()
        source.close()
