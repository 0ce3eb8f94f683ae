"""Detect, walk and strictly validate Triton, vLLM and Inductor JIT cache directories.

One walker follows the layout of each kind (see ``docs/kcache-format.md``). It yields the regular
files to pack, the ``__grp__`` files whose child paths must be rewritten, and the kernels found in
every Triton cache nested inside, from which the summary is drawn. Anything outside the known layout
is refused unless ``allow_unknown``; symbolic links, devices, FIFOs and sockets are always refused.
What a ``__grp__`` file holds, and how its child paths are rewritten, is `kcache.groups`' job.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from gpufleet.kcache.errors import CacheFormatError
from gpufleet.kcache.groups import GROUP_PREFIX, child_paths, group_dir_name
from gpufleet.kcache.model import CacheKind, CacheSummary, Target

__all__ = [
    "TRITON_FILE_KINDS",
    "CacheScan",
    "cache_files",
    "detect",
    "scan",
    "summarize",
]

TRITON_FILE_KINDS = frozenset(
    {"json", "source", "ttir", "ttgir", "glir", "llir", "ptx", "cubin", "amdgcn", "hsaco"}
)
"""Extensions Triton 3.x writes into a kernel group: the CUDA and ROCm stages plus Gluon's glir."""

_GROUP_NAME = re.compile(r"[A-Z2-7]{52}")  # base32 of 32 bytes, padding stripped
_HASH = re.compile(r"[0-9a-f]{64}")
_EXTENSION_MODULE = re.compile(r"[A-Za-z_]\w*(\.[\w-]+)*\.so")
_INDUCTOR_CODE_DIR = re.compile(r"[a-z0-9]{2}")
_INDUCTOR_CODE_KINDS = frozenset(
    {"py", "cpp", "h", "so", "o", "cubin", "hsaco", "ptx", "json", "best_config", "txt"}
)
_INDUCTOR_STORES = frozenset({"fxgraph", "aotautograd", "locks", "cache", "dynamo"})
_VLLM_HASH = re.compile(r"[0-9a-f]{8,64}")
_VLLM_RANK = re.compile(r"rank_\d+_\d+")
_VLLM_PREFIX = re.compile(r"[A-Za-z_]\w*")
_VLLM_FILES = frozenset({"computation_graph.py", "vllm_compile_cache.py", "transformed_code.py"})
_NAME_LIMIT = 150  # Triton cuts kernel file names to this many characters


@dataclass(frozen=True, slots=True)
class CacheScan:
    """Everything one walk of a cache learns: what to pack, what to rewrite, what it holds."""

    summary: CacheSummary
    files: tuple[Path, ...]
    """Every regular file to pack, relative to the root, sorted."""
    group_files: tuple[Path, ...]
    """The validated ``__grp__`` files (a subset of ``files``) whose child paths need rewriting."""


@dataclass(frozen=True, slots=True)
class _Kernel:
    name: str
    target: Target
    triton_version: str | None


