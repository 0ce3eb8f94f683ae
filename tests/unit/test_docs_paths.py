"""Every file or folder of this repository that the README and docs name exists.

A path in backticks that starts at a top-level folder (``tests/doubles/kubeapi/``)
is a promise to a reader that it is there; a module turned into a package, or a
file moved, must take the documentation along.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_TOP = "src|tests|docs|deploy|bench|scripts|proto|examples"
_PATH = re.compile(rf"`((?:{_TOP})/[^`\s]*)`")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "tests" / "doubles").glob("*.md"))]  # fmt: skip


def test_every_repository_path_the_documentation_names_exists() -> None:
    named = [
        (doc.relative_to(ROOT).as_posix(), path)
        for doc in _documents()
        for path in _PATH.findall(doc.read_text())
    ]
    assert len(named) >= 20  # the pattern does find the paths
    missing = [
        f"{doc}: {path}"
        for doc, path in named
        if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists())
    ]
    assert missing == []
