"""Pull + extract of a kernel cache image: gpufleet's `pull_to_store` vs `skopeo copy` + `tar -x`.

The cache is synthetic but shaped like a real Triton cache: 1,250 kernel groups
of 8 files (metadata JSON, ``__grp__`` file, source, ttir, ttgir, llir, ptx,
cubin), 10k files and about 1 GiB in all. The big stages are a few hundred KB
and mix random bytes with IR-like text, so the layer compresses about as much
as real caches do (2-3x), not 100x. It passes `format.summarize`, is built by
`image.build_image` and pushed by `transfer.push_image` to a throwaway Debian
`docker-registry` on loopback, with its storage in a temporary directory.

Both sides fetch the same image from the same registry in the same run, in a
rotating order, with the page cache dropped before each measurement when that
is allowed:

- ours: ``pull_to_store(client, ref, CacheStore(tmp, durable=True))``, a fresh
  store each time. It verifies the blob digest, the size label and the sha256
  of every file, rewrites the ``__grp__`` files, and ends with ``syncfs``.
  ``durable=False`` is measured too, for information;
- peer: ``skopeo copy docker://… oci:DIR`` then ``tar -xzf <layer> -C out``,
  timed together. skopeo checks the blob digest; tar checks nothing. "+sync"
  then drops the OCI layout (ours drops its downloaded layer too) and runs
  ``sync -f out`` (``syncfs`` on the same filesystem): that is the like-for-like
  figure for ours with ``durable=True``.

The generated cache and the built image are kept in ``--workdir`` between runs.
``--quick`` is a smoke run on a small cache. Needs ``skopeo`` and
``docker-registry``; as root it installs the Debian packages when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _registry import find_test_registry, own_registry
from gpufleet.kcache import image as image_module
from gpufleet.kcache import labels as labels_module
from gpufleet.kcache.format import summarize
from gpufleet.kcache.groups import GROUP_PREFIX, group_dir_name
from gpufleet.kcache.image import DEFAULT_MOUNT_ROOT, BuiltImage, build_image
from gpufleet.kcache.labels import labels_of, summary_from_labels
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from gpufleet.kcache.transfer import pull_to_store, push_image

GENERATOR_VERSION = 2
REPOSITORY = "bench/kcache"
REGISTRY_BIN = "/usr/bin/docker-registry"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CHUNK = 4096

# (extension, mean size in bytes, share of 4 KiB chunks that are random bytes). The rest of
# each file is IR-like text. Means are those of a real Triton 3.x cache on H100; the random
# shares bring the layer to ~2.5x compression (real cubins: 2-3x, real IR text: 5-10x).
STAGES = (
    ("source", 6_000, 0.0),
    ("ttir", 45_000, 0.03),
    ("ttgir", 60_000, 0.03),
    ("llir", 260_000, 0.08),
    ("ptx", 220_000, 0.08),
    ("cubin", 290_000, 0.35),
)
PTX_OPS = (
    "ld.global.v4.b32", "st.shared.v4.b32", "ld.shared.v4.b32", "mov.u32", "add.s32",
    "mad.lo.s32", "setp.lt.s32", "fma.rn.f32", "cvt.rn.bf16x2.f32", "shl.b32", "and.b32",
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "bar.sync", "selp.b32", "or.b32",
)  # fmt: skip
LLIR_OPS = (
    "add i32", "mul i32", "fadd float", "fmul float", "getelementptr bfloat, ptr addrspace(1)",
    "load <4 x i32>, ptr addrspace(3)", "icmp slt i32", "select i1", "shl i32", "and i32",
)  # fmt: skip
KERNEL_KINDS = ("poi", "red", "per", "tem")
FUSED_OPS = (
    "add", "mul", "mean", "pow", "rsqrt", "silu", "embedding", "convert_element_type",
    "native_layer_norm", "addmm", "bmm", "softmax", "view", "clone", "sum", "sub",
)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    groups: int
    total_bytes: int
    seed: int = 1

    @property
    def name(self) -> str:
        return f"g{self.groups}-b{self.total_bytes}-s{self.seed}-v{GENERATOR_VERSION}"


FULL = Shape(groups=1_250, total_bytes=1 << 30)
QUICK = Shape(groups=100, total_bytes=24 << 20)


# -- the synthetic cache ---------------------------------------------------------------------


def text_pool(rng: random.Random, size: int) -> bytes:
    """IR-like lines: a few opcodes, random register numbers (gzip takes it down ~4x)."""
    lines: list[str] = []
    total = 0
    while total < size:
        if rng.random() < 0.5:
            op = rng.choice(PTX_OPS)
            a, b, c = rng.randrange(4096), rng.randrange(4096), rng.randrange(4096)
            line = f"\t{op} \t%r{a}, %r{b}, %r{c};\n"
        else:
            op = rng.choice(LLIR_OPS)
            a, b, c = rng.randrange(9999), rng.randrange(9999), rng.randrange(9999)
            line = f"  %{a} = {op} %{b}, %{c}, !dbg !{rng.randrange(999)}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


class Content:
    """File bodies cut from a random pool and a text pool (generation is then mostly memcpy)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.random = rng.randbytes(64 << 20)
        self.text = text_pool(rng, 16 << 20)

    def body(self, size: int, random_share: float) -> bytes:
        rng, parts, left = self.rng, [], size
        while left > 0:
            n = min(CHUNK, left)
            pool = self.random if rng.random() < random_share else self.text
            start = rng.randrange(len(pool) - n)
            parts.append(pool[start : start + n])
            left -= n
        return b"".join(parts)


