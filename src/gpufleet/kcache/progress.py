"""Byte progress of a long transfer: a rich bar when stderr is a terminal, nothing otherwise.

Piped or redirected, stderr carries log lines (JSON lines by default) and
nothing may be mixed into them, so the bar is drawn only on a terminal.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from gpufleet.kcache.oci import ProgressCallback

__all__ = ["transfer_progress"]


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


@contextlib.contextmanager
def transfer_progress(
    description: str, total: int, *, stream: TextIO | None = None
) -> Iterator[ProgressCallback]:
    """A callback to tell the bytes done so far; a bar of `total` bytes on `stream` if a TTY.

    `stream` defaults to ``sys.stderr`` as it is when called. Off a terminal
    the callback does nothing and nothing is written.
    """
    out = sys.stderr if stream is None else stream
    if not _is_terminal(out):
        yield lambda _done: None
        return
    # Our own decision above, not rich's: FORCE_COLOR and the like must not put a bar in a pipe.
    console = Console(file=out, force_terminal=True, highlight=False, markup=False, emoji=False)
    columns = (
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda done: progress.update(task, completed=done)
