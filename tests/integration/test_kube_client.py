"""connect() and the one rate limiter, through the real client against the API double."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufleet.kube.client import Kube, KubeSettings, call_json, connect
from gpufleet.kube.exec import exec_command
from gpufleet.kube.ratelimit import TokenBucket
from gpufleet.kube.watch import Informer
from tests.doubles.kubeapi import ExecReply, ExecRequest, KubeApiDouble
from tests.simulated_time import GrantRecordingBucket, beyond_bucket, held_back

pytestmark = pytest.mark.integration

NS = "gpu-operator"
CONTAINER = "nvidia-device-plugin"


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble() as double:
        double.add_node("gpu-node-1", provider_id="aws:///us-east-1a/i-0abc1234def567890")
        double.add_pod(NS, "plugin-1", node_name="gpu-node-1", labels={"app": "plugin"})

        async def quick(request: ExecRequest) -> ExecReply:
            return ExecReply(b"ok")

        double.set_exec_handler(quick)
        yield double


class CountingBucket(TokenBucket):
    """A bucket that counts the tokens taken."""

    def __init__(self) -> None:
        super().__init__(1000, 1000)
        self.taken = 0

    async def acquire(self) -> None:
        self.taken += 1
        await super().acquire()


async def test_connect_reads_the_kubeconfig(api: KubeApiDouble, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "config")
    settings = KubeSettings(kubeconfig=str(kubeconfig))

    async with await connect(settings) as kube:
        body = await call_json(kube.core.list_namespaced_pod, NS)

    assert [pod["metadata"]["name"] for pod in body["items"]] == ["plugin-1"]


async def test_every_kind_of_call_takes_a_token(api: KubeApiDouble) -> None:
    bucket = CountingBucket()
    async with Kube(api.client_configuration(), bucket) as kube:
        pods = Informer(kube.core.list_namespaced_pod, namespace=NS)  # list + watch
        task = asyncio.create_task(pods.run())
        await pods.synced.wait()
        await kube.core.read_node("gpu-node-1")  # REST, models
        await call_json(kube.coordination.list_namespaced_lease, NS)  # REST, JSON
        await exec_command(kube, NS, "plugin-1", CONTAINER, ["true"], timeout=10)  # websocket
        await pods.synced.wait()
        # The watch follows the list; a pod arriving proves it is open.
        api.add_pod(NS, "plugin-2", node_name="gpu-node-1", labels={"app": "plugin"})
        for _ in range(500):
            if pods.get(NS, "plugin-2") is not None:
                break
            await asyncio.sleep(0.01)
        await pods.stop()
        await task

    assert {request.verb for request in api.requests} >= {"list", "watch", "get", "exec"}
    assert bucket.taken == len(api.requests)


async def test_requests_never_exceed_burst_plus_qps_times_elapsed(api: KubeApiDouble) -> None:
    qps, burst = 100.0, 100
    settings = KubeSettings(qps=qps, burst=burst)
    async with await connect(settings, configuration=api.client_configuration()) as kube:
        assert (kube.limiter.qps, kube.limiter.burst) == (qps, burst)
    # The same bucket on simulated time: a request reaches the API server only
    # after its token was granted, so counting grants against the simulated
    # clock counts what the server sees, without a stopwatch.
    bucket = GrantRecordingBucket(qps, burst)
    async with Kube(api.client_configuration(), bucket) as kube:
        pods = Informer(kube.core.list_namespaced_pod, namespace=NS)
        task = asyncio.create_task(pods.run())
        calls = [kube.core.read_namespaced_pod("plugin-1", NS) for _ in range(240)]
        calls += [kube.core.list_node() for _ in range(40)]
        calls += [
            exec_command(kube, NS, "plugin-1", CONTAINER, ["true"], timeout=30) for _ in range(20)
        ]
        await asyncio.gather(*calls)
        await pods.stop()
        await task

    times = bucket.grants
    assert len(api.requests) >= 300
    # Every request that arrived was granted (a watch granted as the informer stops may not arrive).
    assert len(times) >= len(api.requests)
    assert beyond_bucket(times, qps, burst) == []
    # And the limiter really held them back (unlimited, all would be granted at 0).
    assert held_back(times, qps, burst)
