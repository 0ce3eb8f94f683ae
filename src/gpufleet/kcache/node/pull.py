"""One pull of one digest: the image's labels → compatibility verdicts → the store.

Blocking (the registry client is synchronous): the agent runs it in a worker thread. The
image's labels are kept beside the store (``<store>/images/<hex>.json``) once read, so after a
restart a cache already in the store is served without asking the registry, which may be down.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpufleet.kcache.compat import GpuVerdict, check, target_text
from gpufleet.kcache.errors import KcacheError
from gpufleet.kcache.extract import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES
from gpufleet.kcache.image import DEFAULT_MOUNT_ROOT
from gpufleet.kcache.labels import MOUNT_ROOT_LABEL, summary_from_labels
from gpufleet.kcache.model import CacheSummary
from gpufleet.kcache.node.gpus import NodeGpus
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from gpufleet.kcache.transfer import MAX_CONFIG_BYTES, fetch_image, pull_to_store

__all__ = ["ClientFactory", "PullOutcome", "Puller", "incompatible_message"]

log = logging.getLogger(__name__)

ClientFactory = Callable[[str], RegistryClient]
"""A registry client for one pull from the registry named (its deadline starts now)."""

_HEX = re.compile(r"sha256:([0-9a-f]{64})")
IMAGES = "images"
"""The store's directory of the labels of images pulled (one JSON file per digest)."""


@dataclass(frozen=True, slots=True)
class PullOutcome:
    """What a pull found: the verdicts, and where the cache is unless no GPU can use it."""

    verdicts: tuple[GpuVerdict, ...]
    compatible: bool
    message: str
    mount_root: str | None = None
    size: int | None = None
    path: Path | None = None


def incompatible_message(node: str, summary: CacheSummary, verdicts: tuple[GpuVerdict, ...]) -> str:
    """``no GPU of node X can use it: GPU 0-7 (NVIDIA A100…) is cuda/80/32: …``, grouped."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for verdict in verdicts:
        target = "unknown" if verdict.target is None else target_text(verdict.target)
        groups.setdefault((verdict.name, target, verdict.reason), []).append(verdict.index)
    if not groups:
        have = ", ".join(target_text(t) for t in summary.targets) or "none"
        return f"node {node} has no GPU that can be read (cache has: {have})"
    parts = [
        f"GPU {_ids(ids)} ({name}) is {target}: {reason}"
        for (name, target, reason), ids in groups.items()
    ]
    return f"no GPU of node {node} can use it: " + "; ".join(parts)


def _ids(ids: list[int]) -> str:
    ids = sorted(ids)
    if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(str(i) for i in ids)


class Puller:
    """Pulls digests of cache images into the store for this node's GPUs."""

    def __init__(
        self,
        store: CacheStore,
        gpus: NodeGpus,
        clients: ClientFactory,
        *,
        node_name: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_config_bytes: int = MAX_CONFIG_BYTES,
    ) -> None:
        self.store = store
        self.gpus = gpus
        self._clients = clients
        self._node = node_name
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._max_config_bytes = max_config_bytes

    def pull(self, image: str, digest: str) -> PullOutcome:
        """Check `image` (``repo@digest``) against the GPUs and, if one matches, pull it."""
        reference = Reference.parse(image)
        if reference.digest != digest:
            raise KcacheError(f"{image}: not pinned to {digest}")
        labels = self._known_labels(digest)
        if labels is not None:
            outcome = self._judge(labels, digest)
            if not outcome.compatible or outcome.path is not None:
                return outcome
        with self._clients(reference.registry) as client:
            if labels is None:
                remote = fetch_image(client, reference, max_config_bytes=self._max_config_bytes)
                labels = remote.labels
                self._keep_labels(digest, labels)
            outcome = self._judge(labels, digest)
            if not outcome.compatible:
                return outcome
            assert outcome.mount_root is not None
            pulled = pull_to_store(
                client, reference, self.store, mount_root=outcome.mount_root,
                max_bytes=self._max_bytes, max_entries=self._max_entries,
                max_config_bytes=self._max_config_bytes,
            )  # fmt: skip
        if pulled.extracted:
            log.info(
                "pulled into the store",
                extra={"image": image, "mount_root": pulled.mount_root, "path": str(pulled.path)},
            )
        return PullOutcome(outcome.verdicts, True, "", pulled.mount_root, outcome.size, pulled.path)

    def _judge(self, labels: dict[str, str], digest: str) -> PullOutcome:
        """The verdicts for `labels`; the store path too when the entry is installed already."""
        summary = summary_from_labels(labels)
        verdicts = tuple(check(summary, self.gpus.devices))
        if not any(v.matches for v in verdicts):
            message = incompatible_message(self._node, summary, verdicts)
            return PullOutcome(verdicts, False, message)
        root = labels.get(MOUNT_ROOT_LABEL) or DEFAULT_MOUNT_ROOT
        path = self.store.installed(digest, root)
        return PullOutcome(verdicts, True, "", root, summary.size_bytes, path)

    # The labels beside the store ---------------------------------------------------------

    def _labels_file(self, digest: str) -> Path:
        match = _HEX.fullmatch(digest)
        if match is None:
            raise KcacheError(f"{digest!r}: not a sha256 digest")
        return self.store.root / IMAGES / f"{match.group(1)}.json"

    def _known_labels(self, digest: str) -> dict[str, str] | None:
        path = self._labels_file(digest)
        try:
            labels = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable image labels, reading them again", extra={
                "path": str(path), "error": str(exc),
            })  # fmt: skip
            return None
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            return None
        return labels

    def _keep_labels(self, digest: str, labels: dict[str, str]) -> None:
        path = self._labels_file(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(labels, sort_keys=True))
        os.replace(tmp, path)

    def forget_labels(self, keep: set[str]) -> None:
        """Remove the kept labels of every digest not in `keep` (after GC)."""
        directory = self.store.root / IMAGES
        try:
            files = list(directory.glob("*.json"))
        except OSError:
            return
        for path in files:
            if f"sha256:{path.stem}" not in keep:
                path.unlink(missing_ok=True)