@dataclass
class _Walker:
    root: Path
    allow_unknown: bool
    files: dict[PurePosixPath, int] = field(default_factory=dict)
    group_files: list[PurePosixPath] = field(default_factory=list)
    kernels: list[_Kernel] = field(default_factory=list)

    # -- primitives -------------------------------------------------------------------------

    def children(self, rel: PurePosixPath) -> tuple[dict[str, int], list[str]]:
        """Regular files (name -> size) and directories directly under ``rel``; refuses the rest."""
        files: dict[str, int] = {}
        dirs: list[str] = []
        try:
            with os.scandir(self.root / rel) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise CacheFormatError(f"{_show(rel)}: cannot be read: {exc.strerror}") from exc
        for entry in entries:
            try:
                mode = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise CacheFormatError(f"{rel / entry.name}: cannot stat: {exc.strerror}") from exc
            if stat.S_ISLNK(mode.st_mode):
                # A link could point anywhere on the build machine; packing it is never safe.
                raise CacheFormatError(f"{rel / entry.name}: is a symbolic link; refused")
            if stat.S_ISDIR(mode.st_mode):
                dirs.append(entry.name)
            elif stat.S_ISREG(mode.st_mode):
                files[entry.name] = mode.st_size
            else:
                raise CacheFormatError(
                    f"{rel / entry.name}: is a device, FIFO or socket, not a regular file; refused"
                )
        return files, dirs

    def take(self, rel: PurePosixPath, size: int) -> None:
        self.files[rel] = size

    def take_all(self, rel: PurePosixPath) -> None:
        """Accept every regular file below ``rel`` (a store whose insides we do not parse)."""
        files, dirs = self.children(rel)
        for name, size in files.items():
            self.take(rel / name, size)
        for name in dirs:
            self.take_all(rel / name)

    def unknown(self, rel: PurePosixPath, why: str, *, size: int | None = None) -> None:
        """Something outside the known layout: an error, or packed as-is with ``allow_unknown``."""
        if not self.allow_unknown:
            raise CacheFormatError(f"{rel}: {why} (--allow-unknown packs it anyway)")
        if size is None:
            self.take_all(rel)
        else:
            self.take(rel, size)

    def read_json(self, rel: PurePosixPath) -> Any:
        try:
            return json.loads((self.root / rel).read_bytes())
        except (OSError, ValueError) as exc:
            raise CacheFormatError(f"{rel}: is not valid JSON: {exc}") from exc

    # -- Triton -----------------------------------------------------------------------------

    def triton_cache(self, rel: PurePosixPath) -> None:
        files, dirs = self.children(rel)
        for name, size in files.items():
            self.unknown(rel / name, "a file outside any Triton kernel group", size=size)
        for name in dirs:
            if _GROUP_NAME.fullmatch(name):
                self.triton_group(rel / name)
            else:
                self.unknown(rel / name, "not a Triton group directory (base32 of a sha256)")

    def triton_group(self, rel: PurePosixPath) -> None:
        files, dirs = self.children(rel)
        for name in dirs:
            why = (
                "a temporary directory left by an interrupted Triton write"
                if name.startswith("tmp.pid_")
                else "a directory inside a Triton kernel group"
            )
            self.unknown(rel / name, why)
        metas = [
            n
            for n in files
            if n.endswith(".json") and not n.startswith(GROUP_PREFIX) and ".autotune." not in n
        ]
        grps = [n for n in files if n.startswith(GROUP_PREFIX)]
        if metas or grps:
            self.kernel_group(rel, files, metas, grps)
            return
        # Groups without kernel metadata: the autotuner's timings and compiled launcher modules.
        for name, size in files.items():
            if name.endswith(".autotune.json"):
                if not isinstance(self.read_json(rel / name), dict):
                    raise CacheFormatError(f"{rel / name}: is not a JSON object")
                self.take(rel / name, size)
            elif _EXTENSION_MODULE.fullmatch(name):
                self.take(rel / name, size)
            else:
                self.unknown(rel / name, "not a file Triton writes into a group", size=size)

    def kernel_group(
        self, rel: PurePosixPath, files: dict[str, int], metas: list[str], grps: list[str]
    ) -> None:
        if len(metas) != 1:
            listed = ", ".join(metas) or "none"
            raise CacheFormatError(f"{rel}: needs exactly one kernel JSON, found {listed}")
        meta = metas[0]
        stem = meta.removesuffix(".json")
        grp = f"{GROUP_PREFIX}{meta}"
        if grps != [grp]:
            raise CacheFormatError(f"{rel}: needs exactly {grp} beside {meta}, found {grps}")
        kernel = _kernel(self.read_json(rel / meta), rel / meta, group=rel.name, stem=stem)
        children = child_paths(self.read_json(rel / grp), where=str(rel / grp), group=rel.name)
        if meta not in children:
            raise CacheFormatError(f"{rel / grp}: does not list the kernel metadata {meta}")
        for child in children:
            if child not in files:
                # Triton drops the whole group when one child is missing: a silent miss.
                raise CacheFormatError(f"{rel / grp}: child {child!r} is not in the group")
        for name, size in files.items():
            head, dot, ext = name.rpartition(".")
            if name == grp or (dot and head == stem and ext in TRITON_FILE_KINDS):
                self.take(rel / name, size)
            else:
                self.unknown(rel / name, f"not a file of kernel {stem!r}", size=size)
        self.group_files.append(rel / grp)
        self.kernels.append(kernel)

    # -- Inductor ---------------------------------------------------------------------------

    def inductor(self, rel: PurePosixPath) -> None:
        files, dirs = self.children(rel)
        for name, size in files.items():
            self.unknown(rel / name, "a file at the top of an Inductor cache", size=size)
        for name in dirs:
            if name == "triton":
                self.inductor_triton(rel / name)
            elif name in _INDUCTOR_STORES:
                self.take_all(rel / name)
            elif _INDUCTOR_CODE_DIR.fullmatch(name):
                self.inductor_code(rel / name)
            else:
                self.unknown(rel / name, "not part of an Inductor cache")

    def inductor_triton(self, rel: PurePosixPath) -> None:
        files, dirs = self.children(rel)
        for name, size in files.items():
            self.unknown(rel / name, "a file beside Inductor's per-device Triton caches", size=size)
        for name in dirs:
            if name.isdigit():
                self.triton_cache(rel / name)
            else:
                self.unknown(rel / name, "not a device index directory")

    def inductor_code(self, rel: PurePosixPath) -> None:
        files, dirs = self.children(rel)
        for name in dirs:
            self.unknown(rel / name, "a directory among Inductor's generated code")
        for name, size in files.items():
            if not name.startswith(".") and name.rpartition(".")[2] in _INDUCTOR_CODE_KINDS:
                self.take(rel / name, size)
            else:
                self.unknown(rel / name, "not a kind of file Inductor generates", size=size)

    # -- vLLM -------------------------------------------------------------------------------

    def vllm(self, rel: PurePosixPath) -> None:
        files, dirs = self.children(rel)
        if "torch_compile_cache" not in dirs:
            self.vllm_compile_cache(rel, files, dirs)
            return
        # The root is VLLM_CACHE_ROOT itself.
        for name, size in files.items():
            self.unknown(rel / name, "not part of vLLM's compile cache", size=size)
        for name in dirs:
            if name == "torch_compile_cache":
                self.vllm_compile_cache(rel / name, *self.children(rel / name))
            elif name == "modelinfos":
                self.json_files(rel / name)
            else:
                self.unknown(rel / name, "not part of vLLM's compile cache")

    def vllm_compile_cache(
        self, rel: PurePosixPath, files: dict[str, int], dirs: list[str]
    ) -> None:
        for name, size in files.items():
            self.unknown(rel / name, "a file beside vLLM's hash directories", size=size)
        for name in dirs:
            if name == "torch_aot_compile":
                self.vllm_hashes(rel / name, aot=True)
            elif _VLLM_HASH.fullmatch(name):
                self.vllm_ranks(rel / name, aot=False)
            else:
                self.unknown(rel / name, "not a vLLM cache hash directory")

    def vllm_hashes(self, rel: PurePosixPath, *, aot: bool) -> None:
        files, dirs = self.children(rel)
        for name, size in files.items():
            self.unknown(rel / name, "a file beside vLLM's hash directories", size=size)
        for name in dirs:
            if _VLLM_HASH.fullmatch(name):
                self.vllm_ranks(rel / name, aot=aot)
            else:
                self.unknown(rel / name, "not a vLLM cache hash directory")

    def vllm_ranks(self, rel: PurePosixPath, *, aot: bool) -> None:
        files, dirs = self.children(rel)
        for name, size in files.items():
            self.unknown(rel / name, "a file beside vLLM's rank directories", size=size)
        for name in dirs:
            if not _VLLM_RANK.fullmatch(name):
                self.unknown(rel / name, "not a vLLM rank directory (rank_<r>_<dp>)")
            elif aot:
                self.take_all(rel / name)  # the AOT-compiled model blob, opaque to us
            else:
                self.vllm_compile_dir(rel / name, prefixes=True)

    def vllm_compile_dir(self, rel: PurePosixPath, *, prefixes: bool) -> None:
        files, dirs = self.children(rel)
        for name, size in files.items():
            if name == "cache_key_factors.json":
                if not isinstance(self.read_json(rel / name), dict):
                    raise CacheFormatError(f"{rel / name}: is not a JSON object")
                self.take(rel / name, size)
            elif name in _VLLM_FILES or name.startswith("artifact_"):
                self.take(rel / name, size)
            else:
                self.unknown(rel / name, "not a file vLLM writes into its cache", size=size)
        for name in dirs:
            if name == "triton_cache":
                self.triton_cache(rel / name)
            elif name == "inductor_cache" or name.startswith("artifact_"):
                self.inductor(rel / name)  # an unpacked standalone artifact is an Inductor cache
            elif prefixes and _VLLM_PREFIX.fullmatch(name):
                self.vllm_compile_dir(rel / name, prefixes=False)
            else:
                self.unknown(rel / name, "not part of a vLLM compile directory")

    def json_files(self, rel: PurePosixPath) -> None:
        files, dirs = self.children(rel)
        for name in dirs:
            self.unknown(rel / name, "a directory where only JSON files belong")
        for name, size in files.items():
            if name.endswith(".json"):
                self.read_json(rel / name)
                self.take(rel / name, size)
            else:
                self.unknown(rel / name, "not a JSON file", size=size)


