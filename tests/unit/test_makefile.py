"""`make help` names every target a person can run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_make_help_names_every_phony_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)
    assert phony is not None
    targets = phony.group(1).split()
    shown = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "help"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    named = set(re.findall(r"^make (\S+)", shown, re.M))
    assert sorted(set(targets) - named) == []
