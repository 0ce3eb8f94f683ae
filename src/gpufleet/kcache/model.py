"""What a kernel cache is, as the rest of the feature sees it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CacheKind(enum.StrEnum):
    """The kind of JIT cache a directory holds."""

    TRITON = "triton"
    """A ``TRITON_CACHE_DIR``: kernel group directories."""
    VLLM = "vllm"
    """vLLM's ``torch_compile_cache/<hash>/rank_<r>_<dp>/`` tree (Inductor and Triton inside)."""
    INDUCTOR = "inductor"
    """A ``TORCHINDUCTOR_CACHE_DIR`` (with its ``triton/`` subtree)."""


@dataclass(frozen=True, slots=True, order=True)
class Target:
    """What a compiled kernel runs on: the compatibility key (MCV's rule)."""

    backend: str
    """``cuda`` or ``hip``."""
    arch: int | str
    """CUDA: compute capability major*10+minor (90 for H100); ROCm: the gfx name."""
    warp_size: int


@dataclass(frozen=True, slots=True)
class CacheSummary:
    """What `format.summarize` learns from a cache directory."""

    kind: CacheKind
    targets: tuple[Target, ...]
    """Sorted and distinct."""
    triton_versions: tuple[str, ...]
    """Sorted and distinct; empty when no kernel records one."""
    entry_count: int
    """Kernel groups (Triton cache entries)."""
    size_bytes: int
    """Sum of the sizes of every regular file in the cache."""
    kernel_names: tuple[str, ...]
    """Sorted and distinct."""
