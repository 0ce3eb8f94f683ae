"""The dead-letter file: one JSON line per batch a sink refused for good.

Each record names the exporter, the reason, the batch (its key and hash) and
the refused readings. Appends are fsync'd before they return, and a line torn
by a crash before its fsync stays one bad line: the next append starts on a
line of its own. The spool (``spool.py``) decides when a batch moves here and
makes the move survive a kill; this module only reads and writes the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from gpufleet.inventory.reading import Reading

__all__ = ["DeadLetterFile", "dead_letter_record", "record_key"]


def dead_letter_record(
    key: str, batch_hash: str, reason: str, exporter: str, readings: Sequence[Reading]
) -> str:
    """The dead-letter line of batch ``key``: ``readings`` ``exporter`` refused for ``reason``."""
    record = {
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "exporter": exporter,
        "reason": reason,
        "batch": key,
        "batch_hash": batch_hash,
        "readings": [r.to_dict() for r in readings],
    }
    return json.dumps(record, separators=(",", ":"))


def record_key(line: str) -> str:
    """The batch key of a dead-letter line."""
    return str(json.loads(line)["batch"])


class DeadLetterFile:
    """Durable appends to, and look-ups in, one dead-letter file. Methods block (fsync)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, line: str) -> None:
        """Append one record and fsync it."""
        with open(self.path, "a+b") as out:
            out.seek(0, os.SEEK_END)
            # A line torn by a crash before its fsync stays one bad line, not two.
            torn = False
            if out.tell():
                out.seek(-1, os.SEEK_END)
                torn = out.read(1) != b"\n"
            out.write((("\n" if torn else "") + line + "\n").encode())
            out.flush()
            os.fsync(out.fileno())

    def holds(self, key: str) -> bool:
        """Whether the file already has the record of batch ``key``."""
        needle = f'"batch":{json.dumps(key)}'.encode()
        try:
            with open(self.path, "rb") as lines:
                return any(needle in line for line in lines)
        except FileNotFoundError:
            return False
