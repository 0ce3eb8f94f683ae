"""`fitted_table`: identifying values stay whole on one line at any terminal width."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from gpufleet.core.console import Column, fitted_table

COLUMNS = [
    Column("idx", key=True),
    Column("serial", key=True),
    Column("uuid", key=True),
    Column("product", drop=1),
    Column("pci bus id", key=True),
    Column("memory", drop=2),
    Column("seen", key=True),
]
ROWS = [
    [str(i), f"165412345678{i}", f"GPU-505944cf-df74-2f7d-8fbe-6ecdb1e704d{i}",
     "NVIDIA H100 80GB HBM3", f"00000000:1{i}:00.0", "79.6 GiB", f"2026-11-24T00:16:1{i}.123Z"]
    for i in range(4)
]  # fmt: skip
KEYS = [i for i, column in enumerate(COLUMNS) if column.key]


def render(width: int, columns: list[Column] = COLUMNS) -> list[str]:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(fitted_table(console, "4 GPU(s)", columns, ROWS))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    lines = str(text).splitlines()
    assert all(len(line) <= width for line in lines)
    return lines


@pytest.mark.parametrize("width", range(60, 241))
def test_every_identifying_value_is_whole_on_one_line(width: int) -> None:
    lines = render(width)
    missing = [row[i] for row in ROWS for i in KEYS if not any(row[i] in line for line in lines)]
    assert missing == []


def test_a_wide_terminal_gets_the_full_bordered_table() -> None:
    lines = render(200)
    assert "┃ idx" in "\n".join(lines)
    assert any("NVIDIA H100 80GB HBM3" in line and ROWS[0][2] in line for line in lines)


def test_lesser_columns_are_left_out_highest_drop_first_and_the_caption_says_so() -> None:
    # Without borders, the keys and product need 113 columns, with memory 121.
    lines = render(118)
    assert any("product" in line and "memory" not in line for line in lines)
    assert lines[-1].strip() == "left out to fit 118 columns: memory"


def test_when_even_the_keys_do_not_fit_in_a_row_each_row_becomes_a_record() -> None:
    lines = render(102)
    assert [line.split()[0] for line in lines if line.startswith("[")] == [
        "[1]", "[2]", "[3]", "[4]",
    ]  # fmt: skip
    # Nothing is lost in a record, lesser fields included.
    assert sum("NVIDIA H100 80GB HBM3" in line for line in lines) == 4
    assert f"uuid        {ROWS[2][2]}" in [line.rstrip() for line in lines]
