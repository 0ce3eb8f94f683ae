"""Readings as JSON lines on stdout: data only, never a log line."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import IO

from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.reading import Reading


class StdoutExporter:
    """Writes one compact JSON object per reading per line.

    gpuid logged its readings, which put them on stderr among the logs; here the
    stream is stdout (or any text stream given) and carries nothing else.
    """

    name = "stdout"

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream

    @property
    def stream(self) -> IO[str]:
        # Resolved late so a redirected sys.stdout (tests, CliRunner) is honoured.
        return self._stream if self._stream is not None else sys.stdout

    async def write(self, batch: Sequence[Reading]) -> None:
        """Write the batch as JSON lines and flush, so a pipe sees whole lines."""
        text = "".join(json.dumps(r.to_dict(), separators=(",", ":")) + "\n" for r in batch)
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # closed pipe or closed stream
            raise ExporterError(self.name, f"cannot write to stdout: {exc}") from exc

    async def health(self) -> None:
        """Stdout is healthy while it is open."""
        if self.stream.closed:
            raise ExporterError(self.name, "stdout is closed")

    async def close(self) -> None:
        """Flush; stdout itself belongs to the process, not to us."""
        if not self.stream.closed:
            self.stream.flush()
