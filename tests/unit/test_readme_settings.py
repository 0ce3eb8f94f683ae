"""The README documents every environment variable gpufleet reads.

Each settings model (a `GpufleetSettings` subclass) maps its fields to
environment variables; a variable the README does not name is a setting users
cannot find. Every module of the package is imported, so a model added
anywhere is checked without touching this test.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import AliasChoices

import gpufleet
from gpufleet.core.config import GpufleetSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def _settings_models() -> Iterator[type[GpufleetSettings]]:
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


def _variables(model: type[GpufleetSettings]) -> Iterator[tuple[str, list[str]]]:
    """(field, the environment variable names that set it)."""
    prefix = str(model.model_config.get("env_prefix") or "")
    for name, field in model.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names = [str(choice) for choice in alias.choices]
        elif isinstance(alias, str):
            names = [alias]
        else:
            names = [field.alias or prefix + name]
        yield name, [n.upper() for n in names]


def test_every_environment_variable_is_in_the_readme() -> None:
    readme = README.read_text()
    models = list(_settings_models())
    assert len(models) >= 10  # the walk does find the feature models
    missing = [
        f"{model.__module__}.{model.__name__}.{field}: {' or '.join(names)}"
        for model in models
        for field, names in _variables(model)
        if not any(re.search(rf"(?<![A-Z0-9_]){re.escape(n)}(?![A-Z0-9_])", readme) for n in names)
    ]
    assert missing == []
