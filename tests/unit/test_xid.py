"""The XID catalogue: lookups, the ignored set, and configured overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.deviceapi.provider_cli import ProviderSettings
from gpufleet.gpu.xid import (
    DEFAULT_CATALOGUE,
    Action,
    Severity,
    XidOverride,
    load_overrides,
    parse_overrides,
)


def test_application_xids_are_ignored_by_default() -> None:
    assert {13, 31, 43, 45, 68, 109} <= DEFAULT_CATALOGUE.ignored()


def test_xid_79_is_critical_and_asks_for_a_node_reboot() -> None:
    info = DEFAULT_CATALOGUE.lookup(79)
    assert (info.severity, info.action, info.description) == (
        Severity.CRITICAL,
        Action.REBOOT_NODE,
        "GPU has fallen off the bus",
    )


@pytest.mark.parametrize("xid", [48, 63, 64, 74, 79, 95, 119, 120])
def test_hardware_xids_are_critical(xid: int) -> None:
    assert DEFAULT_CATALOGUE.lookup(xid).severity is Severity.CRITICAL


def test_xid_63_is_a_recorded_retirement_and_64_a_failed_one() -> None:
    recorded, failed = DEFAULT_CATALOGUE.lookup(63), DEFAULT_CATALOGUE.lookup(64)
    assert "recorded" in recorded.description
    assert "failed" in failed.description
    assert (recorded.action, failed.action) == (Action.RESET_GPU, Action.REPLACE_GPU)


def test_unknown_xid_is_a_warning_with_no_action() -> None:
    info = DEFAULT_CATALOGUE.lookup(9999)
    assert (info.severity, info.action, info.description) == (
        Severity.WARNING,
        Action.NONE,
        "unknown XID 9999",
    )


def test_action_values_are_the_proto_strings() -> None:
    assert [action.value for action in Action] == [
        "None",
        "RestartWorkload",
        "ResetGpu",
        "RebootNode",
        "ReplaceGpu",
    ]


def test_every_well_known_xid_is_catalogued() -> None:
    wanted = {8, 13, 31, 32, 38, 43, 45, 48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95}
    wanted |= {109, 119, 120, 121, 140, 143, *range(144, 151)}
    known = {info.xid for info in DEFAULT_CATALOGUE}
    assert wanted <= known


def test_inline_overrides_parse_severity_and_optional_action() -> None:
    assert parse_overrides("48=critical:reset-gpu, 13=warning,200=CRITICAL:ReplaceGpu") == [
        XidOverride(48, Severity.CRITICAL, Action.RESET_GPU),
        XidOverride(13, Severity.WARNING, None),
        XidOverride(200, Severity.CRITICAL, Action.REPLACE_GPU),
    ]


def test_override_without_action_keeps_the_catalogue_action() -> None:
    catalogue = DEFAULT_CATALOGUE.with_overrides(parse_overrides("13=critical,79=warning:none"))
    assert (catalogue.lookup(13).severity, catalogue.lookup(13).action) == (
        Severity.CRITICAL,
        Action.RESTART_WORKLOAD,
    )
    assert (catalogue.lookup(79).severity, catalogue.lookup(79).action) == (
        Severity.WARNING,
        Action.NONE,
    )
    assert DEFAULT_CATALOGUE.lookup(13).severity is Severity.IGNORED  # the default is untouched


def test_override_of_an_unknown_xid_makes_it_known() -> None:
    catalogue = DEFAULT_CATALOGUE.with_overrides(parse_overrides("777=critical:reboot-node"))
    info = catalogue.lookup(777)
    assert (info.severity, info.action, info.description) == (
        Severity.CRITICAL,
        Action.REBOOT_NODE,
        "unknown XID 777",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("48", "bad entry '48' (expected XID=SEVERITY[:ACTION]"),
        ("x=critical", "bad entry 'x=critical'"),
        ("48=fatal", "unknown severity 'fatal' for XID 48 (expected ignored, warning or critical)"),
        (
            "48=critical:explode",
            "unknown action 'explode' (expected one of none, restart-workload, reset-gpu, "
            "reboot-node, replace-gpu) for XID 48",
        ),
        ("48=warning,48=critical", "duplicate entry for XID 48"),
    ],
)
def test_invalid_inline_overrides_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_overrides(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("invalid XID_OVERRIDES: ")
    assert "\n" not in str(caught.value)


def test_yaml_file_overrides(tmp_path: Path) -> None:
    path = tmp_path / "xid.yaml"
    path.write_text('48: "critical:replace-gpu"\n13: warning\n')
    assert load_overrides(str(path)) == [
        XidOverride(48, Severity.CRITICAL, Action.REPLACE_GPU),
        XidOverride(13, Severity.WARNING, None),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- 48\n", "expected a mapping of XID to 'severity[:action]'"),
        ("abc: warning\n", "key 'abc' is not an XID number"),
        ("48: [critical]\n", "expected 'severity[:action]' for XID 48"),
        ("48: fatal\n", "unknown severity 'fatal' for XID 48"),
        ("48: {\n", "invalid YAML"),
    ],
)
def test_invalid_yaml_overrides_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "xid.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_overrides(str(path))
    assert f"{path}: " in str(caught.value)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_yaml_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_overrides(str(tmp_path / "absent.yaml"))


def test_settings_reject_bad_overrides_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XID_OVERRIDES", "48=fatal")
    with pytest.raises(ConfigError) as caught:
        load_settings(ProviderSettings)
    assert str(caught.value).startswith(
        "invalid XID_OVERRIDES='48=fatal': unknown severity 'fatal' for XID 48"
    )


def test_settings_apply_overrides_to_the_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XID_OVERRIDES", "13=critical:reset-gpu")
    catalogue = load_settings(ProviderSettings).catalogue()
    assert catalogue.lookup(13).severity is Severity.CRITICAL
