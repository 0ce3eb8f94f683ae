"""Triton's kernel groups: the group directory's name and the ``__grp__`` files' child paths.

Triton files each kernel under ``base32(hash)/`` (`group_dir_name`), beside a
``__grp__<kernel>.json`` whose ``child_paths`` map each file of the group to an
absolute path. Those paths are the build machine's, so they are rewritten twice:
relative to the cache root when an image is packed (`stored_child_paths`), and under
the mount root pods see when it is extracted or derived for another root
(`mounted_child_paths`). Both check every child (`child_paths`) and write the same
bytes for the same input. The cache walker (`kcache.format`) checks a source cache's
group files with the same rules. The mount root itself must be an absolute, normalized
path (`check_mount_root`), since it is pasted into every rewritten child path. See
docs/kcache-format.md.
"""

from __future__ import annotations

import base64
import json
import posixpath
import re
from pathlib import PurePosixPath
from typing import Any

from gpufleet.kcache.errors import CacheFormatError

__all__ = [
    "GROUP_PREFIX",
    "check_mount_root",
    "child_paths",
    "group_dir_name",
    "is_group_file",
    "mounted_child_paths",
    "stored_child_paths",
]

GROUP_PREFIX = "__grp__"
"""The name prefix of a group's child-path file: ``__grp__<kernel>.json``."""

_HASH = re.compile(r"[0-9a-f]{64}")


def is_group_file(name: str) -> bool:
    """Whether a file name is a Triton group file (``__grp__<kernel>.json``)."""
    return name.startswith(GROUP_PREFIX) and name.endswith(".json")


def check_mount_root(mount_root: str) -> str:
    """``mount_root`` if it is an absolute, normalized POSIX path; CacheFormatError otherwise."""
    if (
        not mount_root.startswith("/")
        or "\x00" in mount_root
        or posixpath.normpath(mount_root) != mount_root
        or mount_root.startswith("//")
    ):
        raise CacheFormatError(
            f"mount root {mount_root!r}: an absolute, normalized path is needed (no '..', no '//')"
        )
    return mount_root


def _plain_name(key: object, where: str) -> str:
    if not isinstance(key, str) or key in ("", ".", "..") or any(c in key for c in "/\\\0"):
        raise CacheFormatError(f"{where}: child {key!r} is not a plain file name")
    return key


def child_paths(data: Any, *, where: str, group: str) -> dict[str, str]:
    """The child map of a parsed ``__grp__`` file, each child checked to live in ``group``.

    ``group`` is the group directory's own name, ``where`` names the file in errors;
    `CacheFormatError` unless `data` is ``{"child_paths": {...}}`` whose every child is a
    plain file name pointing into ``group``.
    """
    if not isinstance(data, dict) or set(data) != {"child_paths"}:
        raise CacheFormatError(f"{where}: must be a JSON object holding only 'child_paths'")
    children = data["child_paths"]
    if not isinstance(children, dict) or not children:
        raise CacheFormatError(f"{where}: 'child_paths' must be a non-empty object")
    checked: dict[str, str] = {}
    for key, value in children.items():
        name = _plain_name(key, where)
        path = PurePosixPath(value) if isinstance(value, str) and "\0" not in value else None
        if path is None or path.name != name or path.parent.name != group:
            raise CacheFormatError(
                f"{where}: child {name!r} points outside its group {group}: {value!r}"
            )
        checked[name] = value
    return checked


def _group_path(group: str) -> PurePosixPath:
    parts = group.split("/")
    if group.startswith("/") or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise CacheFormatError(f"group {group!r}: must be a relative path inside the cache")
    return PurePosixPath(group)


def _rewrite(data: bytes, group: str, prefix: str, where: str | None) -> bytes:
    path = _group_path(group)
    where = where or f"{group}/{GROUP_PREFIX}*.json"
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise CacheFormatError(f"{where}: is not valid JSON: {exc}") from exc
    children = child_paths(parsed, where=where, group=path.name)
    rewritten = {name: f"{prefix}{path}/{name}" for name in sorted(children)}
    # Sorted keys and compact separators: the same input always gives the same bytes.
    doc = json.dumps({"child_paths": rewritten}, sort_keys=True, separators=(",", ":"))
    return doc.encode("ascii")


def group_dir_name(hash_hex: str) -> str:
    """The directory Triton files a kernel under: ``base32(bytes.fromhex(hash))`` without padding.

    This mirrors ``triton/runtime/cache.py::_base32`` (Triton 3.x): the digest's bytes are encoded,
    not its hex text, and the ``=`` padding is stripped, giving 52 characters.
    """
    if not _HASH.fullmatch(hash_hex):
        raise CacheFormatError(f"hash {hash_hex!r}: is not a lowercase sha256 hex digest")
    return base64.b32encode(bytes.fromhex(hash_hex)).decode("ascii").rstrip("=")


def stored_child_paths(data: bytes, *, group: str, where: str | None = None) -> bytes:
    """A ``__grp__`` file's bytes with each child path made ``<group>/<file>``.

    ``group`` is the group directory relative to the cache root (``<name>`` for a plain Triton
    cache, ``torch_compile_cache/…/triton_cache/<name>`` when nested). ``where`` names the file in
    error messages. Children that are not plain file names, or that point into another group, are
    refused with `CacheFormatError`.
    """
    return _rewrite(data, group, "", where)


def mounted_child_paths(
    data: bytes, *, group: str, mount_root: str, where: str | None = None
) -> bytes:
    """A ``__grp__`` file's bytes with each child path made ``<mount_root>/<group>/<file>``.

    ``mount_root`` is the absolute path at which pods see the cache root. Checks as in
    `stored_child_paths`.
    """
    parts = mount_root.split("/")
    if not mount_root.startswith("/") or any(p in (".", "..") or "\0" in p for p in parts):
        raise CacheFormatError(f"mount root {mount_root!r}: must be an absolute, normalized path")
    prefix = "/".join(p for p in parts if p)
    return _rewrite(data, group, f"/{prefix}/" if prefix else "/", where)
