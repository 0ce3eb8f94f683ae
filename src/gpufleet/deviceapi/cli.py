"""``gpufleet device-api serve`` and ``gpufleet gpus list|get|watch``.

The server command reads `DeviceApiSettings` from the environment with flags
on top; the ``gpus`` commands are a thin client for people: a table by
default, Kubernetes-style JSON (camelCase) with ``--json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console, RenderableType

from gpufleet.core.config import load_settings
from gpufleet.core.console import Column, fitted_table, stdout_console
from gpufleet.deviceapi.config import DeviceApiClientSettings, DeviceApiSettings
from gpufleet.deviceapi.v1alpha1 import gpu_pb2

__all__ = ["app", "gpus_app"]

app = typer.Typer(help="The node-local GPU device API server (gRPC over a unix socket).")
gpus_app = typer.Typer(help="Read GPUs from the device API: list, get, watch.")


@app.command()
def serve(
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            metavar="PATH",
            help="Unix socket [env DEVICE_API_SOCKET; default /var/run/gpufleet/device.sock].",
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            metavar="HOST:PORT",
            help="Also listen on TCP; loopback only unless --allow-remote with TLS "
            "[env DEVICE_API_LISTEN].",
        ),
    ] = None,
    allow_remote: Annotated[
        bool | None,
        typer.Option(
            "--allow-remote/--no-allow-remote",
            help="Permit a non-loopback --listen (needs TLS) [env ALLOW_REMOTE].",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", metavar="PATH", help="PEM certificate [TLS_CERT].")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", metavar="PATH", help="PEM private key [TLS_KEY].")
    ] = None,
    state_file: Annotated[
        Path | None,
        typer.Option(
            "--state-file",
            metavar="PATH",
            help="Keep GPUs and the resourceVersion in this SQLite file [env STATE_FILE].",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Port of /metrics, /healthz, /readyz [env METRICS_PORT; default 8081].",
        ),
    ] = None,
    readiness_gate: Annotated[
        bool | None,
        typer.Option(
            "--readiness-gate/--no-readiness-gate",
            help="Not ready until a GPU is registered [env READINESS_GATE; default on].",
        ),
    ] = None,
) -> None:
    """Serve the device API until SIGTERM."""
    from gpufleet.deviceapi.server import run_server

    settings = load_settings(
        DeviceApiSettings, device_api_socket=socket, device_api_listen=listen,
        allow_remote=allow_remote, tls_cert=tls_cert, tls_key=tls_key, state_file=state_file,
        metrics_port=metrics_port, readiness_gate=readiness_gate,
    )  # fmt: skip
    run_server(settings)


def _register_provider() -> None:
    # The provider is its own command module; it joins this group when present.
    try:
        from gpufleet.deviceapi.provider_cli import register
    except ImportError:  # pragma: no cover - the provider ships with the server
        return
    register(app)


_register_provider()


SocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        metavar="PATH",
        help="Device API socket [env DEVICE_API_SOCKET; default /var/run/gpufleet/device.sock].",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SELECTOR_EXAMPLE = "gpufleet.io/node=node-a,!drained"
"""The help's example: a label the provider really puts on GPUs (``deviceapi.naming``)."""
SelectorOpt = Annotated[
    str, typer.Option("--selector", "-l", help=f"Label selector, e.g. '{SELECTOR_EXAMPLE}'.")
]


def _target(socket: Path | None) -> str:
    settings = load_settings(DeviceApiClientSettings, device_api_socket=socket)
    return str(settings.device_api_socket)


def _as_dict(gpu: gpu_pb2.Gpu) -> dict[str, object]:
    body: dict[str, object] = MessageToDict(gpu)
    return body


def _condition(gpu: gpu_pb2.Gpu, kind: str) -> str:
    for cond in gpu.status.conditions:
        if cond.type == kind:
            return cond.status if not cond.reason else f"{cond.status} ({cond.reason})"
    return "-"


# The name, UUID and node identify a GPU and stay whole; on a narrow terminal
# the resourceVersion, product, index and action are left out, in that order.
_GPU_COLUMNS = [
    Column("name", key=True),
    Column("index", drop=2),
    Column("uuid", key=True),
    Column("product", drop=3),
    Column("node", key=True),
    Column("healthy"),
    Column("action", drop=1),
    Column("rv", drop=4),
]
_CONDITION_COLUMNS = [
    Column("type", key=True),
    Column("status"),
    Column("reason"),
    Column("message"),
    Column("last transition", key=True),
]


