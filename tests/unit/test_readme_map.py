"""The README's "Where things are" table names every package, and only real paths.

A contributor reads the table to find where a job lives; a package added
without a row, or a row left behind by a move, makes the map lie.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "gpufleet"


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Where things are")
    end = text.find("\n#", start + 1)
    return text[start : end if end != -1 else len(text)]


def _rows() -> list[str]:
    """The first cell of each table row, without its backticks."""
    rows = re.findall(r"^\| ([^|]+?) \|", _section(), flags=re.MULTILINE)
    return [row for row in rows if row not in ("path", "---")]


def test_every_package_has_a_row() -> None:
    named = {path.strip("`") for row in _rows() for path in row.split(", ")}
    packages = {
        f"{init.parent.relative_to(ROOT)}/" for init in sorted(PACKAGE.rglob("__init__.py"))
    }
    packages.discard("src/gpufleet/")  # the root holds only the version
    assert len(packages) > 10  # the walk found the package
    assert sorted(packages - named) == []


def test_every_path_in_the_table_exists() -> None:
    paths = [
        path.strip("`")
        for row in _rows()
        for path in row.split(", ")
        if "*" not in path  # a glob row names a kind of file, not one path
    ]
    assert len(paths) > 20
    assert [path for path in paths if not (ROOT / path).exists()] == []
