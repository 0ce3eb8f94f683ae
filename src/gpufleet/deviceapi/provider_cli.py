"""``gpufleet device-api provider``: run the NVML health provider against a device API server.

The server's CLI registers this command with ``register(app)``. Configuration
comes from the environment (``DEVICE_API_SOCKET``, ``NODE_NAME``,
``HEALTH_INTERVAL``, ``XID_OVERRIDES``, ``SIMULATE``, ``METRICS_PORT``) with
flags on top; an invalid value stops start-up with one line naming it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import Field, field_validator

from gpufleet.core.config import CommonSettings, Duration, load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.core.http import HealthServer
from gpufleet.core.signals import stop_on_signals
from gpufleet.deviceapi.provider import GpuProvider
from gpufleet.deviceapi.registration import GpuApi
from gpufleet.gpu.select import SourceChoice, open_source
from gpufleet.gpu.source import GpuSource
from gpufleet.gpu.xid import DEFAULT_CATALOGUE, XidCatalogue, XidOverride, parse_overrides

__all__ = ["CLIENT_OPTIONS", "ProviderSettings", "provider", "register", "run_provider"]

_log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/gpufleet/device.sock"

CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    # gRPC's own reconnect backoff grows to 120 s by default; a provider must
    # notice a restarted server within its own (shorter) backoff instead.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


class ProviderSettings(CommonSettings):
    """``gpufleet device-api provider``: where the server is, which GPUs, how often to check."""

    device_api_socket: str = Field(default=DEFAULT_SOCKET, min_length=1)
    """A socket path, ``unix:///path`` or ``host:port`` (loopback)."""
    node_name: str = Field(default_factory=socket.gethostname, min_length=1)
    health_interval: Duration = Field(default=30.0, gt=0)
    xid_overrides: str = ""
    """``48=critical:reset-gpu,13=warning`` or a YAML file path (see ``gpufleet.gpu.xid``)."""
    simulate: str | None = None
    """A simulator preset instead of real NVML (tests, demos)."""
    metrics_port: int = Field(default=8082, ge=0, le=65535)

    @field_validator("xid_overrides")
    @classmethod
    def _check_overrides(cls, value: str) -> str:
        parse_overrides(value)  # ValueError -> "invalid XID_OVERRIDES=...: <why>"
        return value.strip()

    @property
    def overrides(self) -> list[XidOverride]:
        """The parsed ``XID_OVERRIDES``."""
        return parse_overrides(self.xid_overrides)

    def catalogue(self) -> XidCatalogue:
        """The built-in XID catalogue with the configured overrides applied."""
        return DEFAULT_CATALOGUE.with_overrides(self.overrides)


async def run_provider(
    settings: ProviderSettings,
    source: GpuSource,
    *,
    stop: asyncio.Event,
    client: GpuApi | None = None,
    started: Callable[[GpuProvider, HealthServer], object] | None = None,
) -> None:
    """Run a provider over ``source`` until ``stop`` is set, with /healthz, /readyz, /metrics.

    ``client`` defaults to a ``DeviceApiClient`` on ``settings.device_api_socket``
    (closed on the way out); ``source`` is always closed on the way out.
    """
    from gpufleet.deviceapi.client import DeviceApiClient

    own_client: DeviceApiClient | None = None
    if client is None:
        own_client = DeviceApiClient(settings.device_api_socket, options=CLIENT_OPTIONS)
        client = own_client
    api: GpuApi = client
    provider = GpuProvider(
        api,
        source,
        node=settings.node_name,
        catalogue=settings.catalogue(),
        health_interval=settings.health_interval,
    )
    http = HealthServer(port=settings.metrics_port, setting="--metrics-port, METRICS_PORT")

    async def registered() -> bool:
        return provider.ready

    http.add_readiness_check("gpus-registered", registered)
    try:
        await http.start()
        if started is not None:
            started(provider, http)
        await provider.run(stop)
    finally:
        await http.stop()
        if own_client is not None:
            await own_client.close()
        await asyncio.to_thread(source.close)


def _choose_source(
    settings: ProviderSettings, fleet: Path | None, nvml: bool, seed: int | None
) -> GpuSource:
    chosen = [
        flag
        for flag, on in (
            ("--simulate", settings.simulate is not None),
            ("--fleet", fleet is not None),
            ("--nvml", nvml),
        )
        if on
    ]
    if len(chosen) != 1:
        got = ", ".join(chosen) if chosen else "none"
        raise ConfigError(
            f"choose exactly one GPU source: --nvml, --simulate PRESET (SIMULATE) or --fleet FILE"
            f" (got {got})"
        )
    return open_source(
        SourceChoice(simulate=settings.simulate, fleet_file=fleet, nvml=nvml, seed=seed)
    )


def provider(
    socket_path: Annotated[
        str | None,
        typer.Option(
            "--socket",
            help=f"Device API socket or address (env DEVICE_API_SOCKET, default {DEFAULT_SOCKET}).",
        ),
    ] = None,
    node_name: Annotated[
        str | None,
        typer.Option(
            "--node-name", help="Node the GPUs belong to (env NODE_NAME, default hostname)."
        ),
    ] = None,
    health_interval: Annotated[
        str | None,
        typer.Option(
            "--health-interval", help="Health check period, e.g. 30s (env HEALTH_INTERVAL)."
        ),
    ] = None,
    xid_overrides: Annotated[
        str | None,
        typer.Option(
            "--xid-overrides",
            help="XID policy overrides, e.g. 48=critical:reset-gpu,13=warning, "
            "or a YAML file (env XID_OVERRIDES).",
        ),
    ] = None,
    simulate: Annotated[
        str | None,
        typer.Option(
            "--simulate",
            metavar="PRESET",
            help="Simulated GPUs: dgx-h100, dgx-a100, gb200, l4, mig-a100 (env SIMULATE).",
        ),
    ] = None,
    fleet: Annotated[
        Path | None,
        typer.Option("--fleet", metavar="FILE", help="Simulated GPUs from a YAML fleet file."),
    ] = None,
    nvml: Annotated[bool, typer.Option("--nvml", help="Read the real GPUs through NVML.")] = False,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="With --simulate: seed of the simulated GPU identities."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="/metrics, /healthz, /readyz port (env METRICS_PORT, default 8082).",
        ),
    ] = None,
) -> None:
    """Register this node's GPUs with the device API and keep their Healthy condition current."""
    settings = load_settings(
        ProviderSettings,
        device_api_socket=socket_path,
        node_name=node_name,
        health_interval=health_interval,
        xid_overrides=xid_overrides,
        simulate=simulate,
        metrics_port=metrics_port,
    )
    source = _choose_source(settings, fleet, nvml, seed)

    async def main() -> None:
        with stop_on_signals() as stop:
            await run_provider(settings, source, stop=stop)

    asyncio.run(main())


def register(app: typer.Typer) -> None:
    """Add the ``provider`` command to ``app`` (the ``device-api`` group)."""
    app.command("provider")(provider)
