"""connect(): which configuration it picks, and how it fails (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes_asyncio.client.configuration import Configuration

from gpufleet.core.errors import ConfigError
from gpufleet.kube.client import KubeConfigError, KubeSettings, connect
from gpufleet.kube.errors import KubeError


async def test_in_a_pod_without_kubeconfig_it_uses_the_service_account() -> None:
    settings = KubeSettings(kubernetes_service_host="10.0.0.1", kubeconfig=None)

    # No service-account token exists on this machine, which proves the path taken.
    with pytest.raises(KubeError, match=r"^in-cluster configuration"):
        await connect(settings)


async def test_kubeconfig_wins_over_the_in_cluster_environment(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    settings = KubeSettings(kubernetes_service_host="10.0.0.1", kubeconfig=str(missing))

    with pytest.raises(KubeError, match=f"^no usable kubeconfig {missing} \\(missing\\)"):
        await connect(settings)


async def test_a_given_configuration_is_used_as_is() -> None:
    configuration = Configuration(host="http://127.0.0.1:1")

    async with await connect(KubeSettings(qps=5, burst=10), configuration=configuration) as kube:
        assert kube.api_client.configuration is configuration
        assert (kube.limiter.qps, kube.limiter.burst) == (5.0, 10)


GOOD_KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: test
contexts:
- name: test
  context: {cluster: test, user: test}
clusters:
- name: test
  cluster: {server: "http://127.0.0.1:1"}
users:
- name: test
  user: {token: abc}
"""


def test_the_kubeconfig_error_is_both_a_kube_and_a_configuration_error() -> None:
    assert issubclass(KubeConfigError, KubeError)
    assert issubclass(KubeConfigError, ConfigError)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "missing"),
        ("", "empty"),
        ("apiVersion: v1\nkind: Config\n", "no current-context"),
        ("current-context: [unclosed\n", "not YAML"),
        ("- just\n- a list\n", "not a YAML mapping"),
    ],
)
async def test_an_unusable_kubeconfig_says_which_file_and_what_is_wrong(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "config"
    if content is not None:
        path.write_text(content)

    with pytest.raises(KubeConfigError) as caught:
        await connect(KubeSettings(kubeconfig=str(path), kubernetes_service_host=None))

    message = str(caught.value)
    assert f"{path} ({problem})" in message
    assert "KUBERNETES_SERVICE_HOST is unset" in message
    assert "Expected key" not in message
    assert "\n" not in message


async def test_without_kubeconfig_the_default_file_in_home_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST is unset") as caught:
        await connect(KubeSettings(kubeconfig=None, kubernetes_service_host=None))

    assert f"{tmp_path / '.kube' / 'config'} (missing)" in str(caught.value)


async def test_every_file_of_a_kubeconfig_list_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    missing = tmp_path / "missing"

    with pytest.raises(KubeConfigError) as caught:
        await connect(KubeSettings(kubeconfig=f"{missing}:{empty}", kubernetes_service_host=None))

    assert f"{missing} (missing), {empty} (empty)" in str(caught.value)


async def test_in_a_pod_a_missing_kubeconfig_says_why_the_service_account_is_unused(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere"
    settings = KubeSettings(kubernetes_service_host="10.0.0.1", kubeconfig=str(missing))

    with pytest.raises(KubeConfigError, match="KUBECONFIG is set"):
        await connect(settings)


async def test_missing_entries_of_a_list_are_skipped_as_kubectl_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good"
    good.write_text(GOOD_KUBECONFIG)
    settings = KubeSettings(kubeconfig=f"{tmp_path / 'missing'}:{good}")

    async with await connect(settings) as kube:
        assert kube.configuration.host == "http://127.0.0.1:1"
    assert "Config not found" not in caplog.text
