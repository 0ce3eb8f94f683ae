"""A busy leader keeps its Lease: leader election does not queue behind the workers' execs.

The double answers every exec slowly, QPS and BURST are tight, and there are
enough workers that the execs queued at the rate limiter would take longer
than the renew deadline. Leader election has its own client and limiter (as
kube-controller-manager gives it), so its renewals never wait behind them.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gpufleet.core.config import load_settings
from gpufleet.inventory.config import CheckSettings
from gpufleet.inventory.service import check_processor, run_pod_watch
from gpufleet.kube.client import connect
from tests import polling
from tests.doubles.kubeapi import ExecReply, ExecRequest, KubeApiDouble

pytestmark = pytest.mark.integration

NS = "gpu-operator"
LABELS = {"app": "nvidia-device-plugin-daemonset"}
PODS = 30
# 30 workers at 5 requests/s: the last exec of a wave waits 6 s for its token,
# three times the 2 s renew deadline.
QPS, BURST, WORKERS = 5.0, 5, PODS


async def slow_check(request: ExecRequest) -> ExecReply:
    return ExecReply(stdout=b"", delay=0.5)


async def test_a_leader_keeps_its_lease_while_execs_queue_at_the_rate_limiter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpufleet.kube.lease")
    async with KubeApiDouble() as api:
        api.add_node("n0")
        uids = [
            str(api.add_pod(NS, f"dp-{n}", node_name="n0", labels=LABELS)["metadata"]["uid"])
            for n in range(PODS)
        ]
        api.set_exec_handler(slow_check)
        settings = load_settings(
            CheckSettings, cluster_name="c1", command="true", server_port=0,
            spool_dir=tmp_path / "spool", workers=WORKERS, timeout=30.0, qps=QPS, burst=BURST,
            leader_election=True, lease_namespace="gpufleet", lease_name="check-leader",
            lease_duration=3.0, lease_renew_deadline=2.0, lease_retry_period=0.5, pod_name="a",
        )  # fmt: skip
        kube = await connect(settings, configuration=api.client_configuration())
        stop = asyncio.Event()
        watching = run_pod_watch(
            settings, check_processor(settings), kube=kube, registry=CollectorRegistry(), stop=stop
        )
        task = asyncio.create_task(watching)
        try:
            await polling.eventually(lambda: all(api.exec_count(u) >= 1 for u in uids), 60)
            # Renewals go on while the last execs finish.
            renewals = api.count(verb="update", resource="leases")
            await polling.eventually(
                lambda: api.count(verb="update", resource="leases") >= renewals + 2, 10
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await kube.close()
        lease = api.get("leases", "gpufleet", "check-leader")
    stopped = [r for r in caplog.records if r.getMessage() == "stopped leading"]
    started = [r for r in caplog.records if r.getMessage() == "started leading"]
    assert lease is not None
    # Led once, from start to shutdown: the only stop is the release at the end.
    assert (len(started), [getattr(r, "reason", "") for r in stopped]) == (1, ["stopped"])
    assert lease["spec"]["leaseTransitions"] == 0
