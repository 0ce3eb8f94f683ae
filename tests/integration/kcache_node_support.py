"""Shared by the node process tests: real cache images in the real registry, and GPU sets."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.kcache.cluster import (
    API_VERSION,
    NAMESPACED_CACHE_FINALIZER,
    RESOURCES,
    CacheKey,
    node_label_key,
    node_object_name,
)
from gpufleet.kcache.crds import crd
from gpufleet.kcache.csi.v1 import csi_pb2
from gpufleet.kcache.image import build_image
from gpufleet.kcache.node.gpus import NodeGpus, read_gpus
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.transfer import push_image
from tests.doubles.kubeapi import KubeApiDouble
from tests.kcache_csi_support import publish_request, volume_context, volume_id

IMAGE_ROOT = "/cache"
"""The mount root the test images are built for (the issue's example)."""
NODE = "node-1"
NAMESPACE = "team-a"
KEY = CacheKey("GKMCache", NAMESPACE, "vector-add")
NODE_OBJECTS = "gkmcachenodes.gkm.io"
CACHES = "gkmcaches.gkm.io"


def serve_crds(api: KubeApiDouble, *, node: bool = True) -> None:
    """Declare the four gkm.io kinds (and add the node)."""
    for resource in RESOURCES:
        api.add_crd(crd(resource))
    if node:
        api.add_node(NODE)


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


def digest_of(image: str) -> str:
    digest = Reference.parse(image).digest
    assert digest is not None
    return digest


def add_cache(api: KubeApiDouble, image: str | None, *, name: str = KEY.name) -> None:
    """A GKMCache as the operator leaves it once resolved (finalizer and status)."""
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "GKMCache",
        "metadata": {
            "name": name, "namespace": NAMESPACE, "finalizers": [NAMESPACED_CACHE_FINALIZER],
        },
        "spec": {"image": "registry.example/caches/vector-add:v1"},
    }  # fmt: skip
    if image is not None:
        obj["status"] = {"resolvedDigest": digest_of(image), "resolvedImage": image}
    api.add_object(obj)


def node_object(api: KubeApiDouble, key: CacheKey = KEY) -> dict[str, Any] | None:
    name = node_object_name(key, NODE)
    found = [o for o in api.objects(NODE_OBJECTS, key.namespace) if o["metadata"]["name"] == name]
    return found[0] if found else None


def digest_entry(api: KubeApiDouble, image: str) -> dict[str, Any] | None:
    obj = node_object(api)
    if obj is None:
        return None
    entry: dict[str, Any] | None = (
        obj.get("status", {}).get("caches", {}).get(KEY.name, {}).get(digest_of(image))
    )
    return entry


def state_of(api: KubeApiDouble, image: str) -> str | None:
    entry = digest_entry(api, image)
    return None if entry is None else str(entry["conditions"][0]["type"])


def node_label(api: KubeApiDouble, key: CacheKey = KEY) -> str | None:
    node = api.get("nodes", None, NODE)
    assert node is not None
    value = (node["metadata"].get("labels") or {}).get(node_label_key(key))
    return None if value is None else str(value)


def add_pod(api: KubeApiDouble, *mounts_: tuple[str, str]) -> str:
    """A pod of `NODE` whose containers mount the cache's volume; returns its UID."""
    containers = [
        {"name": name, "image": "app", "volumeMounts": [{"name": "kernels", "mountPath": path}]}
        for name, path in mounts_
    ]
    volume = {"name": "kernels", "csi": {"driver": "csi.gkm.io", "volumeAttributes": {
        "csi.gkm.io/GKMCache": KEY.name, "csi.gkm.io/namespace": NAMESPACE,
    }}}  # fmt: skip
    stored = api.add_object({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "namespace": NAMESPACE},
        "spec": {"nodeName": NODE, "containers": containers, "volumes": [volume]},
    })  # fmt: skip
    return str(stored["metadata"]["uid"])


def pod_request(
    target: Path,
    uid: str,
    *,
    cache: Mapping[str, str] | None = None,
    service_account: str = "default",
) -> csi_pb2.NodePublishVolumeRequest:
    """What the kubelet sends for the volume of the `add_pod` pod `uid` (`cache`: attributes)."""
    attributes = cache or {"csi.gkm.io/GKMCache": KEY.name, "csi.gkm.io/namespace": NAMESPACE}
    context = volume_context(
        pod_uid=uid, pod_name="app", namespace=NAMESPACE, service_account=service_account,
        attributes=attributes,
    )  # fmt: skip
    return publish_request(target, volume=volume_id(uid), context=context)


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
