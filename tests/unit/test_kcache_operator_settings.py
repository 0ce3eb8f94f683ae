"""``gpufleet cache operator``'s settings: defaults that differ from the inventory controller's."""

from __future__ import annotations

import pytest

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.kcache.operator.settings import ClusterCacheAccess, OperatorSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NAMESPACE", "LEASE_NAMESPACE", "LEASE_NAME", "LEADER_ELECTION",
                 "REGISTRY_USERNAME", "REGISTRY_PASSWORD", "KCACHE_RESOLVE_INTERVAL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def test_the_lease_lives_in_the_operators_namespace_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NAMESPACE", "gpufleet-kcache")
    settings = load_settings(OperatorSettings)
    assert (settings.lease_namespace, settings.lease_name) == (
        "gpufleet-kcache", "gpufleet-kcache-operator",
    )  # fmt: skip
    assert settings.leader_election is True
    assert settings.kcache_resolve_interval == 300.0
    assert settings.kcache_cluster_cache_access is ClusterCacheAccess.OPEN


def test_lease_namespace_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "gpufleet-kcache")
    monkeypatch.setenv("LEASE_NAMESPACE", "leases")
    assert load_settings(OperatorSettings).lease_namespace == "leases"


def test_the_interval_is_a_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KCACHE_RESOLVE_INTERVAL", "1m30s")
    assert load_settings(OperatorSettings).kcache_resolve_interval == 90.0


def test_a_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_USERNAME", "bob")
    monkeypatch.setenv("REGISTRY_PASSWORD", "hunter2")
    assert "hunter2" not in repr(load_settings(OperatorSettings))


def test_a_username_without_a_password_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REGISTRY_USERNAME", "bob")
    with pytest.raises(ConfigError, match="REGISTRY_PASSWORD"):
        load_settings(OperatorSettings)
