"""The settings tables in README.md and docs/ are the settings models' own (tests/settings_docs.py).

They once said the PostgreSQL pool held 8 connections, split batches in 2
and kept 3 in flight, where the code said 6, 1 and 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field, SecretStr

from gpufleet.core.config import Duration, GpufleetSettings
from tests import settings_docs
from tests.settings_docs import ROOT, render_model, render_text, sections, stale

POSTGRES = "gpufleet.inventory.exporters.postgres.settings.PostgresSettings"


class _Example(GpufleetSettings):
    """A model with one field of each kind the renderer formats."""

    example_host: str = Field(min_length=1, description="where | to go")
    example_timeout: Duration = Field(default=90.0, description="how long")
    example_flag: bool = Field(default=False, description="on or off")
    example_token: SecretStr = Field(default=SecretStr(""), description="secret")
    example_names: tuple[str, ...] = Field(default=("a", "b"), description="names")


class _Derived(_Example):
    """Only its own field is its table's."""

    example_port: int = Field(default=5432, description="port")


def test_every_marked_section_matches_what_its_model_renders() -> None:
    assert [str(p.relative_to(ROOT)) for p in stale()] == []


@pytest.mark.parametrize("document", ["README.md", "docs/postgres-exporter.md"])
def test_the_postgres_settings_tables_are_rendered_from_the_model(document: str) -> None:
    assert POSTGRES in [s.model for s in sections(ROOT / document)]


def test_the_postgres_defaults_documented_are_the_codes() -> None:
    table = render_model(settings_docs.load_model(POSTGRES))
    assert "| `POSTGRES_POOL_MAX` | `6` |" in table
    assert "| `POSTGRES_WRITE_PARALLELISM` | `1` |" in table
    assert "| `POSTGRES_BATCHES_IN_FLIGHT` | `4` |" in table


def test_a_model_renders_as_variable_default_and_description() -> None:
    assert render_model(_Example) == (
        "| variable | default | meaning |\n"
        "| --- | --- | --- |\n"
        "| `EXAMPLE_HOST` | required | where \\| to go |\n"
        "| `EXAMPLE_TIMEOUT` | `90s` | how long |\n"
        "| `EXAMPLE_FLAG` | `false` | on or off |\n"
        "| `EXAMPLE_TOKEN` | empty | secret |\n"
        "| `EXAMPLE_NAMES` | `a,b` | names |\n"
    )


def test_a_derived_model_renders_only_the_fields_it_declares() -> None:
    assert render_model(_Derived).count("\n| `") == 1


def test_a_section_that_drifted_from_its_model_is_found_and_rewritten(tmp_path: Path) -> None:
    marker = f"<!-- settings-table: {__name__}._Derived -->\n"
    drifted = f"intro\n{marker}| stale |\n<!-- /settings-table -->\nafter\n"
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(drifted)
    assert stale(tmp_path) == [tmp_path / "README.md"]
    fixed = render_text(drifted)
    assert fixed == f"intro\n{marker}{render_model(_Derived)}<!-- /settings-table -->\nafter\n"
    (tmp_path / "README.md").write_text(fixed)
    assert stale(tmp_path) == []


def test_a_field_without_a_description_cannot_be_documented() -> None:
    class Undocumented(GpufleetSettings):
        undocumented_value: int = 3

    with pytest.raises(ValueError, match="undocumented_value has no description"):
        render_model(Undocumented)
