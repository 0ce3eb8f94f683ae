"""Image config labels: a cache summary written as labels, and read back from them.

Every kernel cache image's config carries MCV's ``cache.triton.image/*``
labels (what MCV and GKM read) and ours (``io.gpufleet.kcache/*``, the whole
`CacheSummary`). `labels_for` writes them; `labels_of` and
`summary_from_labels` read them from any image config, one built by MCV
included. `canonical_json` is the one JSON encoding label values and image
documents share, so the same summary always gives the same bytes. See
docs/kcache-image.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from gpufleet.kcache.errors import CacheFormatError
from gpufleet.kcache.model import CacheKind, CacheSummary, Target

__all__ = [
    "CACHE_SIZE_LABEL",
    "CACHE_TYPE_LABEL",
    "ENTRY_COUNT_LABEL",
    "MCV_SUMMARY_LABEL",
    "MOUNT_ROOT_LABEL",
    "SUMMARY_LABEL",
    "TRITON_VERSION_LABEL",
    "VLLM_CACHE_SIZE_LABEL",
    "VLLM_ENTRY_COUNT_LABEL",
    "VLLM_SUMMARY_LABEL",
    "canonical_json",
    "labels_for",
    "labels_of",
    "summary_from_labels",
    "summary_json",
]

MCV_SUMMARY_LABEL = "cache.triton.image/summary"
ENTRY_COUNT_LABEL = "cache.triton.image/entry-count"
CACHE_SIZE_LABEL = "cache.triton.image/cache-size-bytes"
CACHE_TYPE_LABEL = "io.gpufleet.kcache/cache-type"
SUMMARY_LABEL = "io.gpufleet.kcache/summary"
TRITON_VERSION_LABEL = "io.gpufleet.kcache/triton-version"
MOUNT_ROOT_LABEL = "io.gpufleet.kcache/mount-root"
# MCV labels a vLLM cache's image with these instead of the cache.triton.image/ ones.
VLLM_SUMMARY_LABEL = "cache.vllm.image/summary"
VLLM_ENTRY_COUNT_LABEL = "cache.vllm.image/entry-count"
VLLM_CACHE_SIZE_LABEL = "cache.vllm.image/cache-size-bytes"


def labels_of(config: bytes) -> dict[str, str]:
    """The labels of an image config blob (``config.Labels``); empty when it has none."""
    try:
        doc = json.loads(config)
    except RecursionError:
        raise CacheFormatError("image config: not JSON we read: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CacheFormatError(f"image config: not JSON: {exc}") from exc
    inner = doc.get("config") if isinstance(doc, dict) else None
    labels = inner.get("Labels") if isinstance(inner, dict) else None
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in labels.items()
    ):
        raise CacheFormatError("image config: config.Labels is not a map of strings")
    return dict(labels)


def summary_from_labels(labels: Mapping[str, str]) -> CacheSummary:
    """The cache summary an image's labels declare.

    Our own ``io.gpufleet.kcache/summary`` label is preferred and must agree
    with MCV's entry-count and size labels; an image built by MCV (no label of
    ours) yields a Triton summary from MCV's labels alone, with no kernel
    names or Triton versions, or a vLLM one from MCV's ``cache.vllm.image/*``
    labels (their summary holds the Triton targets of the kernels inside).
    """
    if SUMMARY_LABEL in labels:
        summary = _summary_from_json(labels)
        for key, value in ((ENTRY_COUNT_LABEL, summary.entry_count),
                           (CACHE_SIZE_LABEL, summary.size_bytes)):  # fmt: skip
            if key in labels and _count_label(labels, key) != value:
                raise CacheFormatError(
                    f"label {key}={labels[key]!r} disagrees with {SUMMARY_LABEL} ({value})"
                )
        return summary
    if MCV_SUMMARY_LABEL in labels:
        kind, summary_label, count_label, size_label = (
            CacheKind.TRITON, MCV_SUMMARY_LABEL, ENTRY_COUNT_LABEL, CACHE_SIZE_LABEL,
        )  # fmt: skip
    elif VLLM_SUMMARY_LABEL in labels:
        kind, summary_label, count_label, size_label = (
            CacheKind.VLLM, VLLM_SUMMARY_LABEL, VLLM_ENTRY_COUNT_LABEL, VLLM_CACHE_SIZE_LABEL,
        )  # fmt: skip
    else:
        raise CacheFormatError(
            f"not a kernel cache image: none of the labels {SUMMARY_LABEL}, "
            f"{MCV_SUMMARY_LABEL}, {VLLM_SUMMARY_LABEL}"
        )
    doc = _json_label(labels, summary_label)
    targets = doc.get("targets") if isinstance(doc, dict) else None
    if not isinstance(targets, list):
        raise CacheFormatError(f"label {summary_label}: no 'targets' list")
    return CacheSummary(
        kind=kind,
        targets=_sorted_targets(_mcv_target(item, summary_label) for item in targets),
        triton_versions=(),
        entry_count=_count_label(labels, count_label),
        size_bytes=_count_label(labels, size_label),
        kernel_names=(),
    )


# -- the summary as labels, and back -------------------------------------------------------------


def labels_for(summary: CacheSummary, mount_root: str) -> dict[str, str]:
    """The config labels of an image of a cache with ``summary``, seen by pods at ``mount_root``."""
    mcv_targets = [
        {"backend": t.backend, "arch": str(t.arch), "warp_size": t.warp_size}
        for t in summary.targets
    ]
    return {
        MCV_SUMMARY_LABEL: canonical_json({"targets": mcv_targets}).decode(),
        ENTRY_COUNT_LABEL: str(summary.entry_count),
        CACHE_SIZE_LABEL: str(summary.size_bytes),
        CACHE_TYPE_LABEL: summary.kind.value,
        SUMMARY_LABEL: canonical_json(summary_json(summary)).decode(),
        TRITON_VERSION_LABEL: ",".join(summary.triton_versions),
        MOUNT_ROOT_LABEL: mount_root,
    }


def summary_json(summary: CacheSummary) -> dict[str, object]:
    """A summary as JSON-ready data: the value of our summary label, and `inspect --json`."""
    return {
        "kind": summary.kind.value,
        "targets": [
            {"backend": t.backend, "arch": t.arch, "warp_size": t.warp_size}
            for t in summary.targets
        ],
        "triton_versions": list(summary.triton_versions),
        "entry_count": summary.entry_count,
        "size_bytes": summary.size_bytes,
        "kernel_names": list(summary.kernel_names),
    }


def _summary_from_json(labels: Mapping[str, str]) -> CacheSummary:
    label = SUMMARY_LABEL
    doc = _json_label(labels, label)
    if not isinstance(doc, dict):
        raise CacheFormatError(f"label {label}: not a JSON object")
    try:
        kind = CacheKind(doc["kind"])
        targets = doc["targets"]
        versions = doc["triton_versions"]
        names = doc["kernel_names"]
        counts = doc["entry_count"], doc["size_bytes"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CacheFormatError(f"label {label}: missing or invalid field {exc}") from exc
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise CacheFormatError(f"label {label}: 'targets' is not a list of objects")
    for field, value in (("triton_versions", versions), ("kernel_names", names)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CacheFormatError(f"label {label}: {field!r} is not a list of strings")
    if not all(_is_count(value) for value in counts):
        raise CacheFormatError(f"label {label}: entry_count and size_bytes must be counts")
    return CacheSummary(
        kind=kind,
        targets=_sorted_targets(_target(t, label) for t in targets),
        triton_versions=tuple(sorted(set(versions))),
        entry_count=counts[0],
        size_bytes=counts[1],
        kernel_names=tuple(sorted(set(names))),
    )


def _target(item: dict[str, object], label: str) -> Target:
    backend, arch, warp = item.get("backend"), item.get("arch"), item.get("warp_size")
    if (
        not isinstance(backend, str)
        or not backend
        or isinstance(arch, bool)
        or not isinstance(arch, int | str)
        or arch == ""
        or isinstance(warp, bool)
        or not isinstance(warp, int)
        or warp <= 0
    ):
        raise CacheFormatError(f"label {label}: invalid target {item!r}")
    return Target(backend, arch, warp)


def _mcv_target(item: object, label: str) -> Target:
    """MCV writes arch as a string; a CUDA arch is a number to us (90 for sm_90)."""
    if not isinstance(item, dict):
        raise CacheFormatError(f"label {label}: invalid target {item!r}")
    arch = item.get("arch")
    if isinstance(arch, str) and arch.isascii() and arch.isdigit():
        item = {**item, "arch": int(arch)}
    return _target(item, label)


def _sorted_targets(targets: Iterable[Target]) -> tuple[Target, ...]:
    """Distinct and sorted as `format.scan` sorts them (a str arch never compares with an int)."""

    def key(t: Target) -> tuple[str, int, str, int]:
        return (t.backend, t.arch if isinstance(t.arch, int) else -1, str(t.arch), t.warp_size)

    return tuple(sorted(set(targets), key=key))


def _json_label(labels: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(labels[key])
    except RecursionError:
        raise CacheFormatError(f"label {key}: JSON nested too deeply") from None
    except ValueError as exc:
        raise CacheFormatError(f"label {key}: not JSON: {exc}") from exc


def _count_label(labels: Mapping[str, str], key: str) -> int:
    text = labels.get(key)
    if text is None or not text.isascii() or not text.isdigit():
        raise CacheFormatError(f"label {key}: missing or not a non-negative integer ({text!r})")
    return int(text)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def canonical_json(doc: object) -> bytes:
    """Sorted keys, no spaces, UTF-8: one byte string per document, whoever serializes it."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
