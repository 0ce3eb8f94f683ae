"""Shared by the node process tests: real cache images in the real registry, and GPU sets."""

from __future__ import annotations

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
