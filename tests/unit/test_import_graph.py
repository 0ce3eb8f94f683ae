"""The package's imports point one way: no circles, and never up a floor.

The floors are ARCHITECTURE.md's: ``gpufleet.cli`` on top, then the features
(inventory, deviceapi, exporter, kcache), then ``gpu`` and ``kube``, then
``core``. A module may import its own top-level package and anything on a
lower floor; a feature never imports another feature, and ``gpu`` and ``kube``
never import each other. The root ``gpufleet`` package holds only the version
and imports nothing of ours. Nothing in ``src`` imports the tests.

The graph is read from the source with :mod:`ast`, not by importing it, so an
import inside a function or under ``if TYPE_CHECKING:`` counts like any other:
moving an import into a function hides a circle from Python, not from a reader.
``from a.b import c`` is an arrow to the module ``a.b.c`` when there is one,
else to ``a.b``. The packages above a module (whose ``__init__`` Python runs
first) are not arrows of their own; a package that re-exports its modules
would otherwise be a circle with each of them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gpufleet

SRC = Path(gpufleet.__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parents[1]

FLOORS: dict[str, int] = {
    "core": 1,
    "gpu": 2,
    "kube": 2,
    "inventory": 3,
    "deviceapi": 3,
    "exporter": 3,
    "kcache": 3,
    "cli": 4,
}

# A feature may use another feature's public client (ARCHITECTURE.md: the
# exporter may read the device API through ``deviceapi.client``).
PUBLIC_CLIENTS: dict[str, frozenset[str]] = {"exporter": frozenset({"gpufleet.deviceapi.client"})}


@dataclass(frozen=True)
class Arrow:
    """One import: ``source`` imports ``target`` at ``line``."""

    source: str
    target: str
    line: int


def module_name(path: Path, src: Path) -> str:
    """``src/gpufleet/gpu/sim/fleet.py`` → ``gpufleet.gpu.sim.fleet``."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(src: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``src``, by dotted name."""
    return {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}


def arrows(src: Path, package: str) -> Iterator[Arrow]:
    """Every import of a module of ``package`` (or of the tests) by a module of ``package``."""
    known = modules(src, package)
    for name, path in known.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Arrow(name, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                for alias in node.names:
                    inner = f"{target}.{alias.name}"
                    yield Arrow(name, inner if inner in known else target, node.lineno)


def ours(arrow: Arrow, package: str) -> bool:
    """Whether the arrow points into ``package``."""
    return arrow.target == package or arrow.target.startswith(package + ".")


def circles(src: Path, package: str) -> list[list[str]]:
    """The import circles among ``package``'s modules (strongly connected components)."""
    known = modules(src, package)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for arrow in arrows(src, package):
        if arrow.target in known and arrow.target != arrow.source:
            graph[arrow.source].add(arrow.target)
    # Tarjan's algorithm, iterative: the graph is a few hundred modules deep at most,
    # but recursion limits are not a property of the graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def floor_violations(
    src: Path,
    package: str,
    floors: dict[str, int],
    public: dict[str, frozenset[str]],
) -> list[str]:
    """Each import that runs sideways or up a floor, or from the root package, or into the tests."""
    bad: list[str] = []
    for arrow in arrows(src, package):
        where = f"{arrow.source}:{arrow.line} imports {arrow.target}"
        if arrow.target == "tests" or arrow.target.startswith("tests."):
            bad.append(f"{where} (src never imports the tests)")
            continue
        if not ours(arrow, package):
            continue
        source_top = arrow.source.split(".")[1] if "." in arrow.source else ""
        target_top = arrow.target.split(".")[1] if "." in arrow.target else ""
        if not source_top:
            bad.append(f"{where} (the root package imports nothing of ours)")
        elif source_top == target_top or not target_top:
            continue
        elif source_top not in floors or target_top not in floors:
            unknown = source_top if source_top not in floors else target_top
            bad.append(f"{where} ({unknown!r} has no floor: add it to FLOORS)")
        elif arrow.target in public.get(source_top, frozenset()):
            continue
        elif floors[target_top] >= floors[source_top]:
            bad.append(f"{where} (floor {floors[source_top]} → {floors[target_top]})")
    return bad


