"""Pod start with a kernel cache image vs without: JIT-compiling cold against pulling warm.

The proxy for a pod's start is what its Triton kernels cost before the first
launch. The kernels are a real row-softmax family: 20 variants (BLOCK 128 to
2048, num_warps 1 to 8), AOT-compiled for sm_90 by Triton itself in a fresh
interpreter (tests/kcache_support.py), so no GPU is needed.

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
  - *publish*: a read-only bind mount of the store entry at the pod's mount
    path (`kcache.mounts.bind_read_only`, what the CSI plugin's
    NodePublishVolume does; a symlink when not root);
  - *load*: a fresh interpreter compiling the same kernels with
    ``TRITON_CACHE_DIR`` at the mount path; every kernel must hit the cache.

The registry is a throwaway Debian ``docker-registry`` started as
bench_kcache_pull.py starts its own, or with ``--registry test`` the test
servers' one. Each round runs cold then warm; the first round's cold cache is
the one the image is built from.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# tests/kcache_support.py compiles the kernels, as the kcache tests compile theirs.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kcache_pull import find_test_registry, own_registry
from gpufleet.kcache.format import summarize
from gpufleet.kcache.image import build_image
from gpufleet.kcache.mounts import bind_read_only, unmount
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from gpufleet.kcache.transfer import pull_to_store, push_image
from tests.kcache_support import SOFTMAX_FAMILY, compile_specs

REPOSITORY = "bench/kcache-startup"
ARCHS = (90,)
STEPS = ("resolve", "pull", "extract", "publish", "load")
GOAL = 10.0


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
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def warm(self) -> float:
        return sum(self.steps.values())


def cold(cache: Path) -> float:
    """JIT-compile the whole family into the empty `cache`, in a fresh interpreter."""
    start = time.perf_counter()
    report = compile_specs(cache, SOFTMAX_FAMILY, archs=ARCHS)
    elapsed = time.perf_counter() - start
    expected = len(SOFTMAX_FAMILY) * len(ARCHS)
    if report.compiled != expected:
        sys.exit(f"bench_kcache_startup: cold compiled {report}, expected {expected} compiles")
    return elapsed


@contextlib.contextmanager
def published(source: Path, target: Path) -> Iterator[str]:
    """`source` shown read-only at `target` for the block's duration; how it was shown."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        target.mkdir()
        bind_read_only(source, target)
        try:
            yield "read-only bind mount"
        finally:
            unmount(target)
    else:
        target.symlink_to(source, target_is_directory=True)
        yield "symlink (not root: no bind mount)"


def warm(registry: str, tag: str, scratch: Path) -> tuple[dict[str, float], str]:
    """Resolve, pull, extract, publish and load once, into a fresh store; the step times."""
    steps: dict[str, float] = {}
    mount = scratch / "pod" / "cache"  # the container's mountPath: the __grp__ files name it
    store = CacheStore(scratch / "store")
    with TimedClient(registry) as client:
        start = time.perf_counter()
        digest = client.resolve(REPOSITORY, tag)
        steps["resolve"] = time.perf_counter() - start
        if digest is None:
            sys.exit(f"bench_kcache_startup: {registry}/{REPOSITORY}:{tag} is not there")
        start = time.perf_counter()
        pulled = pull_to_store(
            client, Reference(registry, REPOSITORY, None, digest), store, mount_root=str(mount)
        )
        total = time.perf_counter() - start
        steps["pull"] = client.registry_s
        steps["extract"] = total - client.registry_s
    if not pulled.extracted:
        sys.exit("bench_kcache_startup: the fresh store already held the cache")
    start = time.perf_counter()
    with published(pulled.path, mount) as how:
        steps["publish"] = time.perf_counter() - start
        start = time.perf_counter()
        report = compile_specs(mount, SOFTMAX_FAMILY, archs=ARCHS)
        steps["load"] = time.perf_counter() - start
    if report.compiled:
        sys.exit(f"bench_kcache_startup: warm still compiled {report.compiled} kernels")
    return steps, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="cold+warm rounds (default 1)")
    parser.add_argument(
        "--registry",
        choices=("own", "test"),
        default="own",
        help="own: a throwaway registry (default); test: reuse .testservers' if it answers",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit("bench_kcache_startup: --rounds must be at least 1")
    load_start = os.getloadavg()
    rounds: list[Round] = []
    how = ""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kcache-start-")))
        registry = find_test_registry() if args.registry == "test" else None
        where = f"test registry {registry}"
        if registry is None:
            state = workdir / "registry"
            state.mkdir()
            registry = stack.enter_context(own_registry(state))
            where = f"own docker-registry on {registry}"
        tag = f"softmax-{uuid.uuid4().hex[:8]}"
        built = workdir / "built"
        first = Round(cold=cold(built))
        summary = summarize(built)
        # The image names a mount root, but the pull passes the pod's: that is what it uses.
        image = build_image(built, workdir / "image")
        with RegistryClient(registry) as client:
            push_image(client, Reference(registry, REPOSITORY, tag), image)
        print(
            f"cache: {summary.entry_count} kernels ({len(SOFTMAX_FAMILY)} row-softmax variants "
            f"for sm_{ARCHS[0]}), {summary.size_bytes:,} bytes; layer {image.layer_size:,} "
            f"bytes; Triton {', '.join(summary.triton_versions)}"
        )
        print(f"registry: {where}; {os.cpu_count()} CPUs")
        for index in range(args.rounds):
            current = first if index == 0 else Round(cold=cold(workdir / f"cold-{index}"))
            scratch = workdir / f"warm-{index}"
            current.steps, how = warm(registry, tag, scratch)
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
    cold_s = statistics.median(r.cold for r in rounds)
    warm_s = statistics.median(r.warm for r in rounds)
    print(f"{'seconds (median)':<22} {'':>7}")
    print(f"{'cold: JIT compile all':<22} {cold_s:7.2f}")
    print(f"{'warm: total':<22} {warm_s:7.2f}")
    for step in STEPS:
        value = statistics.median(r.steps[step] for r in rounds)
        print(f"{'  ' + step:<22} {value:7.3f} {100 * value / warm_s:5.1f} %")
    ratio = cold_s / warm_s
    verdict = "met" if ratio >= GOAL else "missed"
    print(f"ratio cold/warm: {ratio:.1f}x (goal {GOAL:.0f}x: {verdict})")


if __name__ == "__main__":
    main()