def metadata(digest: str, name: str, arch: int) -> bytes:
    """A kernel's metadata JSON with the fields Triton 3.x writes (about 1.5 KB)."""
    meta = {
        "hash": digest,
        "target": {"backend": "cuda", "arch": arch, "warp_size": 32},
        "num_warps": 4, "num_ctas": 1, "num_stages": 3, "maxnreg": None,
        "cluster_dims": [1, 1, 1], "ptx_version": None, "ptx_options": None,
        "ir_override": None, "enable_fp_fusion": True, "launch_cooperative_grid": False,
        "launch_pdl": False, "supported_fp8_dtypes": ["fp8e4b15", "fp8e4nv", "fp8e5"],
        "deprecated_fp8_dot_operand_dtypes": ["fp8e4b15"],
        "default_dot_input_precision": "tf32",
        "allowed_dot_input_precisions": ["tf32", "tf32x3", "ieee", "bf16x3", "bf16x6"],
        "max_num_imprecise_acc_default": 1073741824, "extern_libs": [["libdevice",
        "/usr/local/lib/python3.12/site-packages/triton/backends/nvidia/lib/libdevice.10.bc"]],
        "debug": False, "backend_name": "cuda", "sanitize_overflow": True, "arch": f"sm{arch}",
        "instrumentation_mode": "", "triton_version": "3.4.0", "tensordesc_meta": [],
        "shared": 32768, "tmem_size": 0, "global_scratch_size": 0, "global_scratch_align": 1,
        "profile_scratch_size": 0, "profile_scratch_align": 1, "name": name,
    }  # fmt: skip
    return json.dumps(meta).encode()


