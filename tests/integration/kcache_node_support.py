"""Shared by the node process tests: real cache images in the real registry, and GPU sets."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.kcache.image import build_image
from gpufleet.kcache.node.gpus import NodeGpus, read_gpus
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.transfer import push_image

IMAGE_ROOT = "/cache"
"""The mount root the test images are built for (the issue's example)."""


def push_cache(cache: Path, registry: str, workdir: Path, *, mount_root: str = IMAGE_ROOT) -> str:
    """Build and push `cache` to a fresh repository; returns ``<repo>@<digest>``."""
    reference = Reference.parse(f"{registry}/kcache-node/c-{uuid.uuid4().hex[:10]}:v1")
    workdir.mkdir(parents=True, exist_ok=True)
    image = build_image(cache, workdir, mount_root=mount_root)
    with RegistryClient(registry) as client:
        digest = push_image(client, reference, image)
    return f"{reference.registry}/{reference.repository}@{digest}"


def gpus_of(preset: str) -> NodeGpus:
    """The GPUs of a simulated preset, as the node process reads them."""
    source = NvmlSource(sim.SimulatedNvml(sim.preset(preset)))
    try:
        return read_gpus(source)
    finally:
        source.close()


def closed_port() -> str:
    """``127.0.0.1:<port>`` where nothing listens (a registry that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


class StallingProxy:
    """A TCP proxy to the real registry that can stall a download halfway (a pull in flight).

    While `stall` is set, the answer to a ``GET`` of a blob whose digest is in `stall_blobs`
    stops after `after` bytes and hangs until the stall is lifted. Requests are read as
    HTTP/1.1 heads (the client sends bodiless GET/HEAD requests one at a time per connection).
    """

    def __init__(self, upstream: str, *, after: int = 4096) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._after = after
        self.stall_blobs: set[str] = set()
        self.stalling = asyncio.Event()
        """Set once a stalled download is hanging."""
        self._lifted = asyncio.Event()
        self._lifted.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = ""

    def stall(self) -> None:
        """Hang blob downloads of `stall_blobs` after their first bytes."""
        self._lifted.clear()

    def lift(self) -> None:
        """Let every download through again (hanging ones go on)."""
        self._lifted.set()

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        budget: list[int | None] = [None]  # bytes of the answer left before a stall

        async def requests() -> None:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                method, path = line.split(" ")[:2]
                hit = method == "GET" and any(d in path for d in self.stall_blobs)
                budget[0] = self._after if hit and not self._lifted.is_set() else None
                up_writer.write(head)
                await up_writer.drain()

        async def answers() -> None:
            while chunk := await up_reader.read(1024):
                left = budget[0]
                if left is not None and len(chunk) >= left:
                    writer.write(chunk[:left])
                    await writer.drain()
                    self.stalling.set()
                    await self._lifted.wait()
                    chunk, budget[0] = chunk[left:], None
                elif left is not None:
                    budget[0] = left - len(chunk)
                writer.write(chunk)
                await writer.drain()

        try:
            await asyncio.gather(requests(), answers())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            up_writer.close()
            self._tasks.discard(task)
