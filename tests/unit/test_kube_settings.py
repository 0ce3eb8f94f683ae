"""KubeSettings and LeaseSettings: gpuid's names, defaults and cross-field rules."""

from __future__ import annotations

import pytest

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.kube.client import KubeSettings
from gpufleet.kube.lease import LeaseSettings

KUBE_VARIABLES = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "QPS", "BURST")
LEASE_VARIABLES = (
    "LEADER_ELECTION",
    "LEASE_NAMESPACE",
    "LEASE_NAME",
    "LEASE_DURATION",
    "LEASE_RENEW_DEADLINE",
    "LEASE_RETRY_PERIOD",
    "POD_NAME",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in KUBE_VARIABLES + LEASE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_kube_settings_default_to_gpuid_rates() -> None:
    settings = load_settings(KubeSettings)
    assert (settings.qps, settings.burst, settings.kubeconfig) == (50.0, 100, None)


def test_burst_below_qps_is_one_line_naming_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPS", "50")
    monkeypatch.setenv("BURST", "10")
    with pytest.raises(ConfigError, match=r"^invalid BURST='10': must be >= QPS \(50\)$"):
        load_settings(KubeSettings)


def test_zero_qps_is_refused_naming_qps() -> None:
    with pytest.raises(ConfigError, match="QPS"):
        load_settings(KubeSettings, qps=0)


def test_lease_settings_default_to_gpuid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "gpuid-7d9f-abcde")
    settings = load_settings(LeaseSettings)
    assert (
        settings.leader_election,
        settings.lease_namespace,
        settings.lease_name,
        settings.lease_duration,
        settings.lease_renew_deadline,
        settings.lease_retry_period,
        settings.identity,
    ) == (False, "gpuid", "gpuid-leader", 15.0, 10.0, 2.0, "gpuid-7d9f-abcde")


def test_lease_durations_read_go_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASE_DURATION", "1m")
    monkeypatch.setenv("LEASE_RENEW_DEADLINE", "30s")
    monkeypatch.setenv("LEASE_RETRY_PERIOD", "500ms")
    settings = load_settings(LeaseSettings)
    assert (settings.lease_duration, settings.lease_renew_deadline) == (60.0, 30.0)
    assert settings.lease_retry_period == pytest.approx(0.5)


def test_identity_falls_back_to_the_hostname() -> None:
    assert load_settings(LeaseSettings).identity


def test_renew_deadline_must_be_below_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASE_RENEW_DEADLINE", "15s")
    with pytest.raises(ConfigError, match=r"^invalid LEASE_RENEW_DEADLINE='15s': must be less"):
        load_settings(LeaseSettings)


def test_retry_period_must_be_below_renew_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASE_RETRY_PERIOD", "10s")
    with pytest.raises(ConfigError, match=r"^invalid LEASE_RETRY_PERIOD='10s': must be less"):
        load_settings(LeaseSettings)
