"""Shared set-up of the device API integration tests: a real server on a unix socket.

`running_server` starts `serve(...)` on the test's own event loop, bound to a
socket in a fresh short temp dir (unix socket paths are limited to ~107 bytes,
which pytest's tmp_path can exceed), and stops it gracefully afterwards.

`start_server` and `start_provider` are the NVML provider tests' set-up: a
server as the daemon runs it (the stop event is SIGTERM), and a ``GpuProvider``
over ``NvmlSource(SimulatedNvml)`` with a short health interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpufleet.core.config import load_settings
from gpufleet.core.retry import Backoff
from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.config import DeviceApiSettings
from gpufleet.deviceapi.naming import gpu_name
from gpufleet.deviceapi.provider import GpuProvider
from gpufleet.deviceapi.provider_cli import CLIENT_OPTIONS
from gpufleet.deviceapi.server import ServerInfo, new_store, serve
from gpufleet.deviceapi.store import GpuStore
from gpufleet.deviceapi.v1alpha1 import gpu_pb2
from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.sim import SimulatedNvml
from gpufleet.gpu.source import GpuSource
from tests import polling

__all__ = [
    "DEADLINE",
    "INTERVAL",
    "Running",
    "RunningProvider",
    "Server",
    "make_gpu",
    "running_server",
    "short_tmp",
    "start_provider",
    "start_server",
    "with_condition",
]


@dataclass
class Running:
    """A started server: its store, socket and bound ports."""

    info: ServerInfo
    store: GpuStore
    socket: Path
    settings: DeviceApiSettings

    def client(self) -> DeviceApiClient:
        """A new client of this server (close it, or use ``async with``)."""
        return DeviceApiClient(self.socket)

    @property
    def metrics_url(self) -> str:
        """Base URL of /metrics, /healthz and /readyz."""
        return f"http://127.0.0.1:{self.info.metrics_port}"


@contextlib.contextmanager
def short_tmp() -> Iterator[Path]:
    """A short temp dir under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="gfd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def running_server(
    directory: Path,
    *,
    store: GpuStore | None = None,
    **overrides: object,
) -> AsyncIterator[Running]:
    """Serve on ``directory/run/device.sock`` (metrics on a free port) until the block ends."""
    socket = directory / "run" / "device.sock"
    values: dict[str, object] = {
        "device_api_socket": socket,
        "metrics_port": 0,
        "shutdown_grace": 1.0,
    }
    values.update(overrides)
    settings = load_settings(DeviceApiSettings, **values)
    gpu_store = store or new_store(settings, state=False)
    stop = asyncio.Event()
    started: asyncio.Future[ServerInfo] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(settings, stop=stop, store=gpu_store, started=started.set_result)
    )
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what serve raised
        raise AssertionError("serve returned before starting")
    try:
        yield Running(started.result(), gpu_store, socket, settings)
    finally:
        stop.set()
        await task
        if store is None:
            gpu_store.close()


def make_gpu(name: str, index: int = 0, **labels: str) -> gpu_pb2.Gpu:
    """A GPU as a provider would register it."""
    return gpu_pb2.Gpu(
        metadata=gpu_pb2.ObjectMeta(name=name, labels=labels),
        spec=gpu_pb2.GpuSpec(
            uuid=f"GPU-{index:08d}-0000-4000-8000-{name[-12:]:0>12}",
            serial=f"1650{index:09d}",
            product="NVIDIA H100 80GB HBM3",
            pci_bus_id=f"00000000:{index % 256:02X}:00.0",
            index=index,
            node="node-a",
        ),
    )


def with_condition(
    gpu: gpu_pb2.Gpu, status: str, reason: str = "", kind: str = "Healthy"
) -> gpu_pb2.Gpu:
    """A copy of `gpu` with condition `kind` set (merged, other conditions kept)."""
    out = gpu_pb2.Gpu()
    out.CopyFrom(gpu)
    for cond in out.status.conditions:
        if cond.type == kind:
            cond.status, cond.reason = status, reason
            break
    else:
        out.status.conditions.add(type=kind, status=status, reason=reason)
    return out


INTERVAL = 0.2
DEADLINE = 10.0


@dataclass
class Server:
    """One running ``serve``; ``stop()`` shuts it down like SIGTERM would."""

    stop_event: asyncio.Event
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, DEADLINE)


async def start_server(socket_path: Path, state_file: Path | None = None) -> Server:
    settings = DeviceApiSettings(
        device_api_socket=socket_path,
        state_file=state_file,
        metrics_port=0,
        shutdown_grace=0.2,
    )
    stop = asyncio.Event()
    started = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop, started=lambda _info: started.set()))
    done, _ = await asyncio.wait(
        [task, asyncio.ensure_future(started.wait())],
        timeout=DEADLINE,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if task in done:
        task.result()  # raises what made the server fail
    assert started.is_set(), "server did not start"
    return Server(stop, task)


@dataclass
class RunningProvider:
    """A provider over a simulated dgx-h100, and a separate client to look at the server."""

    nvml: SimulatedNvml
    provider: GpuProvider
    provider_client: DeviceApiClient
    source: NvmlSource
    client: DeviceApiClient
    stop_event: asyncio.Event
    task: asyncio.Task[None]

    def uuid(self, index: int) -> str:
        return self.nvml.gpu(index).uuid

    def name(self, index: int) -> str:
        return gpu_name(self.uuid(index))

    async def gpu(self, index: int) -> gpu_pb2.Gpu:
        return await self.client.get(self.name(index))

    async def inject_xid(self, index: int, xid: int) -> None:
        # The event set must exist before the event, as on a real driver.
        await polling.eventually(lambda: self.provider.xid_stream_ready, DEADLINE)
        assert self.nvml.inject_xid(index, xid) == 1

    async def stop(self) -> None:
        """Stop the provider (the looking client stays open until ``close``)."""
        if not self.task.done():
            self.stop_event.set()
            await asyncio.wait_for(self.task, DEADLINE)
            await self.provider_client.close()
            self.source.close()

    async def close(self) -> None:
        await self.stop()
        await self.client.close()


async def start_provider(
    socket_path: Path,
    nvml: SimulatedNvml | None = None,
    wrap: Callable[[NvmlSource], GpuSource] | None = None,
    health_interval: float = INTERVAL,
) -> RunningProvider:
    nvml = nvml or sim.open("dgx-h100")
    provider_client = DeviceApiClient(socket_path, options=CLIENT_OPTIONS)
    source = NvmlSource(nvml)
    provider = GpuProvider(
        provider_client,
        source if wrap is None else wrap(source),
        node="node-a",
        health_interval=health_interval,
        backoff=Backoff(initial=0.05, cap=0.3, jitter=0.0),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(provider.run(stop))
    running = RunningProvider(
        nvml, provider, provider_client, source, DeviceApiClient(socket_path), stop, task
    )
    await polling.eventually(lambda: provider.ready, DEADLINE)
    return running
