"""connect(): which configuration it picks, and how it fails (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes_asyncio.client.configuration import Configuration

from gpufleet.kube.client import KubeSettings, connect
from gpufleet.kube.errors import KubeError


async def test_in_a_pod_without_kubeconfig_it_uses_the_service_account() -> None:
    settings = KubeSettings(kubernetes_service_host="10.0.0.1", kubeconfig=None)

    # No service-account token exists on this machine, which proves the path taken.
    with pytest.raises(KubeError, match=r"^in-cluster configuration"):
        await connect(settings)


async def test_kubeconfig_wins_over_the_in_cluster_environment(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    settings = KubeSettings(kubernetes_service_host="10.0.0.1", kubeconfig=str(missing))

    with pytest.raises(KubeError, match=f"^kubeconfig {missing}"):
        await connect(settings)


async def test_a_given_configuration_is_used_as_is() -> None:
    configuration = Configuration(host="http://127.0.0.1:1")

    async with await connect(KubeSettings(qps=5, burst=10), configuration=configuration) as kube:
        assert kube.api_client.configuration is configuration
        assert (kube.limiter.qps, kube.limiter.burst) == (5.0, 10)
