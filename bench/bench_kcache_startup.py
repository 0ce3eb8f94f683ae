"""Pod start with a kernel cache image vs without: JIT-compiling cold against pulling warm.

The proxy for a pod's start is what its Triton kernels cost before the first
launch. The kernels are real, AOT-compiled for sm_90 by Triton itself in a
fresh interpreter (tests/kcache_support.py), so no GPU is needed. The cache
(``--family``) is, by default, a model's mix as autotuning leaves it: the 16
configs Triton's matmul tutorial autotunes for one fp16 GEMM shape (tl.dot,
fp32 accumulator; sm_90's wgmma) and 8 row-softmax variants (BLOCK 1024 and
2048, num_warps 1 to 8), 24 kernels. ``matmul`` is the 16 alone; ``softmax``
the 20-variant row-softmax family (BLOCK 128 to 2048, num_warps 1 to 8), the
cheapest kernels Triton compiles, the floor of what a cache saves.

- **cold**: a fresh interpreter JIT-compiles every kernel into an empty
  ``TRITON_CACHE_DIR`` (what a pod without a cache does).
- **warm**: what the node and the pod do with an image of that cache, timed
  per step:
  - *resolve*: the tag to a digest (HEAD on the manifest), as the operator does;
  - *pull*: manifest, config and layer from the registry (time spent in the
    registry client, inside `pull_to_store`);
  - *extract*: the rest of `pull_to_store`: the checks, the ``__grp__``
    rewrite to the mount root and the store's atomic install (durable, with
    its ``syncfs``);
  - *publish*: ``NodePublishVolume`` over the CSI plugin's unix socket
    (`kcache.csi`: the checks, the durable publication record, the read-only
    bind mount of the store entry at the kubelet's target path), exactly as
    the kubelet sends it for an inline volume, then what the container
    runtime does: a bind of that target at the container's mount path. The
    plugin serves a small volume source that hands out the entry just pulled
    (the node state's job in ``gpufleet cache node``). Not root: a symlink
    instead, and no CSI;
  - *load*: a fresh interpreter compiling the same kernels with
    ``TRITON_CACHE_DIR`` at the mount path; every kernel must hit the cache.

Both sides pay for a fresh interpreter, ``import triton`` and Triton's
``triton_key()`` (a sha256 of its own sources and libtriton.so, computed once
per process before the first cache lookup, hit or miss), as a pod does. That
fixed cost is timed inside each compiling process (tests/kcache_support.py
reports it) and shown, with the ratio without it: what the cache saves,
beside what the pod's start costs in all.

The registry is a throwaway Debian ``docker-registry`` (``_registry.own_registry``,
as for bench_kcache_pull.py), or with ``--registry test`` the test servers' one.
Each round runs cold then warm; the first round's cold cache is the one the
image is built from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import grpc.aio

# tests/kcache_support.py compiles the kernels, as the kcache tests compile theirs.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _registry import find_test_registry, own_registry
from gpufleet.kcache.cluster import PreparedVolume, VolumeRequest
from gpufleet.kcache.csi import CsiServer, NodeServicer
from gpufleet.kcache.csi.v1 import csi_pb2, csi_pb2_grpc
from gpufleet.kcache.format import summarize
from gpufleet.kcache.image import build_image
from gpufleet.kcache.mounts import bind_read_only, unmount
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.publications import PUBLICATIONS, PublicationLog
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from gpufleet.kcache.transfer import pull_to_store, push_image
from tests.kcache_csi_support import POD_UID, VOLUME, publish_request, volume_id
from tests.kcache_support import MATMUL_FAMILY, SOFTMAX_FAMILY, KernelSpec, compile_specs

REPOSITORY = "bench/kcache-startup"
ARCHS = (90,)
STEPS = ("resolve", "pull", "extract", "publish", "load")
GOAL = 10.0
FIXED = "(interpreter, import triton, triton_key)"

MIX_SOFTMAX = tuple(spec for spec in SOFTMAX_FAMILY if spec.block in (1024, 2048))
FAMILIES: dict[str, tuple[KernelSpec, ...]] = {
    "mix": MATMUL_FAMILY + MIX_SOFTMAX,
    "matmul": MATMUL_FAMILY,
    "softmax": SOFTMAX_FAMILY,
}
DESCRIPTIONS = {
    "mix": f"{len(MATMUL_FAMILY)} fp16 matmul autotune configs + {len(MIX_SOFTMAX)} row-softmax "
    "variants",
    "matmul": f"{len(MATMUL_FAMILY)} fp16 matmul autotune configs",
    "softmax": f"{len(SOFTMAX_FAMILY)} row-softmax variants",
}


class TimedClient(RegistryClient):
    """A registry client that adds up the seconds its manifest and blob reads take."""

    registry_s = 0.0

    def get_manifest(self, *args: object, **kwargs: object) -> tuple[bytes, str, str]:
        start = time.perf_counter()
        try:
            return super().get_manifest(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            self.registry_s += time.perf_counter() - start

    def pull_blob(
        self, repository: str, digest: str, sink: BinaryIO, *, size: int | None = None
    ) -> int:
        start = time.perf_counter()
        try:
            return super().pull_blob(repository, digest, sink, size=size)
        finally:
            self.registry_s += time.perf_counter() - start


@dataclass
class Round:
    """One round's figures, in seconds."""

    cold: float = 0.0
    cold_fixed: float = 0.0
    """Of `cold`: interpreter start, ``import triton`` and ``triton_key()``; the rest compiles."""
    compile_s: tuple[float, ...] = ()
    """Of `cold`: each kernel's compile, in the family's order."""
    steps: dict[str, float] = field(default_factory=dict)
    load_fixed: float = 0.0
    """Of the load step: the same fixed part; the rest is the cache hits."""

    @property
    def warm(self) -> float:
        return sum(self.steps.values())

    @property
    def ratio(self) -> float:
        return self.cold / self.warm

    @property
    def net_ratio(self) -> float:
        """Cold over warm without the fixed part both pay: what the cache saves."""
        return (self.cold - self.cold_fixed) / (self.warm - self.load_fixed)


