#!/usr/bin/env python3
"""Print the pins of gpufleet's runtime closure, as installed in this Python's environment.

`scripts/image/build.sh` runs it with the project's .venv, so the image gets exactly the
versions the tests ran against: the requirements of ``gpufleet[EXTRAS]`` (default ``all``)
are read from the checkout's pyproject.toml (the venv's editable install may carry older
metadata) and followed through the installed distributions' metadata, markers evaluated for this
interpreter, and each distribution reached is printed as ``name==version``, sorted. The dev
tools and anything else in the venv are left out. gpufleet itself is not pinned (its wheel
is built from the checkout). Exit 1 with one line when a requirement is not installed.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def project_requires(pyproject: Path) -> tuple[str, list[str]]:
    """The project's name and its requirements in metadata form (extras as markers)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project.get("dependencies", []))
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for req in reqs:
            marker = f'extra == "{extra}"'
            lines.append(f"{req}; {marker}" if ";" not in req else f"{req} and {marker}")
    return canonicalize_name(project["name"]), lines


def closure(root: str, extras: set[str], root_requires: list[str]) -> dict[str, str]:
    """Map each distribution the runtime of ``root[extras]`` needs to its installed version."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(canonicalize_name(root), frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        if name == root:
            requires = root_requires
        else:
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                raise SystemExit(f"constraints: {name} is not installed in {sys.prefix}") from None
            found[name] = dist.version
            requires = dist.requires or []
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not any(
                req.marker.evaluate({**default_environment(), "extra": extra})
                for extra in (wanted or {""})
            ):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="all", help="gpufleet's extras (comma separated)")
    args = parser.parse_args()
    name, requires = project_requires(ROOT / "pyproject.toml")
    pins = closure(name, {e for e in args.extras.split(",") if e}, requires)
    for dist in sorted(pins):
        print(f"{dist}=={pins[dist]}")


if __name__ == "__main__":
    main()
