"""How a batch becomes S3 objects: one per (cluster, node), under a deterministic key.

The partition and the time in a key come from the group's first ``read_time``
in UTC, and its name from a hash of the group's readings, so a replayed batch
overwrites exactly the keys it wrote the first time instead of adding objects
(gpuid's time-only keys collided between nodes and never deduplicated).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote

from gpufleet.inventory.exporters.s3.settings import S3Settings, render_partition
from gpufleet.inventory.reading import Reading, batch_hash

__all__ = ["encode_body", "group_by_node", "object_key"]

# Key segments keep these as they are; anything else (a `/` in a cluster name,
# spaces, `=`) is percent-encoded so one value always stays one key segment.
_SAFE_SEGMENT_CHARS = "-._~"


def _compact_time(at: datetime) -> str:
    utc = at.astimezone(UTC)
    return utc.strftime("%Y%m%dT%H%M%S.") + f"{utc.microsecond // 1000:03d}Z"


def _segment(value: str) -> str:
    return quote(value, safe=_SAFE_SEGMENT_CHARS)


def object_key(settings: S3Settings, group: Sequence[Reading]) -> str:
    """The key of the object holding ``group``: readings of one (cluster, node).

    Deterministic: the same readings in the same order always give the same key.
    """
    if not group:
        raise ValueError("an object holds at least one reading")
    first = group[0]
    name = f"{_compact_time(first.read_time)}-{batch_hash(group)[:16]}.json"
    if settings.s3_compress == "gzip":
        name += ".gz"
    parts = [
        settings.s3_prefix,
        render_partition(settings.s3_partition_pattern, first.read_time),
        f"cluster={_segment(first.cluster)}",
        f"node={_segment(first.node)}",
        name,
    ]
    return "/".join(part for part in parts if part)


def group_by_node(batch: Sequence[Reading]) -> list[list[Reading]]:
    """Split a batch into per-(cluster, node) groups, keeping first-seen and reading order."""
    groups: dict[tuple[str, str], list[Reading]] = {}
    for reading in batch:
        groups.setdefault((reading.cluster, reading.node), []).append(reading)
    return list(groups.values())


def encode_body(group: Sequence[Reading], compress: Literal["none", "gzip"]) -> bytes:
    """JSON lines of ``to_dict()``; gzip with a zero mtime so replays are byte-identical."""
    text = "".join(json.dumps(r.to_dict(), separators=(",", ":")) + "\n" for r in group)
    data = text.encode()
    return gzip.compress(data, mtime=0) if compress == "gzip" else data