def cold(cache: Path, family: tuple[KernelSpec, ...]) -> Round:
    """JIT-compile the whole family into the empty `cache`, in a fresh interpreter."""
    start = time.perf_counter()
    report = compile_specs(cache, family, archs=ARCHS)
    elapsed = time.perf_counter() - start
    expected = len(family) * len(ARCHS)
    if report.compiled != expected:
        sys.exit(f"bench_kcache_startup: cold compiled {report}, expected {expected} compiles")
    return Round(cold=elapsed, cold_fixed=elapsed - report.kernels_s, compile_s=report.kernel_s)


class PulledVolume:
    """The node state's answer for the bench's one cache: the store entry just pulled."""

    def __init__(self) -> None:
        self.volume: PreparedVolume | None = None

    async def prepare(self, request: VolumeRequest) -> PreparedVolume:
        """The entry `warm` pulled for this pod's mount path."""
        assert self.volume is not None, "published before the pull"
        return self.volume

    async def published(self, request: VolumeRequest, volume: PreparedVolume) -> None:
        """Nothing to track: one pod."""

    async def unpublished(self, volume_id: str) -> None:
        """Nothing to track: one pod."""


class Node:
    """The CSI plugin of ``gpufleet cache node`` on a unix socket, with a kubelet directory."""

    def __init__(self, root: Path, store: CacheStore) -> None:
        self.kubelet = root / "kubelet"
        self.source = PulledVolume()
        self.socket = root / "csi.sock"
        node = NodeServicer(
            self.source,
            kubelet_dir=self.kubelet,
            node_id="bench-node",
            publications=PublicationLog(store.root / PUBLICATIONS),
        )
        self.server = CsiServer(f"unix://{self.socket}", node=node, ready=lambda: True)

    def target(self) -> Path:
        """The kubelet's target path for the pod's volume, its parent made as the kubelet does."""
        parent = self.kubelet / "pods" / POD_UID / "volumes" / "kubernetes.io~csi" / VOLUME
        parent.mkdir(parents=True, exist_ok=True)
        (parent / "vol_data.json").write_text('{"driverName":"csi.gkm.io"}')
        return parent / "mount"


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[csi_pb2_grpc.NodeStub]:
    """The plugin serving, and a client of it (the kubelet's), until the block ends."""
    await node.server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{node.socket}") as channel:
            stub = csi_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            await stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest())  # connected before timing
            yield stub
    finally:
        await node.server.stop(0)


