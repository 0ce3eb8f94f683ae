"""Print the lowest versions pyproject.toml declares, as exact pins.

Every `name>=X` of the core dependencies and of the extras named on the
command line (default: those that `all` pulls in) becomes `name==X`, so that
`pip install -c <this output> .[all]` builds the venv at the floor of every
range. `make test` tests the floors in such a venv (scripts/floor-venv.sh):
a floor we declare is one we have seen work.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_FLOOR = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)$")


def floor_pins(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """``name==floor`` for every floored requirement of the core and ``extras``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += [
            r for r in project["optional-dependencies"][extra] if not r.startswith("gpufleet[")
        ]
    pins = []
    for requirement in requirements:
        match = _FLOOR.match(requirement.split(";")[0].strip())
        if match is None:
            sys.exit(f"{pyproject}: {requirement!r} declares no floor (name>=X)")
        pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


if __name__ == "__main__":
    print("\n".join(floor_pins(sys.argv[1:] or ["postgres", "s3", "k8s", "kcache"])))
