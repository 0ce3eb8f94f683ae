"""Shared set-up of the device API integration tests: a real server on a unix socket.

`running_server` starts `serve(...)` on the test's own event loop, bound to a
socket in a fresh short temp dir (unix socket paths are limited to ~107 bytes,
which pytest's tmp_path can exceed), and stops it gracefully afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpufleet.core.config import load_settings
from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.config import DeviceApiSettings
from gpufleet.deviceapi.server import ServerInfo, new_store, serve
from gpufleet.deviceapi.store import GpuStore
from gpufleet.deviceapi.v1alpha1 import gpu_pb2

__all__ = ["Running", "make_gpu", "running_server", "short_tmp", "with_condition"]


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