def generate(root: Path, shape: Shape) -> None:
    """Write ``shape.groups`` kernel groups of 8 files under `root` (which must not exist)."""
    rng = random.Random(shape.seed)
    content = Content(rng)
    per_group = sum(mean for _, mean, _ in STAGES) + 1_600 + 1_000  # + metadata + __grp__
    scale = shape.total_bytes / (shape.groups * per_group)
    compiled_at = "/root/.triton/cache"
    root.mkdir(parents=True)
    for i in range(shape.groups):
        ops = "_".join(rng.sample(FUSED_OPS, rng.randint(1, 4)))
        name = f"triton_{rng.choice(KERNEL_KINDS)}_fused_{ops}_{i}"
        digest = hashlib.sha256(f"bench-kernel-{shape.seed}-{i}".encode()).hexdigest()
        group = root / group_dir_name(digest)
        group.mkdir()
        arch = 90 if i % 5 else 80
        (group / f"{name}.json").write_bytes(metadata(digest, name, arch))
        children = {f"{name}.json": f"{compiled_at}/{group.name}/{name}.json"}
        for ext, mean, random_share in STAGES:
            # Log-normal around the mean (sigma 0.5), the mean kept: real sizes vary a lot.
            size = max(200, int(mean * scale * rng.lognormvariate(-0.125, 0.5)))
            (group / f"{name}.{ext}").write_bytes(content.body(size, random_share))
            children[f"{name}.{ext}"] = f"{compiled_at}/{group.name}/{name}.{ext}"
        grp = json.dumps({"child_paths": children}).encode()
        (group / f"{GROUP_PREFIX}{name}.json").write_bytes(grp)


def cached(path: Path, stamp: str, make: Callable[[Path], None]) -> None:
    """Make `path` with `make` unless a previous run left it with the same stamp."""
    marker = path.with_name(path.name + ".stamp")
    if path.exists() and marker.exists() and marker.read_text() == stamp:
        return
    marker.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    make(path)
    marker.write_text(stamp)


def image_from_dir(layout: Path) -> BuiltImage:
    """The image `save_image` left in `layout` (manifest, config and layer)."""
    manifest = (layout / "manifest.json").read_bytes()
    config = (layout / "config.json").read_bytes()
    doc = json.loads(manifest)
    layer = doc["layers"][0]
    labels = labels_of(config)
    return BuiltImage(
        manifest=manifest,
        manifest_digest="sha256:" + hashlib.sha256(manifest).hexdigest(),
        config=config,
        config_digest=doc["config"]["digest"],
        layer_path=layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:"),
        layer_digest=layer["digest"],
        layer_size=layer["size"],
        summary=summary_from_labels(labels),
        labels=labels,
    )


def prepare(workdir: Path, shape: Shape) -> tuple[Path, BuiltImage]:
    """The generated cache and its built image, made once per shape and kept in `workdir`."""
    # What older generator versions or an interrupted run left behind.
    for stale in workdir.iterdir():
        kept = stale.name.removesuffix(".stamp").endswith(f"-v{GENERATOR_VERSION}")
        if stale.name.startswith("round-") or (
            stale.name.startswith(("cache-", "image-")) and not kept
        ):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    cache = workdir / f"cache-{shape.name}"
    layout = workdir / f"image-{shape.name}"
    start = time.perf_counter()
    cached(cache, shape.name, lambda p: generate(p, shape))
    gen_s = time.perf_counter() - start

    def build(path: Path) -> None:
        image = build_image(cache, path, mount_root=DEFAULT_MOUNT_ROOT)
        (path / "manifest.json").write_bytes(image.manifest)
        (path / "config.json").write_bytes(image.config)

    # The image is rebuilt when the code that writes its bytes changes.
    code = hashlib.sha256()
    for module in (image_module, labels_module):
        code.update(Path(str(module.__file__)).read_bytes())
    start = time.perf_counter()
    cached(layout, f"{shape.name} {code.hexdigest()}", build)
    build_s = time.perf_counter() - start
    if gen_s + build_s > 1:
        print(f"prepared in {workdir}: generate {gen_s:.1f} s, build {build_s:.1f} s")
    return cache, image_from_dir(layout)


# -- tools -----------------------------------------------------------------------------------------


