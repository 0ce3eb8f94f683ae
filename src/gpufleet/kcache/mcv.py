"""Images built by MCV (GKM's packer): its layer prefixes, and its kernel-list ``manifest.json``.

MCV packs a Triton cache as ``io.triton.cache/…`` plus
``io.triton.manifest/manifest.json`` and a vLLM cache as ``io.vllm.cache/…``
plus ``io.vllm.manifest/manifest.json``, in one gzip layer. Its manifest is a
list of the kernels, ``{"triton": [{hash, backend, arch, warp_size, …}]}`` or
``{"vllm": [{vllmHash, …}]}``, not a list of files: it names no path, size or
sha256. So an MCV layer is checked by the total bytes of its cache files
against the ``cache-size-bytes`` label (`kcache.extract` does that as it
extracts), and here by what the kernel list says against what the layer
holds. See docs/kcache-image.md.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gpufleet.kcache.errors import CacheFormatError
from gpufleet.kcache.groups import group_dir_name

__all__ = [
    "FAMILIES",
    "Family",
    "check_kernel_list",
    "family_of",
    "is_kernel_list",
]


@dataclass(frozen=True, slots=True)
class Family:
    """One pair of top-level layer directories: the cache files and the manifest beside them."""

    name: str
    """``triton`` or ``vllm``: also the kernel list's key in an MCV manifest."""
    cache_top: str
    manifest_top: str

    @property
    def manifest_path(self) -> str:
        """The one member the manifest directory may hold."""
        return f"{self.manifest_top}/manifest.json"


TRITON = Family("triton", "io.triton.cache", "io.triton.manifest")
VLLM = Family("vllm", "io.vllm.cache", "io.vllm.manifest")
FAMILIES = (TRITON, VLLM)
"""Our own images use the Triton pair for every cache kind; MCV uses the vLLM pair for vLLM."""


def family_of(top: str) -> Family | None:
    """The family whose cache or manifest directory is `top`; None for any other name."""
    for family in FAMILIES:
        if top in (family.cache_top, family.manifest_top):
            return family
    return None


def is_kernel_list(doc: object) -> bool:
    """Whether a parsed ``manifest.json`` is MCV's kernel list rather than our file list."""
    return (
        isinstance(doc, dict)
        and "schemaVersion" not in doc
        and any(family.name in doc for family in FAMILIES)
    )


def check_kernel_list(
    doc: Mapping[str, object],
    family: Family,
    *,
    where: str,
    groups: Collection[str],
    group_files: int,
    hash_dirs: int,
    expected_entries: int | None,
) -> None:
    """Refuse an MCV kernel list that does not describe the layer it came in.

    `groups` are the top-level directories extracted that hold a ``__grp__``
    file, and `group_files` how many such files the layer holds at the top
    level; `hash_dirs` counts the directories under ``torch_compile_cache/``
    (what MCV counts as a vLLM cache's entries). For Triton every listed hash
    must be a distinct sha256 whose group directory (base32 of it) was
    extracted, and the list must have one entry per group; `expected_entries`
    (the image's entry-count label; None skips it) must equal the list's
    length, or for vLLM the hash directories.
    """
    if set(doc) != {family.name}:
        keys = ", ".join(sorted(repr(k) for k in doc)) or "none"
        raise CacheFormatError(
            f"layer: {where} must hold one kernel list, {family.name!r} (it sits in "
            f"{family.manifest_top}/), found the keys {keys}"
        )
    kernels = doc[family.name]
    if not isinstance(kernels, list) or not all(isinstance(k, dict) for k in kernels):
        raise CacheFormatError(f"layer: {where}: {family.name!r} is not a list of objects")
    if family is VLLM:
        if expected_entries is not None and expected_entries != hash_dirs:
            raise CacheFormatError(
                f"layer: {hash_dirs} vLLM hash directories under torch_compile_cache/, "
                f"the image's entry-count label says {expected_entries}"
            )
        return
    seen: set[str] = set()
    for kernel in kernels:
        digest = kernel.get("hash")
        try:
            group = group_dir_name(digest) if isinstance(digest, str) else None
        except CacheFormatError:
            group = None
        if group is None or digest in seen:
            raise CacheFormatError(
                f"layer: {where}: kernel {_short(kernel)} has no sha256 'hash' or repeats one"
            )
        seen.add(str(digest))
        if group not in groups:
            raise CacheFormatError(
                f"layer: {where} lists kernel {digest}, whose group {group}/ (with its "
                "__grp__ file) the layer does not hold"
            )
    if len(kernels) != group_files:
        raise CacheFormatError(
            f"layer: {where} lists {len(kernels)} kernels, the layer holds {group_files} "
            "kernel groups"
        )
    if expected_entries is not None and expected_entries != len(kernels):
        raise CacheFormatError(
            f"layer: {where} lists {len(kernels)} kernels, the image's entry-count label "
            f"says {expected_entries}"
        )


def _short(item: Mapping[str, object]) -> str:
    text = repr(dict(item))
    return text if len(text) <= 120 else text[:117] + "..."
