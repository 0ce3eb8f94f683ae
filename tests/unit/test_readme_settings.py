"""The README documents every environment variable gpufleet reads, and every flag.

Each settings model (a `GpufleetSettings` subclass) maps its fields to
environment variables; a variable the README does not name is a setting users
cannot find. Every module of the package is imported, so a model added
anywhere is checked without touching this test. The flags are read from the
CLI itself (every leaf command of `gpufleet`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from gpufleet.cli import app
from gpufleet.core.config import GpufleetSettings
from tests.settings_docs import settings_models, variable_names

README = Path(__file__).resolve().parents[2] / "README.md"
_TYPER_BUILTINS = {"--install-completion", "--show-completion", "--help"}


def _variables(model: type[GpufleetSettings]) -> Iterator[tuple[str, list[str]]]:
    """(field, the environment variable names that set it)."""
    for name, field in model.model_fields.items():
        yield name, variable_names(model, name, field)


def test_every_environment_variable_is_in_the_readme() -> None:
    readme = README.read_text()
    models = list(settings_models())
    assert len(models) >= 10  # the walk does find the feature models
    missing = [
        f"{model.__module__}.{model.__name__}.{field}: {' or '.join(names)}"
        for model in models
        for field, names in _variables(model)
        if not any(re.search(rf"(?<![A-Z0-9_]){re.escape(n)}(?![A-Z0-9_])", readme) for n in names)
    ]
    assert missing == []


def _commands(command: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield path, command
        return
    for name, sub in subcommands.items():
        yield from _commands(sub, (*path, name))


def test_every_command_line_flag_is_in_the_readme() -> None:
    readme = README.read_text()
    commands = list(_commands(typer.main.get_command(app), ("gpufleet",)))
    assert len(commands) >= 20  # the walk reaches the leaf commands
    flags = {
        (" ".join(path), option)
        for path, command in commands
        for param in command.params
        for option in [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())]
        if option.startswith("--") and option not in _TYPER_BUILTINS
    }
    missing = sorted(
        f"{path} {flag}"
        for path, flag in flags
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", readme)
    )
    assert missing == []