def ensure_tool(binary: str, package: str) -> str:
    """The path of `binary`; as root, ``apt-get install -y PACKAGE`` first when it is missing."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit(
            f"bench_kcache_pull: {binary} is missing; install the Debian package {package} "
            f"(apt-get install -y {package}) or run this as root to let it install it"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"{binary} is missing; running: apt-get install -y {package}", flush=True)
    install = ["apt-get", "install", "-y", "-qq", package]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        print("running: apt-get update, then apt-get install again", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    found = shutil.which(binary)
    if not found:
        sys.exit(f"bench_kcache_pull: {package} is installed but {binary} is still not found")
    return found


def tool_version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else "?"


# -- measurements ----------------------------------------------------------------------------


class Settle:
    """Before each measurement: flush, drop the page cache (if allowed), warm peer binaries."""

    def __init__(self, workdir: Path, drop: bool) -> None:
        self.workdir = workdir
        self.dropped = False
        self.why_not = "--no-drop-caches" if not drop else ""
        self.drop = drop

    def __call__(self) -> None:
        subprocess.run(["sync", "-f", str(self.workdir)], check=True)
        if self.drop:
            try:
                DROP_CACHES.write_text("3\n")
                self.dropped = True
            except OSError as exc:
                self.drop, self.why_not = False, f"not allowed: {exc.strerror}"
        # skopeo is a ~30 MB binary: load it (and tar, gzip) back into the page cache, since
        # ours runs in a process whose code is already in memory.
        for argv in (["skopeo", "--version"], ["tar", "--version"], ["gzip", "--version"]):
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=False)


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def run_ours(registry: str, tag: str, scratch: Path, *, durable: bool) -> tuple[float, int]:
    ref = Reference(registry, REPOSITORY, tag)
    start = time.perf_counter()
    with RegistryClient(registry) as client:
        pulled = pull_to_store(
            client, ref, CacheStore(scratch / "store", durable=durable),
            mount_root=DEFAULT_MOUNT_ROOT,
        )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert pulled.extracted
    return elapsed, count_files(pulled.path)


def oci_layer(layout: Path) -> Path:
    """The single layer blob of the only image in an OCI layout (index.json → manifest)."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((blobs / manifest_digest).read_text())
    (layer,) = manifest["layers"]
    return blobs / str(layer["digest"]).removeprefix("sha256:")


def run_peer(registry: str, tag: str, scratch: Path) -> tuple[float, float, float, int]:
    layout, out = scratch / "oci", scratch / "out"
    out.mkdir()
    src = f"docker://{registry}/{REPOSITORY}:{tag}"
    # --insecure-policy: no /etc/containers/policy.json needed; nothing is signed anyway.
    copy = ["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false"]
    start = time.perf_counter()
    subprocess.run([*copy, src, f"oci:{layout}:{tag}"], check=True)
    copied = time.perf_counter() - start
    subprocess.run(["tar", "-xzf", str(oci_layer(layout)), "-C", str(out)], check=True)
    plain = time.perf_counter() - start
    # Like ours (which drops its downloaded layer before syncfs): discard the blob, then flush.
    shutil.rmtree(layout)
    subprocess.run(["sync", "-f", str(out)], check=True)
    synced = time.perf_counter() - start
    return copied, plain, synced, count_files(out / "io.triton.cache")