def _table(console: Console, gpus: list[gpu_pb2.Gpu], title: str) -> RenderableType:
    rows = [
        [
            gpu.metadata.name,
            str(gpu.spec.index),
            gpu.spec.uuid,
            gpu.spec.product,
            gpu.spec.node,
            _condition(gpu, "Healthy"),
            gpu.status.recommended_action or "-",
            gpu.metadata.resource_version,
        ]
        for gpu in gpus
    ]
    return fitted_table(console, title, _GPU_COLUMNS, rows)


@gpus_app.command("list")
def list_gpus(
    socket: SocketOpt = None, selector: SelectorOpt = "", as_json: JsonOpt = False
) -> None:
    """List the GPUs the device API knows."""
    listed = asyncio.run(_list(_target(socket), selector))
    if as_json:
        body = {
            "resourceVersion": listed.resource_version,
            "items": [_as_dict(g) for g in listed.items],
        }
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
        return
    title = f"{len(listed.items)} GPU(s) at resourceVersion {listed.resource_version}"
    console = stdout_console()
    console.print(_table(console, list(listed.items), title))


async def _list(target: str, selector: str) -> gpu_pb2.GpuList:
    from gpufleet.deviceapi.client import DeviceApiClient

    async with DeviceApiClient(target) as client:
        return await client.list(selector)


@gpus_app.command("get")
def get_gpu(
    name: Annotated[str, typer.Argument(help="The GPU's name.")],
    socket: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one GPU (JSON with --json, else a table and its conditions)."""
    gpu = asyncio.run(_get(_target(socket), name))
    if as_json:
        sys.stdout.write(json.dumps(_as_dict(gpu), indent=2) + "\n")
        return
    console = stdout_console()
    console.print(_table(console, [gpu], gpu.metadata.name))
    rows = [
        [
            cond.type,
            cond.status,
            cond.reason,
            cond.message,
            cond.last_transition_time.ToJsonString()
            if cond.HasField("last_transition_time")
            else "-",
        ]
        for cond in gpu.status.conditions
    ]
    console.print(fitted_table(console, "conditions", _CONDITION_COLUMNS, rows))


async def _get(target: str, name: str) -> gpu_pb2.Gpu:
    from gpufleet.deviceapi.client import DeviceApiClient

    async with DeviceApiClient(target) as client:
        return await client.get(name)


@gpus_app.command("watch")
def watch_gpus(
    socket: SocketOpt = None, selector: SelectorOpt = "", as_json: JsonOpt = False
) -> None:
    """Print every GPU (ADDED), then each change as it happens, until Ctrl-C.

    It outlives a server restart: it reconnects, resumes and prints only what
    really changed meanwhile, and says so on stderr.
    """
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch(_target(socket), selector, as_json))


def _event_line(kind: str, gpu: gpu_pb2.Gpu, as_json: bool) -> str:
    """One event as `gpus watch` prints it."""
    if as_json:
        return json.dumps({"type": kind, "object": _as_dict(gpu)})
    return (
        f"{kind:<8} {gpu.metadata.name} rv={gpu.metadata.resource_version} "
        f"healthy={_condition(gpu, 'Healthy')!r} "
        f"action={gpu.status.recommended_action or '-'}"
    )


async def _watch(target: str, selector: str, as_json: bool) -> None:
    """Print the informer's changes until SIGTERM, Ctrl-C or a closed stdout.

    The informer lists, then watches; across a server restart it reconnects
    and relists, telling its handlers only what differs from its cache, so no
    event is printed twice. It logs the outage and the reconnection.
    """
    from gpufleet.deviceapi.client import DeviceApiClient
    from gpufleet.deviceapi.informer import GpuInformer

    # gRPC's own reconnect backoff grows to 120s; cap it near the informer's, so
    # that a long outage is not followed by a long wait once the server is back.
    options = [("grpc.max_reconnect_backoff_ms", 5000)]
    async with DeviceApiClient(target, options=options) as client:
        # A wrong socket or selector fails here, at once, as it always did; only
        # a server lost while watching is waited for.
        await client.list(selector)
        informer = GpuInformer(client, label_selector=selector)

        def emit(kind: str, gpu: gpu_pb2.Gpu) -> None:
            try:
                sys.stdout.write(_event_line(kind, gpu, as_json) + "\n")
                sys.stdout.flush()
            except BrokenPipeError:
                # The reader went away (`gpus watch | head`): stop, quietly; what
                # is still buffered goes nowhere instead of failing again at exit.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                informer.stop()

        informer.on_add(lambda gpu: emit("ADDED", gpu))
        informer.on_update(lambda _old, new: emit("MODIFIED", new))
        informer.on_delete(lambda gpu: emit("DELETED", gpu))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, informer.stop)
        try:
            await informer.run()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
