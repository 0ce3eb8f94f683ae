"""Settings come from the environment, flags override, and bad values fail in one line."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field, SecretStr, model_validator

from gpufleet.core.config import (
    CommonSettings,
    Duration,
    GpufleetSettings,
    LogFormat,
    LogLevel,
    load_settings,
    parse_duration,
)
from gpufleet.core.errors import ConfigError


class InventorySettings(GpufleetSettings):
    """A feature-shaped model, as a feature would declare it."""

    cluster_name: str
    exporter_type: Literal["stdout", "sqlite"] = "stdout"
    workers: int = 4
    timeout: Duration = 30.0
    labels: list[str] = Field(default_factory=list)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLUSTER_NAME", "EXPORTER_TYPE", "WORKERS", "TIMEOUT", "LABELS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("LOG_LEVEL", "LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)


def test_fields_are_read_from_upper_case_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLUSTER_NAME", "prod-eu")
    assert load_settings(InventorySettings).cluster_name == "prod-eu"


def test_flag_value_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTER_NAME", "prod-eu")
    monkeypatch.setenv("WORKERS", "8")
    assert load_settings(InventorySettings, workers=16).workers == 16


def test_flag_given_as_none_keeps_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTER_NAME", "prod-eu")
    monkeypatch.setenv("WORKERS", "8")
    assert load_settings(InventorySettings, workers=None).workers == 8


def test_flag_can_supply_a_required_field_missing_from_environment() -> None:
    assert load_settings(InventorySettings, cluster_name="lab").cluster_name == "lab"


def test_override_naming_no_field_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="wokers"):
        load_settings(InventorySettings, cluster_name="lab", wokers=3)


def test_invalid_choice_names_variable_value_and_allowed_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLUSTER_NAME", "prod-eu")
    monkeypatch.setenv("EXPORTER_TYPE", "nope")
    with pytest.raises(ConfigError) as caught:
        load_settings(InventorySettings)
    assert str(caught.value) == "invalid EXPORTER_TYPE='nope': expected one of 'stdout', 'sqlite'"


def test_missing_required_variable_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(InventorySettings)
    assert str(caught.value) == "missing required CLUSTER_NAME"


def test_several_bad_variables_are_reported_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS", "many")
    with pytest.raises(ConfigError) as caught:
        load_settings(InventorySettings)
    assert str(caught.value) == (
        "missing required CLUSTER_NAME; invalid WORKERS='many': "
        "expected a valid integer, unable to parse string as an integer"
    )


def test_undecodable_json_in_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLUSTER_NAME", "prod-eu")
    monkeypatch.setenv("LABELS", "[gpu")
    with pytest.raises(ConfigError, match=r"^invalid LABELS='\[gpu': expected a JSON value"):
        load_settings(InventorySettings)


def test_config_error_message_is_a_single_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORTER_TYPE", "nope")
    monkeypatch.setenv("TIMEOUT", "soon")
    with pytest.raises(ConfigError) as caught:
        load_settings(InventorySettings)
    assert "\n" not in str(caught.value)


def test_env_prefix_of_a_feature_model_is_part_of_the_variable_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class PostgresSettings(GpufleetSettings, env_prefix="POSTGRES_"):
        port: int = 5432

    monkeypatch.setenv("POSTGRES_PORT", "x")
    with pytest.raises(ConfigError, match=r"^invalid POSTGRES_PORT='x'"):
        load_settings(PostgresSettings)


def test_aliased_field_is_reported_by_its_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    class KubeSettings(GpufleetSettings):
        namespace: str = Field(default="default", validation_alias="POD_NAMESPACE")
        qps: float = Field(default=5.0, validation_alias="KUBE_QPS")

    monkeypatch.setenv("KUBE_QPS", "fast")
    with pytest.raises(ConfigError, match=r"^invalid KUBE_QPS='fast'"):
        load_settings(KubeSettings)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("250us", 0.00025),
        ("10", 10.0),
        ("0.25", 0.25),
        (" 5s ", 5.0),
    ],
)
def test_parse_duration_reads_go_style_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1s", "-3", "soon", "", "1x", "s", "1s-", "inf", "nan"])
def test_parse_duration_rejects_negative_and_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="expected a"):
        parse_duration(text)


def test_duration_field_reads_gpuid_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMEOUT", "1m30s")
    assert load_settings(InventorySettings, cluster_name="lab").timeout == 90.0


def test_duration_field_accepts_a_number_from_a_flag() -> None:
    assert load_settings(InventorySettings, cluster_name="lab", timeout=2.5).timeout == 2.5


def test_bad_duration_names_variable_and_expected_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMEOUT", "-5s")
    with pytest.raises(ConfigError) as caught:
        load_settings(InventorySettings, cluster_name="lab")
    assert str(caught.value) == "invalid TIMEOUT='-5s': expected a non-negative duration"


def test_common_settings_default_to_info_and_json() -> None:
    settings = load_settings(CommonSettings)
    assert (settings.log_level, settings.log_format) == (LogLevel.INFO, LogFormat.JSON)


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    assert load_settings(CommonSettings).log_level is LogLevel.DEBUG


def test_log_level_accepts_warn_as_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "Warn")
    assert load_settings(CommonSettings).log_level is LogLevel.WARNING


def test_log_format_is_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "TEXT")
    assert load_settings(CommonSettings).log_format is LogFormat.TEXT


def test_unknown_log_level_lists_the_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "loud")
    with pytest.raises(ConfigError) as caught:
        load_settings(CommonSettings)
    assert str(caught.value) == (
        "invalid LOG_LEVEL='loud': expected one of 'debug', 'info', 'warning', 'error'"
    )


class PairedSettings(GpufleetSettings):
    """A model-level check across two fields, beside a field holding a secret."""

    db_password: str = ""
    api_token: SecretStr | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> PairedSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("CERT_FILE and KEY_FILE go together: set both or neither")
        return self


def test_a_model_level_error_shows_its_message_and_no_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DB_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("CERT_FILE", "/etc/cert.pem")

    with pytest.raises(ConfigError) as caught:
        load_settings(PairedSettings)

    message = str(caught.value)
    assert message == "CERT_FILE and KEY_FILE go together: set both or neither"
    assert "hunter2-secret" not in message
    assert "{" not in message


def test_a_field_error_shows_no_other_field_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTER_NAME", "hunter2-secret")
    monkeypatch.setenv("WORKERS", "many")

    with pytest.raises(ConfigError) as caught:
        load_settings(InventorySettings)

    assert "WORKERS='many'" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)


class SecretSettings(GpufleetSettings):
    """A secret whose own value is invalid."""

    api_token: SecretStr | None = Field(default=None, min_length=20)


def test_an_invalid_secret_is_named_but_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "hunter2-secret")

    with pytest.raises(ConfigError, match="API_TOKEN") as caught:
        load_settings(SecretSettings)

    assert "hunter2-secret" not in str(caught.value)
