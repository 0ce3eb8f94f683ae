"""Which GPUs a kernel cache can serve: MCV's rule, with the reason for every verdict.

A GPU matches a cache when some target of the cache has the GPU's backend, its
arch (CUDA: compute capability major*10+minor) and its warp size. A kernel
compiled for sm_80 is not used on sm_90 by Triton (the cache key holds the
target), so "newer GPU" is not "compatible".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gpufleet.gpu.model import GpuDevice
from gpufleet.kcache.model import CacheSummary, Target

__all__ = ["CUDA_WARP_SIZE", "GpuVerdict", "check", "gpu_target", "target_text"]

CUDA_WARP_SIZE = 32


def gpu_target(device: GpuDevice) -> Target | None:
    """The Triton target of an NVIDIA GPU; None when its compute capability is unknown."""
    if device.compute_capability is None:
        return None
    major, minor = device.compute_capability
    return Target("cuda", major * 10 + minor, CUDA_WARP_SIZE)


def target_text(target: Target) -> str:
    """``cuda/90/32``: backend, arch, warp size."""
    return f"{target.backend}/{target.arch}/{target.warp_size}"


@dataclass(frozen=True, slots=True)
class GpuVerdict:
    """Whether one GPU can use the cache, and why."""

    index: int
    uuid: str
    name: str
    target: Target | None
    matches: bool
    reason: str


def check(summary: CacheSummary, devices: Iterable[GpuDevice]) -> list[GpuVerdict]:
    """A verdict per GPU, in the order given."""
    have = ", ".join(target_text(t) for t in summary.targets) or "none"
    verdicts: list[GpuVerdict] = []
    for device in devices:
        target = gpu_target(device)
        if target is None:
            matches, reason = False, "the driver does not report this GPU's compute capability"
        elif target in summary.targets:
            matches, reason = True, f"cache has {target_text(target)}"
        else:
            matches, reason = False, _why_not(target, summary.targets, have)
        verdicts.append(
            GpuVerdict(device.index, device.uuid, device.product_name, target, matches, reason)
        )
    return verdicts


def _why_not(target: Target, targets: tuple[Target, ...], have: str) -> str:
    same_backend = [t for t in targets if t.backend == target.backend]
    if not same_backend:
        return f"no {target.backend} kernels in the cache (cache has: {have})"
    same_arch = [t for t in same_backend if t.arch == target.arch]
    if not same_arch:
        return f"no kernels for {target.backend} arch {target.arch} (cache has: {have})"
    return f"no kernels for warp size {target.warp_size} (cache has: {have})"
