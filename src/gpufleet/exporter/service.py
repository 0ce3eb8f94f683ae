"""``gpufleet exporter``: wire the GPU source, the pod maps, the loop and the HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from gpufleet.core.http import HealthServer
from gpufleet.core.signals import stop_on_signals
from gpufleet.exporter.collector import GpuCollector
from gpufleet.exporter.errors import ExporterError
from gpufleet.exporter.metrics import RenderOptions, SnapshotMetrics
from gpufleet.exporter.podmap.draindex import ResourceSliceIndex
from gpufleet.exporter.podmap.podresources import PodResourcesClient
from gpufleet.exporter.podmap.procfs import ProcFs, resolve_host_proc
from gpufleet.exporter.podmap.resolver import (
    DockerLabels,
    OwnerLookup,
    PodIndex,
    ProcessAttributor,
)
from gpufleet.exporter.settings import ExporterSettings
from gpufleet.gpu.select import SourceChoice, open_source
from gpufleet.gpu.source import GpuSource

if TYPE_CHECKING:
    from gpufleet.exporter.podmap.resourceslices import ResourceSliceWatch
    from gpufleet.kube.client import Kube
    from gpufleet.kube.watch import Informer

__all__ = ["Exporter", "run_exporter", "server_ssl_context"]

log = logging.getLogger(__name__)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def server_ssl_context(settings: ExporterSettings) -> ssl.SSLContext | None:
    """The HTTPS context the TLS settings ask for; None for plain HTTP."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        if settings.tls_client_ca_file is not None:
            context.load_verify_locations(settings.tls_client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ExporterError(f"TLS: cannot load certificate, key or client CA: {exc}") from exc
    return context


@dataclass
class Exporter:
    """A running exporter's parts, for tests and for `run_exporter`."""

    collector: GpuCollector
    metrics: SnapshotMetrics
    server: HealthServer
    pods: PodIndex | None
    informer: Informer | None
    slices: ResourceSliceWatch | None = None
    """This node's ResourceSlices (DRA device -> GPU UUID), with Kubernetes on."""


@contextlib.asynccontextmanager
async def exporter(
    settings: ExporterSettings,
    *,
    source: GpuSource,
    kube: Kube | None = None,
    registry: CollectorRegistry | None = None,
    podresources: bool = False,
    stop: asyncio.Event,
) -> AsyncIterator[Exporter]:
    """Start everything; the collection loop runs until ``stop`` is set or the context exits.

    With `kube`, processes are attributed through a pod informer of this node;
    with `podresources`, whole devices through the kubelet's PodResources API,
    and with both, devices allocated through DRA claims too, resolved to GPU
    UUIDs by an informer of this node's ResourceSlices.
    """
    registry = registry if registry is not None else REGISTRY
    procfs = ProcFs(resolve_host_proc(settings.host_proc))
    lookups: list[OwnerLookup] = []
    pods: PodIndex | None = None
    informer: Informer | None = None
    slices: ResourceSliceWatch | None = None
    if kube is not None:
        # Only with the API: the `k8s` extra is not needed to run without it.
        from gpufleet.exporter.podmap.resourceslices import (
            ResourceSliceWatch,
            resource_slice_listers,
        )
        from gpufleet.kube.watch import Informer

        pods = PodIndex(label_allowlist=settings.label_allowlist)
        informer = Informer(
            kube.core.list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={settings.node_name}",
        )
        informer.add_handlers(
            on_add=pods.on_add, on_update=pods.on_update, on_delete=pods.on_delete
        )
        lookups.append(pods.lookup)
        if podresources:
            # Only PodResources names DRA devices; without it nothing would ask.
            slices = ResourceSliceWatch(
                resource_slice_listers(kube.api_client),
                ResourceSliceIndex(),
                node_name=settings.node_name,
            )
    lookups.append(DockerLabels(settings.docker_root).lookup)
    kubelet = (
        PodResourcesClient(
            settings.podresources_socket,
            ttl=settings.podresources_ttl,
            dra=slices.index if slices is not None else None,
        )
        if podresources
        else None
    )
    collector = GpuCollector(
        source,
        hostname=settings.node_name,
        attributor=ProcessAttributor(
            procfs, lookups, generation=(lambda: pods.generation) if pods is not None else lambda: 0
        ),
        podresources=kubelet,
        rediscover_interval=settings.rediscover_interval,
        podresources_max_age=settings.podresources_max_age,
    )
    options = RenderOptions(
        process_labels=settings.process_labels,
        process_info=settings.process_info,
        max_series=settings.max_series,
    )
    metrics = SnapshotMetrics(collector.latest_snapshot, options)
    duration = Histogram(
        "gpufleet_exporter_collect_duration_seconds",
        "Time one collection took.",
        buckets=_DURATION_BUCKETS,
        registry=None,
    )
    registry.register(metrics)
    registry.register(duration)
    server = HealthServer(
        host=settings.bind_address,
        port=settings.port,
        registry=registry,
        ssl_context=server_ssl_context(settings),
        setting="--bind-address/--port, GPU_EXPORTER_BIND_ADDRESS/GPU_EXPORTER_PORT",
    )

    async def collected() -> bool:
        return collector.latest_snapshot() is not None

    server.add_readiness_check("collected", collected)
    if informer is not None:
        watched = informer

        async def synced() -> bool:
            # Not while relisting after the API server's versions went backwards.
            return watched.ready

        server.add_readiness_check("pods", synced)

    tasks: list[asyncio.Task[None]] = []
    try:
        if informer is not None:
            tasks.append(asyncio.create_task(informer.run()))
        if slices is not None:
            # Not a readiness check: without it the exporter still serves every
            # series, and a cluster without DRA (or without the RBAC rule) must
            # not keep the exporter unready.
            tasks.append(asyncio.create_task(slices.run()))
        tasks.append(
            asyncio.create_task(
                collector.run(
                    settings.interval, stop, on_collect=lambda s: duration.observe(s.duration_s)
                )
            )
        )
        await server.start()
        log.info(
            "GPU exporter serving",
            extra={
                "address": settings.bind_address,
                "port": server.port,
                "node": settings.node_name,
            },
        )
        yield Exporter(collector, metrics, server, pods, informer, slices)
    finally:
        stop.set()
        await server.stop()
        if informer is not None:
            await informer.stop()
        if slices is not None:
            await slices.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if kubelet is not None:
            await kubelet.close()
        registry.unregister(metrics)
        registry.unregister(duration)


async def run_exporter(
    settings: ExporterSettings,
    *,
    choice: SourceChoice | None = None,
    source: GpuSource | None = None,
    kube: Kube | None = None,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the exporter until ``stop`` is set (or SIGTERM/SIGINT).

    The GPUs are ``source`` when given, else the ``choice`` opened here, else
    ``settings.simulate`` or NVML.
    """
    if stop is None:
        with stop_on_signals() as stop:
            return await run_exporter(
                settings, choice=choice, source=source, kube=kube, registry=registry, stop=stop
            )
    own_source = source is None
    if source is None:
        if choice is None:
            choice = SourceChoice(simulate=settings.simulate, nvml=settings.simulate is None)
        source = await asyncio.to_thread(open_source, choice)
    in_cluster = settings.k8s_enabled()
    own_kube = kube is None and in_cluster
    # The kubelet socket is node-local: worth asking even without the API.
    podresources = in_cluster or settings.podresources_socket.exists()
    try:
        if own_kube:
            from gpufleet.kube.client import connect

            kube = await connect(settings)
        async with exporter(
            settings, source=source, kube=kube, registry=registry, podresources=podresources,
            stop=stop,
        ):  # fmt: skip
            await stop.wait()
    finally:
        if own_kube and kube is not None:
            await kube.close()
        if own_source:
            source.close()
