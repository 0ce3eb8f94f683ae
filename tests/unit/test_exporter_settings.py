"""ExporterSettings: defaults, GPU_EXPORTER_* variables, Kubernetes detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.exporter.settings import ExporterSettings, K8sMode


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_NAME", "node-1")


def test_defaults_match_the_documented_ones() -> None:
    settings = load_settings(ExporterSettings)
    assert (settings.bind_address, settings.port, settings.interval) == ("0.0.0.0", 9400, 5.0)
    assert settings.process_labels == (
        "pid", "username", "pod_name", "pod_namespace", "container_name",
    )  # fmt: skip
    assert settings.process_info is False
    assert settings.k8s is K8sMode.AUTO


def test_variables_are_read_with_the_gpu_exporter_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_EXPORTER_INTERVAL", "250ms")
    monkeypatch.setenv("GPU_EXPORTER_PROCESS_LABELS", "pod_name, container_name")
    monkeypatch.setenv("GPU_EXPORTER_K8S", "OFF")
    settings = load_settings(ExporterSettings)
    assert settings.interval == 0.25
    assert settings.process_labels == ("pod_name", "container_name")
    assert settings.k8s is K8sMode.OFF


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_EXPORTER_PORT", "9500")
    assert load_settings(ExporterSettings, port=9600).port == 9600


def test_the_podresources_max_age_defaults_to_two_minutes_and_reads_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(ExporterSettings).podresources_max_age == 120.0
    monkeypatch.setenv("GPU_EXPORTER_PODRESOURCES_MAX_AGE", "10m")
    assert load_settings(ExporterSettings).podresources_max_age == 600.0
    assert load_settings(ExporterSettings, podresources_max_age="30s").podresources_max_age == 30.0
    with pytest.raises(ConfigError, match="GPU_EXPORTER_PODRESOURCES_MAX_AGE"):
        load_settings(ExporterSettings, podresources_max_age="-1s")


def test_an_interval_under_a_quarter_second_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"GPU_EXPORTER_INTERVAL.*at least 0\.25s"):
        load_settings(ExporterSettings, interval="100ms")


def test_a_label_named_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="GPU_EXPORTER_PROCESS_LABELS"):
        load_settings(ExporterSettings, process_labels="pid,pid")


def test_auto_detects_kubernetes_from_the_service_account_token(tmp_path: Path) -> None:
    settings = load_settings(ExporterSettings)
    assert settings.k8s_enabled(token=tmp_path / "token") is False
    (tmp_path / "token").write_text("t")
    assert settings.k8s_enabled(token=tmp_path / "token") is True


def test_auto_detects_kubernetes_from_the_service_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert load_settings(ExporterSettings).k8s_enabled(token=Path("/nonexistent")) is True


def test_explicit_k8s_modes_override_detection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert load_settings(ExporterSettings, k8s="off").k8s_enabled() is False
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert load_settings(ExporterSettings, k8s="on").k8s_enabled(token=tmp_path / "x") is True


def test_a_client_ca_needs_a_server_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CLIENT_CA"):
        load_settings(ExporterSettings, tls_client_ca_file=tmp_path / "ca.pem")


def test_a_certificate_without_a_key_names_both_variables_and_no_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(ExporterSettings, tls_cert_file=tmp_path / "cert.pem")

    message = str(caught.value)
    assert "GPU_EXPORTER_TLS_CERT_FILE" in message
    assert "GPU_EXPORTER_TLS_KEY_FILE" in message
    assert "{" not in message
    assert str(tmp_path) not in message