def measure(
    registry: str, tag: str, workdir: Path, rounds: int, settle: Settle, expected_files: int
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        "ours durable=True": [], "ours durable=False": [], "skopeo+tar": [],
        "skopeo+tar+sync": [], "  of which skopeo": [],
    }  # fmt: skip

    def ours(scratch: Path, durable: bool) -> None:
        elapsed, files = run_ours(registry, tag, scratch, durable=durable)
        assert files == expected_files, f"ours extracted {files} files"
        results[f"ours durable={durable}"].append(elapsed)

    def peer(scratch: Path) -> None:
        copied, plain, synced, files = run_peer(registry, tag, scratch)
        assert files == expected_files, f"skopeo+tar extracted {files} files"
        results["skopeo+tar"].append(plain)
        results["skopeo+tar+sync"].append(synced)
        results["  of which skopeo"].append(copied)

    variants: list[tuple[str, Callable[[Path], None]]] = [
        ("ours durable=True", lambda s: ours(s, True)),
        ("skopeo+tar(+sync)", peer),
        ("ours durable=False", lambda s: ours(s, False)),
    ]
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        print(f"round {r + 1}: {' -> '.join(name for name, _ in order)}", flush=True)
        for _, run in order:
            scratch = Path(tempfile.mkdtemp(prefix="round-", dir=workdir))
            try:
                settle()
                run(scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return results


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on a ~24 MB cache")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpufleet-bench-kcache",
        help="keeps the generated cache and image between runs (default: %(default)s)",
    )
    parser.add_argument(
        "--registry",
        choices=("own", "test"),
        default="own",
        help="own: a throwaway registry (default); test: reuse .testservers' if it answers",
    )
    parser.add_argument("--no-drop-caches", action="store_true")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    skopeo = ensure_tool("skopeo", "skopeo")
    load_start = os.getloadavg()
    cache, image = prepare(workdir, shape)
    summary = summarize(cache)  # the generated cache must pass the format's checks
    files = count_files(cache)
    cache_bytes = summary.size_bytes
    tag = f"synthetic-{'quick' if args.quick else 'full'}"

    with contextlib.ExitStack() as stack:
        registry = find_test_registry() if args.registry == "test" else None
        where = f"test registry {registry}"
        if registry is None:
            state = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
            registry = stack.enter_context(own_registry(state))
            where = f"own docker-registry on {registry}, storage in {state}"
        with RegistryClient(registry) as client:
            push_image(client, Reference(registry, REPOSITORY, tag), image)
        print(
            f"cache: {files:,} files in {summary.entry_count:,} kernel groups, "
            f"{cache_bytes:,} bytes ({cache_bytes / 2**20:.0f} MiB); "
            f"layer {image.layer_size:,} bytes (gzip {cache_bytes / image.layer_size:.2f}x)"
        )
        print(f"registry: {where} ({tool_version([REGISTRY_BIN, '--version'])})")
        print(f"peer: {tool_version([skopeo, '--version'])}; {tool_version(['tar', '--version'])}")
        settle = Settle(workdir, drop=not args.no_drop_caches)
        results = measure(registry, tag, workdir, args.rounds, settle, files)
    load_end = os.getloadavg()

    print(
        f"page cache dropped before each measurement: "
        f"{'yes' if settle.dropped else 'no (' + settle.why_not + ')'}"
    )
    print(
        "load average (1/5/15 min): at start "
        + "/".join(f"{x:.2f}" for x in load_start)
        + ", at end "
        + "/".join(f"{x:.2f}" for x in load_end)
    )
    rounds_header = " ".join(f"{'r' + str(i + 1):>7}" for i in range(args.rounds))
    print(f"{'seconds':<20} {rounds_header} {'median':>7} {'MB/s':>7}")
    medians = {}
    for name, times in results.items():
        medians[name] = statistics.median(times)
        each = " ".join(f"{t:7.2f}" for t in times)
        rate = "" if name.startswith(" ") else f"{cache_bytes / 1e6 / medians[name]:7.0f}"
        print(f"{name:<20} {each} {medians[name]:7.2f} {rate}".rstrip())
    like = medians["skopeo+tar+sync"] / medians["ours durable=True"]
    nosync = medians["skopeo+tar"] / medians["ours durable=False"]
    print(f"ratio peer/ours, like-for-like (skopeo+tar+sync / ours durable=True): {like:.2f}x")
    print(f"ratio peer/ours, no flush (skopeo+tar / ours durable=False): {nosync:.2f}x")
    print(f"target (at least as fast as skopeo+tar): {'met' if like >= 1 else 'missed'}")


if __name__ == "__main__":
    main()
