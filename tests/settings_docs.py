"""The settings tables of README.md and docs/, rendered from the settings models.

A table the documentation keeps by hand drifts from the code (the PostgreSQL
defaults did). So a section of any markdown file there between

    <!-- settings-table: gpufleet.inventory.exporters.postgres.settings.PostgresSettings -->
    <!-- /settings-table -->

is the table of that model's own fields (those its class body declares, not
inherited ones): the environment variable, the default, and the field's
``description``. ``tests/unit/test_settings_docs.py`` fails when a section
differs from what the model renders; this rewrites them::

    python -m tests.settings_docs          # rewrite every marked section
    python -m tests.settings_docs --check  # name the stale files, exit 1

A field without a ``description`` cannot be rendered, and is an error. A field
whose default is computed at run time says so with
``json_schema_extra={"doc_default": "..."}``.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

import gpufleet
from gpufleet.core.config import Duration, GpufleetSettings

__all__ = [
    "ROOT",
    "Section",
    "documents",
    "render_model",
    "render_text",
    "sections",
    "settings_models",
]

ROOT = Path(__file__).resolve().parents[1]

_SECTION = re.compile(
    r"(?P<open><!-- settings-table: (?P<model>[\w.]+) -->\n)"
    r"(?P<body>.*?)(?P<close><!-- /settings-table -->)",
    re.DOTALL,
)
_DURATION_CHECK = get_args(Duration)[1]
_HEADER = "| variable | default | meaning |\n| --- | --- | --- |\n"


@dataclass(frozen=True)
class Section:
    """One marked section: the model it renders and the text it holds now."""

    path: Path
    model: str
    body: str


def documents(root: Path = ROOT) -> list[Path]:
    """The markdown files that may hold settings tables: README.md and docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("**/*.md"))]


def sections(path: Path) -> Iterator[Section]:
    """The marked sections of one file."""
    for match in _SECTION.finditer(path.read_text()):
        yield Section(path, match["model"], match["body"])


def load_model(dotted: str) -> type[GpufleetSettings]:
    """``package.module.Class`` → the settings class."""
    module, _, name = dotted.rpartition(".")
    model = getattr(importlib.import_module(module), name, None)
    if not (isinstance(model, type) and issubclass(model, GpufleetSettings)):
        raise ValueError(f"{dotted} is not a GpufleetSettings model")
    return model


def settings_models() -> Iterator[type[GpufleetSettings]]:
    """Every settings model of the package; each module is imported, so none is missed."""
    for module in pkgutil.walk_packages(gpufleet.__path__, "gpufleet."):
        importlib.import_module(module.name)
    pending: list[type[GpufleetSettings]] = [GpufleetSettings]
    seen: set[type[GpufleetSettings]] = set()
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in seen and sub.__module__.startswith("gpufleet."):
                seen.add(sub)
                pending.append(sub)
                yield sub


def variable_names(model: type[GpufleetSettings], name: str, field: FieldInfo) -> list[str]:
    """The environment variables that set ``field`` of ``model``, upper-cased."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        names = [str(choice) for choice in alias.choices]
    elif isinstance(alias, str):
        names = [alias]
    else:
        names = [field.alias or str(model.model_config.get("env_prefix") or "") + name]
    return [n.upper() for n in names]


def _variable(model: type[GpufleetSettings], name: str, field: FieldInfo) -> str:
    return " or ".join(f"`{n}`" for n in variable_names(model, name, field))


def _seconds(value: float) -> str:
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value * 1000:g}ms"


def _default(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "doc_default" in extra:
        return str(extra["doc_default"])
    if field.is_required():
        return "required"
    if field.default is PydanticUndefined:
        raise ValueError("default is computed; say what it is with json_schema_extra doc_default")
    value = field.default
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return "none"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, float) and _DURATION_CHECK in field.metadata:
        return f"`{_seconds(value)}`"
    if isinstance(value, tuple | list | frozenset | set):
        return f"`{','.join(map(str, value))}`"
    return f"`{value}`"


def render_model(model: type[GpufleetSettings]) -> str:
    """The markdown table of the fields ``model`` declares itself, in declaration order."""
    own = inspect.get_annotations(model)
    rows = []
    for name, field in model.model_fields.items():
        if name not in own:
            continue
        where = f"{model.__module__}.{model.__name__}.{name}"
        if not field.description:
            raise ValueError(f"{where} has no description to document")
        try:
            default = _default(field)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        meaning = field.description.replace("|", "\\|")
        rows.append(f"| {_variable(model, name, field)} | {default} | {meaning} |\n")
    return _HEADER + "".join(rows)


def render_text(text: str) -> str:
    """``text`` with every marked section rendered afresh from its model."""
    return _SECTION.sub(
        lambda m: m["open"] + render_model(load_model(m["model"])) + m["close"], text
    )


def stale(root: Path = ROOT) -> list[Path]:
    """The documents whose marked sections differ from their models."""
    return [p for p in documents(root) if render_text(p.read_text()) != p.read_text()]


def main(argv: list[str]) -> int:
    """Rewrite the marked sections, or with ``--check`` only name the stale files."""
    out_of_date = stale()
    if "--check" in argv:
        for path in out_of_date:
            print(
                f"{path.relative_to(ROOT)}: settings table differs from its model", file=sys.stderr
            )
        return 1 if out_of_date else 0
    for path in out_of_date:
        path.write_text(render_text(path.read_text()))
        print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
