"""Real Triton caches for the kernel-cache tests: compiled ahead of time, no GPU needed.

The kernels are compiled in a fresh interpreter (this file run as a script) so that
``TRITON_CACHE_DIR`` and Triton's other knobs are read from a clean environment, never from the
test process. The kernel source is written to one fixed path per source text, because Triton embeds
the source file's path in the IR and binaries it caches; a fixed path keeps two builds of the same
kernels byte-identical wherever their cache lives. The path does not enter Triton's cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.kcache.groups import group_dir_name

KERNELS: tuple[str, ...] = ("add", "scale")
ARCHS: tuple[int, ...] = (80, 90)
WARP_SIZE = 32

KERNEL_SOURCE = '''\
"""Kernels compiled by tests/kcache_support.py."""
import triton
import triton.language as tl


@triton.jit
def add(x, y, out, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    total = tl.load(x + offsets, mask=mask) + tl.load(y + offsets, mask=mask)
    tl.store(out + offsets, total, mask=mask)


@triton.jit
def scale(x, out, alpha, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out + offsets, tl.load(x + offsets, mask=mask) * alpha, mask=mask)


@triton.jit
def softmax(out, x, out_stride, x_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n_cols
    values = tl.load(x + row * x_stride + offsets, mask=mask, other=-float("inf"))
    values = values - tl.max(values, axis=0)
    numerator = tl.exp(values)
    result = numerator / tl.sum(numerator, axis=0)
    tl.store(out + row * out_stride + offsets, result, mask=mask)


@triton.jit
def matmul(
    a, b, c, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A @ B in fp16, blocked, fp32 accumulator: Triton's matmul tutorial kernel."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a_tile = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b_tile = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        accumulator = tl.dot(a_tile, b_tile, accumulator)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :]
    c_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
    tl.store(c_ptrs, accumulator.to(tl.float16), mask=c_mask)
'''

_SIGNATURES: dict[str, dict[str, str]] = {
    "add": {"x": "*fp32", "y": "*fp32", "out": "*fp32", "n": "i32"},
    "scale": {"x": "*fp32", "out": "*fp32", "alpha": "fp32", "n": "i32"},
    "softmax": {
        "out": "*fp32", "x": "*fp32", "out_stride": "i32", "x_stride": "i32", "n_cols": "i32",
    },
    # As Triton's JIT specializes a launch on row-major fp16 matrices whose sizes are multiples
    # of 16: the unit strides become constexprs (below), the rest are divisible by 16 (_ATTRS).
    "matmul": {
        "a": "*fp16", "b": "*fp16", "c": "*fp16", "M": "i32", "N": "i32", "K": "i32",
        "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32",
    },
}  # fmt: skip
_TILES: dict[str, tuple[str, ...]] = {
    "add": ("BLOCK",), "scale": ("BLOCK",), "softmax": ("BLOCK",),
    "matmul": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
}  # fmt: skip
"""Each kernel's tile constexprs, in the order of `KernelSpec.tiles`."""
_FIXED_CONSTEXPRS: dict[str, dict[str, int]] = {
    "matmul": {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1},
}
_DIVISIBLE_BY_16: dict[str, tuple[str, ...]] = {
    "matmul": ("a", "b", "c", "M", "N", "K", "stride_am", "stride_bk", "stride_cm"),
}
_MODULE = "gpufleet_kcache_kernels"


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """One compile: a kernel of KERNEL_SOURCE, its tile constexprs, num_warps and num_stages.

    The 1-D kernels (add, scale, softmax) take one tile, `block` (their BLOCK). The others take
    theirs in `tiles`, in their order in the kernel (matmul: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M);
    `block` is then unused. None for num_warps or num_stages is Triton's default (4 and 3). Each
    distinct spec is its own cache entry: the tiles, num_warps and num_stages are in Triton's key.
    """

    kernel: str
    block: int = 128
    num_warps: int | None = None
    tiles: tuple[int, ...] = ()
    num_stages: int | None = None

    def constexprs(self) -> dict[str, int]:
        """The tile constexprs by name; ValueError for an unknown kernel or a wrong tile count."""
        if self.kernel not in _TILES:
            raise ValueError(f"no such test kernel: {self.kernel!r}")
        names = _TILES[self.kernel]
        values = self.tiles or ((self.block,) if names == ("BLOCK",) else ())
        if len(values) != len(names):
            raise ValueError(f"{self.kernel} takes tiles {names}, got {self.tiles}")
        return dict(zip(names, values, strict=True))

    def options(self) -> dict[str, int]:
        """The compile options this spec sets (the others are Triton's defaults)."""
        chosen = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return {name: value for name, value in chosen.items() if value is not None}


SOFTMAX_FAMILY: tuple[KernelSpec, ...] = tuple(
    KernelSpec("softmax", block, warps)
    for block in (128, 256, 512, 1024, 2048)
    for warps in (1, 2, 4, 8)
)
"""20 row-softmax variants, as an autotuned softmax leaves in a real cache."""

