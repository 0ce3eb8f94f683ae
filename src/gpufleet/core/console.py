"""Human output on stdout: tables that stay whole when piped."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped output has no terminal width; rich would then wrap at 80 columns and cut
# UUIDs in half, which breaks grep. Wide enough for any of our tables instead.
_PIPE_WIDTH = 240


def stdout_console() -> Console:
    """A console on stdout, terminal-width on a TTY and unwrapped when piped."""
    width = None if sys.stdout.isatty() else _PIPE_WIDTH
    # Our cells are data (PCI ids like 00000000:AB:00.0, serials); emoji codes
    # and markup would rewrite them, so neither is interpreted.
    return Console(file=sys.stdout, width=width, emoji=False, markup=False, highlight=False)