def _show(rel: PurePosixPath) -> str:
    return "the cache root" if rel == PurePosixPath() else str(rel)


def _kernel(data: Any, rel: PurePosixPath, *, group: str, stem: str) -> _Kernel:
    """The kernel a group's metadata JSON describes, after checking what Triton relies on."""
    if not isinstance(data, dict):
        raise CacheFormatError(f"{rel}: is not a JSON object")
    digest = data.get("hash")
    if not isinstance(digest, str) or not _HASH.fullmatch(digest):
        raise CacheFormatError(f"{rel}: field 'hash' is missing or not a sha256 hex digest")
    expected = group_dir_name(digest)
    if group != expected:
        raise CacheFormatError(
            f"{rel}: its group directory is {group} but base32 of its hash is {expected}"
        )
    target = data.get("target")
    if not isinstance(target, dict):
        raise CacheFormatError(f"{rel}: field 'target' is missing or not an object")
    backend, arch, warp_size = (target.get(k) for k in ("backend", "arch", "warp_size"))
    if not isinstance(backend, str) or not backend:
        raise CacheFormatError(f"{rel}: field 'target.backend' is missing or not a string")
    arch_ok = isinstance(arch, int) if backend == "cuda" else isinstance(arch, int | str)
    if not arch_ok or isinstance(arch, bool) or arch in ("", None):
        raise CacheFormatError(f"{rel}: field 'target.arch' is missing or malformed: {arch!r}")
    if not isinstance(warp_size, int) or isinstance(warp_size, bool) or warp_size <= 0:
        raise CacheFormatError(f"{rel}: field 'target.warp_size' is missing or malformed")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise CacheFormatError(f"{rel}: field 'name' is missing or not a string")
    if stem != name[:_NAME_LIMIT]:
        raise CacheFormatError(f"{rel}: describes kernel {name!r}, not {stem!r}")
    version = data.get("triton_version")
    if version is not None and not isinstance(version, str):
        raise CacheFormatError(f"{rel}: field 'triton_version' is not a string")
    assert isinstance(arch, int | str)  # narrowed by arch_ok, for mypy
    return _Kernel(name, Target(backend, arch, warp_size), version)