MATMUL_FAMILY: tuple[KernelSpec, ...] = tuple(
    KernelSpec("matmul", tiles=(block_m, block_n, block_k, 8), num_warps=warps, num_stages=stages)
    for block_m, block_n, block_k, stages, warps in (
        (128, 256, 64, 3, 8), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2),
        (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (256, 64, 128, 4, 4), (64, 256, 128, 4, 4),
        (128, 128, 128, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 32, 64, 4, 4),
    )
)  # fmt: skip
"""The 16 configs that Triton's matmul tutorial autotunes on CUDA, as (BLOCK_M, BLOCK_N, BLOCK_K,
GROUP_M) with num_warps and num_stages: what one tuned GEMM shape leaves in a real cache.

The autotuner compiles every config before timing it, so all 16 are cached, also the ones whose
shared memory exceeds the GPU's and which it then drops at launch.
"""


@dataclass(frozen=True, slots=True)
class CompileReport:
    """What a compile of the kernels did: how many ran Triton's pipeline, how many hit the cache.

    The seconds the subprocess spent importing Triton, computing ``triton_key()`` (a hash of
    Triton itself, once per process before any cache lookup) and on the kernels are there for
    the benchmarks; they take no part in equality.
    """

    compiled: int
    cache_hits: int
    import_s: float = field(default=0.0, compare=False)
    key_s: float = field(default=0.0, compare=False)
    kernels_s: float = field(default=0.0, compare=False)
    kernel_s: tuple[float, ...] = field(default=(), compare=False)
    """The seconds of each compile, arch by arch and spec by spec, in the order asked."""


def build_triton_cache(
    cache_dir: Path, *, archs: tuple[int, ...] = ARCHS, kernels: tuple[str, ...] = KERNELS
) -> None:
    """AOT-compile every kernel for every CUDA arch into ``cache_dir``, in a subprocess."""
    report = _run(cache_dir, archs, kernels)
    if report.compiled + report.cache_hits != len(archs) * len(kernels):
        raise AssertionError(f"compiled {report} for {len(archs) * len(kernels)} kernels")


def compile_again(
    cache_dir: Path,
    *,
    archs: tuple[int, ...] = ARCHS,
    kernels: tuple[str, ...] = KERNELS,
    wrapper: Sequence[str] = (),
) -> CompileReport:
    """Compile the same kernels with ``TRITON_CACHE_DIR=cache_dir`` in a fresh subprocess.

    ``compiled`` counts compiles in which Triton's pipeline really ran: the CUDA backend's
    ``add_stages`` is wrapped so that every stage it registers counts its runs, and a compile is
    real when its final stage (``cubin``) ran. A cache hit returns before ``add_stages`` is called.

    `wrapper` prefixes the command (e.g. ``unshare -m ... sh -c 'mount ...; exec "$@"' sh``), so
    the compile can run where `cache_dir` exists only inside the wrapper, as in a container:
    the directory is then neither made nor resolved here.
    """
    return _run_specs(
        cache_dir, archs, tuple(KernelSpec(kernel) for kernel in kernels), wrapper=wrapper
    )


def compile_specs(
    cache_dir: Path, specs: tuple[KernelSpec, ...], *, archs: tuple[int, ...] = (90,)
) -> CompileReport:
    """Compile `specs` for every arch with ``TRITON_CACHE_DIR=cache_dir``, in a fresh interpreter.

    What `build_triton_cache` and `compile_again` do for the plain kernels, for any set of
    variants: the first call into an empty directory compiles them all, a later one hits.
    """
    return _run_specs(cache_dir, archs, specs)


def group_dirs(cache_dir: Path) -> set[str]:
    """The names of the group directories directly under a Triton cache directory."""
    return {p.name for p in cache_dir.iterdir() if p.is_dir()}


# -- hand-made caches: the shape of Triton's, no compiler needed ----------------------------


# The stages a hand-made kernel group has files for, in the order they are written.
STAGES = ("source", "ttir", "ttgir", "llir", "ptx", "cubin")


def write_group(
    cache: Path,
    kernel: str,
    arch: int,
    *,
    compiled_at: Path | None = None,
    order: tuple[str, ...] = STAGES,
) -> Path:
    """A Triton kernel group whose __grp__ file holds absolute paths of `compiled_at`."""
    digest = hashlib.sha256(f"{kernel}/{arch}".encode()).hexdigest()
    group = cache / group_dir_name(digest)
    group.mkdir(parents=True)
    where = (compiled_at or cache) / group.name
    meta = {
        "hash": digest,
        "name": kernel,
        "num_warps": 4,
        "target": {"backend": "cuda", "arch": arch, "warp_size": 32},
        "triton_version": "3.9.0",
    }
    children = {f"{kernel}.json": f"{where}/{kernel}.json"}
    for ext in order:
        (group / f"{kernel}.{ext}").write_bytes(f"{kernel}.{ext} for sm_{arch}\n".encode() * 40)
        children[f"{kernel}.{ext}"] = f"{where}/{kernel}.{ext}"
    (group / f"{kernel}.json").write_text(json.dumps(meta))
    (group / f"__grp__{kernel}.json").write_text(json.dumps({"child_paths": children}))
    return group


