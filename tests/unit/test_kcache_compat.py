"""MCV's compatibility rule, with a reason for every verdict."""

from __future__ import annotations

from gpufleet.gpu.model import GpuDevice
from gpufleet.kcache.compat import check, gpu_target
from gpufleet.kcache.model import CacheKind, CacheSummary, Target


def gpu(index: int, capability: tuple[int, int] | None) -> GpuDevice:
    return GpuDevice(
        index=index, uuid=f"GPU-{index}", serial=None, product_name="GPU", pci_bus_id="0",
        compute_capability=capability,
    )  # fmt: skip


def summary(*targets: Target) -> CacheSummary:
    return CacheSummary(CacheKind.TRITON, tuple(sorted(targets)), ("3.9.0",), 1, 10, ("add",))


def test_the_cuda_arch_is_major_times_ten_plus_minor() -> None:
    assert gpu_target(gpu(0, (8, 6))) == Target("cuda", 86, 32)
    assert gpu_target(gpu(0, None)) is None


def test_a_gpu_matches_only_its_exact_arch() -> None:
    verdicts = check(summary(Target("cuda", 80, 32)), [gpu(0, (8, 0)), gpu(1, (9, 0))])
    assert [v.matches for v in verdicts] == [True, False]
    assert verdicts[1].reason == "no kernels for cuda arch 90 (cache has: cuda/80/32)"


def test_the_reason_names_a_backend_or_warp_size_mismatch() -> None:
    (rocm,) = check(summary(Target("hip", "gfx942", 64)), [gpu(0, (9, 0))])
    assert rocm.reason.startswith("no cuda kernels in the cache")
    (warp,) = check(summary(Target("cuda", 90, 64)), [gpu(0, (9, 0))])
    assert warp.reason.startswith("no kernels for warp size 32")


def test_a_gpu_without_a_compute_capability_never_matches() -> None:
    (verdict,) = check(summary(Target("cuda", 90, 32)), [gpu(0, None)])
    assert not verdict.matches
    assert "compute capability" in verdict.reason
