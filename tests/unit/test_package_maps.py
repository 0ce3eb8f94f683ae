"""Each package's docstring is its map: it names every module and subpackage in it.

A contributor opens ``__init__.py`` to find which module does what (README,
"Where things are"). A module added or moved without a line there leaves the
map wrong, so a name missing from it fails here. Generated packages (the
``*_pb2`` stubs) are named by the package above them and need no map.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import gpufleet

PACKAGE = Path(gpufleet.__file__).resolve().parent


def generated(package: Path) -> bool:
    """Whether ``package`` holds stubs ``make proto`` writes."""
    return any(path.name.endswith("_pb2.py") for path in package.iterdir())


def children(package: Path) -> list[str]:
    """The modules and subpackages directly in ``package``."""
    modules = {path.stem for path in package.glob("*.py") if path.stem != "__init__"}
    packages = {path.name for path in package.iterdir() if (path / "__init__.py").is_file()}
    return sorted(modules | packages)


def named(docstring: str, child: str) -> bool:
    """``child`` in backticks: alone, as ``child.py`` or ``child/``, or ending a dotted name."""
    pattern = rf"`+(?:[\w.]+\.)?{re.escape(child)}(?:\.py|/)?`+"
    return re.search(pattern, docstring) is not None


def unmapped(package: Path) -> list[str]:
    """The children of ``package`` its docstring does not name."""
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    return [child for child in children(package) if not named(docstring, child)]


def test_every_package_docstring_names_its_modules() -> None:
    packages = [init.parent for init in sorted(PACKAGE.rglob("__init__.py"))]
    mapped = [package for package in packages if not generated(package)]
    assert len(mapped) > 10  # the walk found the packages
    missing = {
        str(package.relative_to(PACKAGE.parent)): names
        for package in mapped
        if (names := unmapped(package))
    }
    assert missing == {}


def test_a_module_without_a_line_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "__init__.py").write_text("")
    (package / "__init__.py").write_text(
        '"""The map: `store` keeps, ``gpufleet.pkg.sub`` is, ``cli.py`` runs; watch."""\n'
    )
    for name in ("store", "stored", "watch", "cli"):
        (package / f"{name}.py").write_text("")
    assert unmapped(package) == ["stored", "watch"]