def _target_order(target: Target) -> tuple[str, int, str, int]:
    # Target's own ordering would compare an int arch with a str arch and fail.
    arch = target.arch
    return (target.backend, arch if isinstance(arch, int) else -1, str(arch), target.warp_size)


def detect(root: Path) -> CacheKind:
    """Which kind of JIT cache ``root`` is, judged by its top level; validates nothing."""
    if not root.is_dir():
        raise CacheFormatError(f"{root}: is not a directory")
    names = {p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()}
    if "torch_compile_cache" in names or "torch_aot_compile" in names:
        return CacheKind.VLLM
    if any(
        _VLLM_HASH.fullmatch(n) and any(_VLLM_RANK.fullmatch(r.name) for r in (root / n).iterdir())
        for n in names
    ):
        return CacheKind.VLLM
    if names & {"triton", "fxgraph", "aotautograd"} or any(
        _INDUCTOR_CODE_DIR.fullmatch(n) for n in names
    ):
        return CacheKind.INDUCTOR
    if any(_GROUP_NAME.fullmatch(n) for n in names):
        return CacheKind.TRITON
    raise CacheFormatError(
        f"{root}: is not a Triton, vLLM or Inductor cache: found no kernel group directories, "
        "no Inductor cache directories (triton/, fxgraph/, aotautograd/) and no vLLM "
        "torch_compile_cache"
    )


def scan(root: Path, *, kind: CacheKind | None = None, allow_unknown: bool = False) -> CacheScan:
    """Walk and validate ``root`` once: its summary, the files to pack and the groups to rewrite."""
    kind = kind or detect(root)
    if not root.is_dir():
        raise CacheFormatError(f"{root}: is not a directory")
    walker = _Walker(root, allow_unknown)
    if kind is CacheKind.TRITON:
        walker.triton_cache(PurePosixPath())
    elif kind is CacheKind.INDUCTOR:
        walker.inductor(PurePosixPath())
    else:
        walker.vllm(PurePosixPath())
    kernels = walker.kernels
    summary = CacheSummary(
        kind=kind,
        targets=tuple(sorted({k.target for k in kernels}, key=_target_order)),
        triton_versions=tuple(sorted({k.triton_version for k in kernels if k.triton_version})),
        entry_count=len(kernels),
        size_bytes=sum(walker.files.values()),
        kernel_names=tuple(sorted({k.name for k in kernels})),
    )
    return CacheScan(
        summary=summary,
        files=tuple(Path(p) for p in sorted(walker.files)),
        group_files=tuple(Path(p) for p in sorted(walker.group_files)),
    )


def summarize(
    root: Path, *, kind: CacheKind | None = None, allow_unknown: bool = False
) -> CacheSummary:
    """Validate ``root`` strictly and summarize it; errors name the file (relative to ``root``)."""
    return scan(root, kind=kind, allow_unknown=allow_unknown).summary


def cache_files(
    root: Path, *, kind: CacheKind | None = None, allow_unknown: bool = False
) -> list[Path]:
    """Every regular file to pack, relative to ``root`` and sorted, after the same validation."""
    return list(scan(root, kind=kind, allow_unknown=allow_unknown).files)
