"""Human output on stdout: tables that stay whole when piped, and fit a terminal.

A table's identifying values (serials, UUIDs, timestamps, PCI bus ids, node and
machine names) are what people copy and grep, so `fitted_table` never wraps or
cuts them. When the terminal is too narrow it first drops the borders, then
leaves out lesser columns, and last folds each row into a record of
``field  value`` lines, as ``psql``'s expanded display does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["Column", "fitted_table", "stdout_console"]

# Piped output has no terminal width; rich would then wrap at 80 columns and cut
# UUIDs in half, which breaks grep. Wide enough for any of our tables instead.
_PIPE_WIDTH = 240

Cell = str | Text


def stdout_console() -> Console:
    """A console on stdout, terminal-width on a TTY and unwrapped when piped."""
    width = None if sys.stdout.isatty() else _PIPE_WIDTH
    # Our cells are data (PCI ids like 00000000:AB:00.0, serials); emoji codes
    # and markup would rewrite them, so neither is interpreted.
    return Console(file=sys.stdout, width=width, emoji=False, markup=False, highlight=False)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a `fitted_table`."""

    header: str
    key: bool = False
    """An identifying value: always shown whole on one line, never wrapped or cut."""
    drop: int = 0
    """Left out on a narrow terminal, highest first; 0: never left out."""


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def _widths(column: Column, cells: list[str]) -> tuple[int, int]:
    """The narrowest the column may be, and its natural width.

    A key column is never narrower than its widest value; another may wrap its
    words, but not break them.
    """
    lines = [line for text in [column.header, *cells] for line in text.splitlines() or [""]]
    widest = max(cell_len(line) for line in lines)
    if column.key:
        return widest, widest
    words = [word for line in lines for word in line.split()]
    return max((cell_len(word) for word in words), default=1), widest


def _spread(room: int, least: Sequence[int], most: Sequence[int]) -> list[int]:
    """Widths from ``least`` toward ``most`` within ``room``, the smallest needs first."""
    widths = list(least)
    extra = room - sum(least)
    order = sorted(range(len(widths)), key=lambda i: most[i] - least[i])
    for done, i in enumerate(order):
        give = min(most[i] - least[i], extra // (len(order) - done))
        widths[i] += give
        extra -= give
    return widths


def _table(
    title: str,
    columns: Sequence[Column],
    widths: Sequence[int],
    rows: Sequence[Sequence[Cell]],
    *,
    compact: bool,
) -> Table:
    table = (
        Table(title=title, box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
        if compact
        else Table(title=title)
    )
    # Every width is fixed here: rich, left to make room itself, shrinks the
    # widest wrappable column past its longest word.
    for column, width in zip(columns, widths, strict=True):
        table.add_column(column.header, no_wrap=column.key, width=width, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _records(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[Cell]]
) -> RenderableType:
    grid = Table(title=title, box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for number, row in enumerate(rows, 1):
        if number > 1:
            grid.add_row("", "")
        grid.add_row(Text(f"[{number}]", style="dim"), "")
        for column, cell in zip(columns, row, strict=True):
            grid.add_row(column.header, cell)
    return grid


def fitted_table(
    console: Console,
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
) -> RenderableType:
    """A table of ``rows`` that fits ``console``'s width with every key column whole.

    In order: the full bordered table; the same without borders; the borderless
    table with lesser columns left out (highest `Column.drop` first, the caption
    says which); one record per row, every field on its own line.
    """
    plain = [[_plain(cell) for cell in row] for row in rows]
    least, most = zip(
        *(_widths(column, [row[i] for row in plain]) for i, column in enumerate(columns)),
        strict=True,
    )
    room = console.width
    kept = list(range(len(columns)))
    droppable = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop)

    def fit(indexes: list[int], overhead: int, compact: bool) -> Table | None:
        space = room - overhead
        if sum(least[i] for i in indexes) > space:
            return None
        widths = _spread(space, [least[i] for i in indexes], [most[i] for i in indexes])
        chosen = [columns[i] for i in indexes]
        cells = [[row[i] for i in indexes] for row in rows]
        return _table(title, chosen, widths, cells, compact=compact)

    table = fit(kept, 3 * len(kept) + 1, compact=False)
    while table is None:
        table = fit(kept, 2 * (len(kept) - 1), compact=True)
        if table is not None:
            left_out = [c.header for i, c in enumerate(columns) if i not in kept]
            if left_out:
                table.caption = f"left out to fit {room} columns: {', '.join(left_out)}"
        elif droppable:
            kept.remove(droppable.pop(0))
        else:
            return _records(title, columns, rows)
    return table