def show_at(source: Path, mount: Path, *, bind: bool) -> None:
    """`source` seen at `mount`: a read-only bind mount, or a symlink."""
    mount.parent.mkdir(parents=True, exist_ok=True)
    if bind:
        mount.mkdir()
        bind_read_only(source, mount)
    else:
        mount.symlink_to(source, target_is_directory=True)


@contextlib.asynccontextmanager
async def published(
    stub: csi_pb2_grpc.NodeStub | None, node: Node, source: Path, mount: Path
) -> AsyncIterator[str]:
    """The entry shown read-only at the container's `mount` for the block; how it was shown."""
    if stub is None:
        show_at(source, mount, bind=False)
        yield "symlink (not root: no CSI, no bind mount)"
        return
    target = node.target()
    await stub.NodePublishVolume(publish_request(target))
    show_at(target, mount, bind=True)  # the container runtime's bind of the volume
    try:
        yield "NodePublishVolume over the CSI socket + the runtime's bind at the mount path"
    finally:
        unmount(mount)
        await stub.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id(), target_path=str(target))
        )


async def warm(
    registry: str, tag: str, scratch: Path, family: tuple[KernelSpec, ...]
) -> tuple[dict[str, float], float, str]:
    """Resolve, pull, extract, publish and load once, into a fresh store.

    The step times, the fixed part of the load step (interpreter, import, ``triton_key``), and
    how the entry was published.
    """
    steps: dict[str, float] = {}
    mount = scratch / "pod" / "cache"  # the container's mountPath: the __grp__ files name it
    store = CacheStore(scratch / "store")
    node = Node(scratch, store)
    async with contextlib.AsyncExitStack() as stack:
        stub = await stack.enter_async_context(running(node)) if os.geteuid() == 0 else None
        with TimedClient(registry) as client:
            start = time.perf_counter()
            digest = client.resolve(REPOSITORY, tag)
            steps["resolve"] = time.perf_counter() - start
            if digest is None:
                sys.exit(f"bench_kcache_startup: {registry}/{REPOSITORY}:{tag} is not there")
            start = time.perf_counter()
            ref = Reference(registry, REPOSITORY, None, digest)
            pulled = pull_to_store(client, ref, store, mount_root=str(mount))
            total = time.perf_counter() - start
            steps["pull"] = client.registry_s
            steps["extract"] = total - client.registry_s
        if not pulled.extracted:
            sys.exit("bench_kcache_startup: the fresh store already held the cache")
        node.source.volume = PreparedVolume(pulled.path, pulled.digest, pulled.mount_root)
        start = time.perf_counter()
        async with published(stub, node, pulled.path, mount) as how:
            steps["publish"] = time.perf_counter() - start
            start = time.perf_counter()
            report = compile_specs(mount, family, archs=ARCHS)
            steps["load"] = time.perf_counter() - start
    if report.compiled:
        sys.exit(f"bench_kcache_startup: warm still compiled {report.compiled} kernels")
    return steps, steps["load"] - report.kernels_s, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="cold+warm rounds (default 3)")
    parser.add_argument(
        "--registry",
        choices=("own", "test"),
        default="own",
        help="own: a throwaway registry (default); test: reuse .testservers' if it answers",
    )
    parser.add_argument(
        "--family",
        choices=tuple(FAMILIES),
        default="mix",
        help="the kernels cached: mix (default): 16 matmul autotune configs + 8 row-softmax; "
        "matmul: the 16 alone; softmax: 20 row-softmax variants",
    )
    args = parser.parse_args()
    family = FAMILIES[args.family]
    if args.rounds < 1:
        sys.exit("bench_kcache_startup: --rounds must be at least 1")
    load_start = os.getloadavg()
    rounds: list[Round] = []
    how = ""
    with contextlib.ExitStack() as stack:
        # Short, under /tmp: the CSI socket's path must fit a sockaddr_un.
        workdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="kc-start-", dir="/tmp"))
        )
        registry = find_test_registry() if args.registry == "test" else None
        where = f"test registry {registry}"
        if registry is None:
            state = workdir / "registry"
            state.mkdir()
            registry = stack.enter_context(own_registry(state))
            where = f"own docker-registry on {registry}"
        tag = f"{args.family}-{uuid.uuid4().hex[:8]}"
        built = workdir / "built"
        first = cold(built, family)
        summary = summarize(built)
        # The image names a mount root, but the pull passes the pod's: that is what it uses.
        image = build_image(built, workdir / "image")
        with RegistryClient(registry) as client:
            push_image(client, Reference(registry, REPOSITORY, tag), image)
        print(
            f"cache ({args.family}): {summary.entry_count} kernels ({DESCRIPTIONS[args.family]}, "
            f"for sm_{ARCHS[0]}), {summary.size_bytes:,} bytes; layer {image.layer_size:,} "
            f"bytes; Triton {', '.join(summary.triton_versions)}"
        )
        print(f"registry: {where}; {os.cpu_count()} CPUs")
        for index in range(args.rounds):
            current = first if index == 0 else cold(workdir / f"cold-{index}", family)
            scratch = workdir / f"warm-{index}"
            current.steps, current.load_fixed, how = asyncio.run(
                warm(registry, tag, scratch, family)
            )
            shutil.rmtree(scratch, ignore_errors=True)
            rounds.append(current)
            print(
                f"round {index + 1}: cold {current.cold:.2f} s, warm {current.warm:.2f} s",
                flush=True,
            )
    load_end = os.getloadavg()

    print(f"publish: {how}")
    print(
        "load average (1/5/15 min): at start "
        + "/".join(f"{x:.2f}" for x in load_start)
        + ", at end "
        + "/".join(f"{x:.2f}" for x in load_end)
    )

    def median(values: Iterator[float]) -> float:
        return statistics.median(values)

    warm_s = median(r.warm for r in rounds)
    print("seconds, median of the rounds")
    print(f"{'cold: JIT compile all':<26} {median(r.cold for r in rounds):7.3f}")
    print(f"{'  of which fixed':<26} {median(r.cold_fixed for r in rounds):7.3f}  {FIXED}")
    for kernel in sorted({spec.kernel for spec in family}):
        mine = [i for i, spec in enumerate(family) if spec.kernel == kernel]
        mean = median(statistics.fmean(r.compile_s[i] for i in mine) for r in rounds)
        print(f"{'  per ' + kernel:<26} {mean:7.3f}  mean compile of its {len(mine)} kernels")
    if len({spec.kernel for spec in family}) > 1:
        mean = median(statistics.fmean(r.compile_s) for r in rounds)
        print(f"{'  per kernel':<26} {mean:7.3f}  mean compile of all {len(family)}")
    print(f"{'warm: total':<26} {warm_s:7.3f}")
    for step in STEPS:
        value = median(r.steps[step] for r in rounds)
        print(f"{'  ' + step:<26} {value:7.3f}  {100 * value / warm_s:5.1f} %")
    fixed = median(r.load_fixed for r in rounds)
    print(f"{'    of which fixed':<26} {fixed:7.3f}  {100 * fixed / warm_s:5.1f} %  {FIXED}")
    ratio = median(r.ratio for r in rounds)
    verdict = "met" if ratio >= GOAL else "missed"
    print(f"ratio cold/warm: {ratio:.1f}x (goal {GOAL:.0f}x: {verdict})")
    print(
        f"ratio without the fixed part both pay: {median(r.net_ratio for r in rounds):.1f}x "
        "(compiling vs resolve + pull + extract + publish + cache hits)"
    )


if __name__ == "__main__":
    main()