def _tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_package_has_no_import_circle() -> None:
    assert len(modules(SRC, "gpufleet")) > 100  # the walk found the package
    assert circles(SRC, "gpufleet") == []


def test_no_import_runs_sideways_or_up_a_floor() -> None:
    assert floor_violations(SRC, "gpufleet", FLOORS, PUBLIC_CLIENTS) == []


def test_every_top_level_package_has_a_floor() -> None:
    tops = {p.name for p in (SRC / "gpufleet").iterdir() if (p / "__init__.py").is_file()}
    tops |= {p.stem for p in (SRC / "gpufleet").glob("*.py") if p.stem != "__init__"}
    assert tops - set(FLOORS) == set()


def test_a_circle_is_found_through_a_function_local_import(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a/__init__.py": "from .fleet import Fleet\n",
            "pkg/a/fleet.py": "from pkg.a.library import load\nclass Fleet: ...\n",
            "pkg/a/library.py": "def load():\n    from .fleet import Fleet\n    return Fleet()\n",
            "pkg/a/other.py": "from pkg.a import fleet\n",
        },
    )
    assert circles(src, "pkg") == [["pkg.a.fleet", "pkg.a.library"]]


def test_a_package_that_re_exports_its_modules_is_no_circle(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a/__init__.py": "from .model import Gpu\nfrom .source import Source\n",
            "pkg/a/model.py": "class Gpu: ...\n",
            "pkg/a/source.py": "from pkg.a.model import Gpu\nclass Source: ...\n",
        },
    )
    assert circles(src, "pkg") == []


def test_imports_up_or_across_a_floor_are_named(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/core/__init__.py": "",
            "pkg/core/log.py": "from pkg.gpu import model\n",
            "pkg/gpu/__init__.py": "",
            "pkg/gpu/model.py": "import pkg.core.log\n",
            "pkg/gpu/smi.py": "from ..kube import client\n",
            "pkg/kube/__init__.py": "",
            "pkg/kube/client.py": "",
            "pkg/feat/__init__.py": "",
            "pkg/feat/run.py": "from pkg.gpu.model import Gpu\nfrom pkg.other.store import S\n",
            "pkg/feat/peer.py": "from pkg.other.client import C\nfrom tests.doubles import X\n",
            "pkg/other/__init__.py": "",
            "pkg/other/store.py": "",
            "pkg/other/client.py": "",
        },
    )
    floors = {"core": 1, "gpu": 2, "kube": 2, "feat": 3, "other": 3}
    public = {"feat": frozenset({"pkg.other.client"})}
    bad = floor_violations(src, "pkg", floors, public)
    assert bad == [
        "pkg.core.log:1 imports pkg.gpu.model (floor 1 → 2)",
        "pkg.feat.peer:2 imports tests.doubles (src never imports the tests)",
        "pkg.feat.run:2 imports pkg.other.store (floor 3 → 3)",
        "pkg.gpu.smi:1 imports pkg.kube.client (floor 2 → 2)",
    ]


def test_an_import_of_a_test_module_is_named(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "tests/__init__.py": "",
            "tests/support.py": "",
            "tests/unit/test_a.py": "from tests.unit.test_b import f\nfrom tests import support\n",
            "tests/unit/test_b.py": "def f(): ...\n",
        },
    )
    assert imports_of_test_modules(src / "tests") == [
        "tests/unit/test_a.py:1 imports tests.unit.test_b"
    ]


def imports_of_test_modules(tests: Path) -> list[str]:
    """Each import of a test module (``test_*.py``) by another module of the tests.

    A test module other files import from is a library in disguise: its tests
    are imported where they do not run and its helpers are hard to find. Shared
    helpers live in support modules (``tests/*_support.py``, ``tests/doubles/``).
    """
    root = tests.parent
    bad: list[str] = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith("tests.") and name.rpartition(".")[2].startswith("test_"):
                    bad.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return bad


def test_no_test_module_imports_another() -> None:
    assert len(list(TESTS.rglob("test_*.py"))) > 100  # the walk found the tests
    assert imports_of_test_modules(TESTS) == []