def write_cache(root: Path, *, order: tuple[str, ...] = STAGES) -> Path:
    """A small hand-made Triton cache in `root`: add for sm_80 and sm_90, scale for sm_90."""
    write_group(root, "add", 80, order=order)
    write_group(root, "add", 90, order=order)
    write_group(root, "scale", 90, order=order)
    return root


def _kernel_dir() -> Path:
    digest = hashlib.sha256(KERNEL_SOURCE.encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / f"gpufleet-kcache-kernels-{digest}"
    module = directory / f"{_MODULE}.py"
    if not module.is_file() or module.read_text() != KERNEL_SOURCE:
        directory.mkdir(exist_ok=True)
        # Written aside and renamed, so a concurrent test never imports half a file.
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            out.write(KERNEL_SOURCE)
        os.replace(tmp, module)
    return directory


def _run(cache_dir: Path, archs: tuple[int, ...], kernels: tuple[str, ...]) -> CompileReport:
    return _run_specs(cache_dir, archs, tuple(KernelSpec(kernel) for kernel in kernels))


def _run_specs(
    cache_dir: Path,
    archs: tuple[int, ...],
    specs: tuple[KernelSpec, ...],
    *,
    wrapper: Sequence[str] = (),
) -> CompileReport:
    unknown = {spec.kernel for spec in specs} - set(_SIGNATURES)
    if unknown:
        raise ValueError(f"no such test kernels: {sorted(unknown)}")
    compiles = [[s.kernel, s.constexprs(), s.options()] for s in specs]
    if not wrapper:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_dir = cache_dir.resolve()
    # Triton folds some TRITON_* variables into its cache key, and others redirect the cache:
    # none of the caller's may leak in, or a build and a later compile would disagree.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # set explicitly: silences Triton's warning about it
    request = {
        "kernel_dir": str(_kernel_dir()),
        "archs": list(archs),
        "specs": compiles,
    }
    done = subprocess.run(
        [*wrapper, sys.executable, __file__, json.dumps(request)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"compiling test kernels failed ({done.returncode}):\n{done.stderr}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return CompileReport(
        compiled=report["compiled"], cache_hits=report["cache_hits"],
        import_s=report["import_s"], key_s=report["key_s"], kernels_s=report["kernels_s"],
        kernel_s=tuple(report["kernel_s"]),
    )  # fmt: skip


def _compile_in_this_process(request: dict[str, Any]) -> dict[str, Any]:
    """The subprocess side: compile, counting the stage runs of every real compile."""
    import importlib
    import time

    started = time.perf_counter()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.cache import triton_key

    imported = time.perf_counter()
    triton_key()  # cached: the first compile would compute it, hit or miss
    keyed = time.perf_counter()

    runs: dict[str, int] = {}
    original = CUDABackend.add_stages

    def counting_add_stages(self: Any, stages: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        original(self, stages, *args, **kwargs)
        for name, stage in list(stages.items()):
            stages[name] = _counted(name, stage, runs)

    CUDABackend.add_stages = counting_add_stages  # type: ignore[method-assign]
    sys.path.insert(0, request["kernel_dir"])
    module = importlib.import_module(_MODULE)
    kernel_s: list[float] = []
    for arch in request["archs"]:
        for kernel, constexprs, options in request["specs"]:
            fn = getattr(module, kernel)
            source = ASTSource(
                fn=fn,
                signature=_SIGNATURES[kernel],
                constexprs={**_FIXED_CONSTEXPRS.get(kernel, {}), **constexprs},
                attrs={
                    (fn.arg_names.index(name),): [["tt.divisibility", 16]]
                    for name in _DIVISIBLE_BY_16.get(kernel, ())
                },
            )
            start = time.perf_counter()
            triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE), options=options)
            kernel_s.append(time.perf_counter() - start)
    calls = len(kernel_s)
    compiled = runs.get("cubin", 0)
    if runs.get("ttir", 0) != compiled:
        raise RuntimeError(f"partial pipelines ran: {runs}")
    return {
        "compiled": compiled,
        "cache_hits": calls - compiled,
        "import_s": imported - started,
        "key_s": keyed - imported,
        "kernels_s": time.perf_counter() - keyed,
        "kernel_s": kernel_s,
    }


def _counted(name: str, stage: Any, runs: dict[str, int]) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        runs[name] = runs.get(name, 0) + 1
        return stage(*args, **kwargs)

    return run


if __name__ == "__main__":
    print(json.dumps(_compile_in_this_process(json.loads(sys.argv[1]))))
