"""``gpufleet device-api serve``: the GpuService on a unix socket, plus health and metrics.

`serve` runs one server until its `stop` event is set, so tests run it on
their own loop and the CLI runs it under `run_server`, which sets `stop` on
SIGTERM or SIGINT. Security defaults: a unix socket of mode 0660, TCP only on
loopback unless remote access is asked for *and* TLS is configured, and 4 MiB
requests at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from gpufleet.core.errors import ConfigError
from gpufleet.core.http import HealthServer
from gpufleet.core.listen import add_grpc_port, prepare_socket, umask
from gpufleet.core.signals import stop_on_signals
from gpufleet.deviceapi.config import MAX_MESSAGE_BYTES, MAX_RESPONSE_BYTES, DeviceApiSettings
from gpufleet.deviceapi.metrics import DeviceApiMetrics
from gpufleet.deviceapi.service import SERVICE_NAME, GpuService
from gpufleet.deviceapi.store import GpuStore

__all__ = ["SOCKET_MODE", "ServerInfo", "new_store", "run_server", "serve"]

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
_SOCKET_SETTING = "--socket, DEVICE_API_SOCKET"
_LISTEN_SETTING = "--listen, DEVICE_API_LISTEN"


@dataclass(frozen=True)
class ServerInfo:
    """What a started server is bound to; passed to `serve`'s ``started`` callback."""

    socket_path: Path | None
    tcp_port: int | None
    metrics_port: int
    registry: CollectorRegistry = field(repr=False)


def _server_options(settings: DeviceApiSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ("grpc.max_concurrent_streams", settings.max_streams),
        # Two servers must never share a TCP port by accident.
        ("grpc.so_reuseport", 0),
    ]


def _bind(server: grpc.aio.Server, settings: DeviceApiSettings) -> tuple[Path | None, int | None]:
    socket_path = settings.device_api_socket
    if socket_path is not None:
        prepare_socket(
            socket_path, setting=_SOCKET_SETTING, named=f"DEVICE_API_SOCKET={socket_path}",
            owner="server", error=ConfigError,
        )  # fmt: skip
        with umask(0o117):
            add_grpc_port(server.add_insecure_port, f"unix:{socket_path}", setting=_SOCKET_SETTING)
        os.chmod(socket_path, SOCKET_MODE)
    tcp_port: int | None = None
    listen = settings.listen
    if listen is not None:
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
            )
            tcp_port = add_grpc_port(
                lambda target: server.add_secure_port(target, credentials),
                listen.target,
                setting=_LISTEN_SETTING,
            )
        else:
            tcp_port = add_grpc_port(
                server.add_insecure_port, listen.target, setting=_LISTEN_SETTING
            )
    return socket_path, tcp_port


def new_store(settings: DeviceApiSettings, *, state: bool = True) -> GpuStore:
    """The store ``settings`` describe (without its state file if ``state`` is false)."""
    return GpuStore(
        max_gpus=settings.max_gpus,
        history=settings.watch_history,
        history_bytes=settings.watch_history_bytes,
        watch_queue=settings.watch_queue,
        max_object_bytes=settings.max_object_bytes,
        max_store_bytes=settings.max_store_bytes,
        state_file=settings.state_file if state else None,
    )


async def serve(
    settings: DeviceApiSettings,
    *,
    stop: asyncio.Event,
    store: GpuStore | None = None,
    started: Callable[[ServerInfo], object] | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Serve the device API until `stop` is set, then shut down gracefully.

    A `store` passed in stays open for the caller; one made here from
    `settings` is closed on the way out. `started` is called once every
    listener is bound and serving. Raises ConfigError before binding anything
    when the listening policy refuses the configuration.
    """
    settings.check_listen_policy()
    own_store = store is None
    gpu_store = store if store is not None else new_store(settings)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = DeviceApiMetrics(registry, gpu_store)
    gate = _ReadinessGate(gpu_store, enabled=settings.readiness_gate)
    service = GpuService(
        gpu_store,
        metrics=metrics,
        bookmark_interval=settings.bookmark_interval,
        watch_linger=settings.watch_linger,
        max_watches=settings.max_streams,
        on_create=gate.notify,
    )
    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server(options=_server_options(settings))
    server.add_generic_rpc_handlers((service.handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    http = HealthServer(
        port=settings.metrics_port, registry=registry, setting="--metrics-port, METRICS_PORT"
    )
    http.add_readiness_check("gpu-registered", gate.check)
    socket_path: Path | None = None
    ready_task: asyncio.Task[None] | None = None
    try:
        socket_path, tcp_port = _bind(server, settings)
        await server.start()
        await http.start()
        ready_task = asyncio.create_task(gate.serve_when_ready(health_servicer))
        log.info(
            "device API serving",
            extra={
                "socket": str(socket_path) if socket_path else None,
                "tcp_port": tcp_port,
                "metrics_port": http.port,
                "readiness_gate": settings.readiness_gate,
            },
        )
        if started is not None:
            started(ServerInfo(socket_path, tcp_port, http.port, registry))
        await stop.wait()
        log.info("device API shutting down")
    finally:
        if ready_task is not None:
            ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready_task
        await health_servicer.enter_graceful_shutdown()
        service.close()
        await server.stop(settings.shutdown_grace)
        await http.stop()
        if own_store:
            gpu_store.close()
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()


class _ReadinessGate:
    """Ready once a provider has registered a GPU (or at once with the gate off); latches.

    A store loaded from a state file may hold GPUs already: those count.
    """

    def __init__(self, store: GpuStore, *, enabled: bool) -> None:
        self._store = store
        self._opened = asyncio.Event()
        if not enabled:
            self._opened.set()
        self.notify()

    def notify(self) -> None:
        """Called after each create: open the gate if a GPU is registered."""
        if not self._opened.is_set() and self._store.gpu_count > 0:
            self._opened.set()

    async def check(self) -> bool:
        """The /readyz check."""
        return self._opened.is_set()

    async def serve_when_ready(self, servicer: health.aio.HealthServicer) -> None:
        """Switch grpc.health.v1 to SERVING when the gate opens."""
        await self._opened.wait()
        for name in ("", SERVICE_NAME):
            await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("device API ready")


def run_server(settings: DeviceApiSettings) -> None:
    """Run `serve` in a fresh event loop until SIGTERM or SIGINT."""

    async def main() -> None:
        with stop_on_signals() as stop:
            await serve(settings, stop=stop, started=lambda _info: freeze_startup_objects())

    asyncio.run(main())


def freeze_startup_objects() -> None:
    """Keep what start-up allocated out of the cyclic garbage collector's scans.

    Once serving, the process holds ~80,000 GC-tracked objects that live as
    long as it does (modules, functions, grpc and protobuf descriptors, the
    store loaded from its state file). Every full collection walked them
    all, a 30-60 ms stop of the event loop, which was the whole tail of the
    update-to-watchers latency (docs/device-api.md, "Garbage collection").
    Frozen, they are still freed by reference counting if ever released; only
    the cycle detector skips them. Garbage is collected first, so none is frozen.
    Only the server process does this: `serve` itself leaves the caller's
    collector alone (tests run it in-process).
    """
    gc.collect()
    gc.freeze()
