"""The inventory controller, check mode and agent against the Kubernetes API double.

The real kubernetes_asyncio client talks to ``KubeApiDouble`` over a loopback
socket; exec answers come from the simulated nvidia-smi of each fake node.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gpufleet.core.config import load_settings
from gpufleet.core.http import HealthServer
from gpufleet.core.logging import configure_logging
from gpufleet.core.retry import Backoff
from gpufleet.inventory.config import AgentSettings, CheckSettings, ControllerSettings
from gpufleet.inventory.podwork import PodWorkLoop
from gpufleet.inventory.service import (
    check_processor,
    controller_processor,
    run_agent,
    run_pod_watch,
)
from gpufleet.kube.client import Kube, connect
from gpufleet.kube.watch import Informer
from tests import polling
from tests.doubles.kubeapi import ExecReply, ExecRequest, KubeApiDouble
from tests.simulated_time import GrantRecordingBucket, beyond_bucket, held_back

pytestmark = pytest.mark.integration

NS = "gpu-operator"
LABELS = {"app": "nvidia-device-plugin-daemonset"}


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble() as double:
        yield double


def controller_settings(tmp_path: Path, **overrides: Any) -> ControllerSettings:
    values: dict[str, Any] = {
        "cluster_name": "c1", "exporter_type": ("sqlite",), "sqlite_path": tmp_path / "inv.db",
        "spool_dir": tmp_path / "spool", "server_port": 0, "workers": 4, "timeout": 5.0,
        "leader_election": False, "qps": 500.0, "burst": 1000,
    }  # fmt: skip
    values.update(overrides)
    return load_settings(ControllerSettings, **values)


async def kube_for(api: KubeApiDouble, settings: Any) -> Kube:
    return await connect(settings, configuration=api.client_configuration())


class Running:
    """A controller (or check, or agent) task with its stop event and work loop."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.work: PodWorkLoop | None = None
        self.server: HealthServer | None = None
        self.registry = CollectorRegistry()

    async def halt(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


async def start_watch(
    api: KubeApiDouble, settings: Any, make: Callable[..., Any], *, kube: Kube | None = None
) -> Running:
    """Run the pod watch in a task, on ``kube`` (by default one built from ``settings``)."""
    run = Running()
    if kube is None:
        kube = await kube_for(api, settings)

    async def main() -> None:
        try:
            await run_pod_watch(
                settings, make(settings), kube=kube, registry=run.registry, stop=run.stop,
                started=lambda work, server: run.__dict__.update(work=work, server=server),
            )  # fmt: skip
        finally:
            await kube.close()

    run.task = asyncio.create_task(main())
    return run


async def eventually(check: Callable[[], bool], limit: float = 20.0) -> None:
    """`tests.polling.eventually` with this module's longer hang guard (controllers are slower)."""
    await polling.eventually(check, limit)


def readings(db: Path, where: str = "1=1") -> list[tuple[str, str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT node, machine, source FROM readings WHERE {where}").fetchall()


def uid(api: KubeApiDouble, name: str) -> str:
    pod = api.get("pods", NS, name)
    assert pod is not None
    return str(pod["metadata"]["uid"])


async def test_exactly_one_exec_per_ready_pod_uid(api: KubeApiDouble, tmp_path: Path) -> None:
    for n in range(4):
        api.add_node(f"n{n}", provider_id=f"aws:///us-east-1a/i-{n:017x}")
    api.add_pod(NS, "ready", node_name="n0", labels=LABELS)
    api.add_pod(NS, "not-ready", node_name="n1", labels=LABELS, ready=False)
    api.add_pod(NS, "other-app", node_name="n2", labels={"app": "something-else"})
    api.add_pod("kube-system", "other-namespace", node_name="n3", labels=LABELS)
    run = await start_watch(api, controller_settings(tmp_path), controller_processor)
    db = tmp_path / "inv.db"
    try:
        await eventually(lambda: len(readings(db)) == 8)
        lists = api.count(verb="list", resource="pods")
        # The stream drops, the pod becomes ready meanwhile, and the resume gets 410:
        # the informer must relist, see the change once, and repeat nothing.
        api.drop_watches()
        api.set_pod_ready(NS, "not-ready", True)
        api.expire_history()
        await eventually(lambda: api.count(verb="list", resource="pods") > lists)
        await eventually(lambda: len(readings(db)) == 16)
        api.delete_pod(NS, "ready")
        api.add_pod(NS, "ready", node_name="n0", labels=LABELS)  # same name, new UID
        await eventually(lambda: len(readings(db)) == 24)
        await asyncio.sleep(0.3)  # room for a wrong extra exec to show up
    finally:
        await run.halt()
    assert [api.exec_count(uid(api, "ready")), api.exec_count(uid(api, "not-ready")),
            api.exec_count(uid(api, "other-app")), api.exec_count()] == [1, 1, 0, 3]  # fmt: skip


@pytest.mark.parametrize(
    ("provider_id", "system_uuid", "machine"),
    [
        ("aws:///us-west-2b/i-0123456789abcdef0", "", "i-0123456789abcdef0"),
        ("gce://my-project/us-central1-a/gke-pool-1-abcd", "", "gke-pool-1-abcd"),
        (
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/"
            "virtualMachineScaleSets/gpupool/virtualMachines/7",
            "",
            "gpupool_7",
        ),
        ("", "EC2AB3C4-1111-2222-3333-444455556666", "ec2ab3c4-1111-2222-3333-444455556666"),
    ],
)
async def test_readings_carry_the_machine_of_each_provider_id_form(
    api: KubeApiDouble, tmp_path: Path, provider_id: str, system_uuid: str, machine: str
) -> None:
    api.add_node("gpu-node", provider_id=provider_id, system_uuid=system_uuid)
    api.add_pod(NS, "dp", node_name="gpu-node", labels=LABELS)
    run = await start_watch(api, controller_settings(tmp_path), controller_processor)
    try:
        await eventually(lambda: len(readings(tmp_path / "inv.db")) == 8)
    finally:
        await run.halt()
    assert {m for _, m, _ in readings(tmp_path / "inv.db")} == {machine}


# Times are taken where requests arrive, at the double; a token taken at t reaches
# it a few milliseconds later.
async def test_a_burst_of_300_pods_stays_within_qps_and_burst(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    for n in range(300):
        api.add_node(f"n{n}", provider_id=f"aws:///us-east-1a/i-{n:017x}")
        api.add_pod(NS, f"dp-{n}", node_name=f"n{n}", labels=LABELS)
    api.set_exec_handler(_tiny_smi)
    settings = controller_settings(tmp_path, qps=50.0, burst=100, workers=16)
    # The controller builds its one limiter from QPS and BURST ...
    configured = await kube_for(api, settings)
    await configured.close()
    assert (configured.limiter.qps, configured.limiter.burst) == (50.0, 100)
    # ... and here runs the same bucket on simulated time, so every grant is
    # counted at its simulated moment: what the API saw is bounded by a count,
    # not by a stopwatch on a busy machine.
    bucket = GrantRecordingBucket(50.0, 100)
    run = await start_watch(
        api, settings, controller_processor, kube=Kube(api.client_configuration(), bucket)
    )
    try:
        await eventually(lambda: api.exec_count() == 300, limit=60)
    finally:
        await run.halt()
    # Every request the API saw took a token first (a watch granted as the
    # controller stopped may never arrive).
    assert len(bucket.grants) >= len(api.requests) > 300  # the execs, and the lists and watches
    assert beyond_bucket(bucket.grants, qps=50.0, burst=100) == []
    assert held_back(bucket.grants, qps=50.0, burst=100)


async def _tiny_smi(request: ExecRequest) -> ExecReply:
    return ExecReply(stdout=SMALL_XML)


SMALL_XML = (Path(__file__).parent.parent / "data" / "smi" / "h100_na_serial.xml").read_bytes()


async def test_exec_failures_are_retried_then_given_up_and_retried_on_the_next_update(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    api.add_node("n0", provider_id="aws:///us-east-1a/i-00000000000000000")
    api.add_pod(NS, "flaky", node_name="n0", labels=LABELS)
    failing = {"on": True}

    async def handler(request: ExecRequest) -> ExecReply:
        if failing["on"]:
            return ExecReply(stdout=b"", delay=2.0)  # longer than TIMEOUT
        return ExecReply(stdout=SMALL_XML)

    api.set_exec_handler(handler)
    settings = controller_settings(tmp_path, timeout=0.3, max_retries=2)
    run = await start_watch(api, settings, controller_processor)
    try:
        await eventually(
            lambda: _sample(run, "gpufleet_pods_processed_total", result="gave_up") == 1
        )
        attempts = api.exec_count()
        failing["on"] = False
        api.update_pod(NS, "flaky", lambda pod: pod["metadata"]["labels"].update(touched="1"))
        await eventually(
            lambda: _sample(run, "gpufleet_pods_processed_total", result="success") == 1
        )
    finally:
        await run.halt()
    assert (attempts, api.exec_count()) == (3, 4)


def _sample(run: Running, name: str, **labels: str) -> float:
    value = run.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_only_the_leader_execs_and_the_standby_takes_over_when_it_stops(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    api.add_node("n0", provider_id="aws:///us-east-1a/i-00000000000000000")
    api.add_node("n1", provider_id="aws:///us-east-1a/i-00000000000000001")
    api.add_pod(NS, "first", node_name="n0", labels=LABELS)
    # The stopping leader's release must finish within one retry period; 0.3 s
    # leaves a busy machine room, and waiting out the lease is still 10 reads.
    lease = {
        "leader_election": True, "lease_namespace": "gpufleet", "lease_name": "inv-leader",
        "lease_duration": 3.0, "lease_renew_deadline": 2.0, "lease_retry_period": 0.3,
    }  # fmt: skip
    one = await start_watch(
        api, controller_settings(tmp_path / "a", pod_name="a", **lease), controller_processor
    )
    await eventually(lambda: api.exec_count() == 1)
    standby = controller_settings(tmp_path / "b", pod_name="b", **lease)
    two = await start_watch(api, standby, controller_processor)
    try:
        await eventually(lambda: two.work is not None)
        await asyncio.sleep(0.5)  # the standby is up and must not exec
        standby_execs = api.exec_count()
        await one.halt()
        stopped = len(api.requests)
        released = lease_record(api, "inv-leader")
        api.add_pod(NS, "second", node_name="n1", labels=LABELS)
        await eventually(lambda: api.exec_count(uid(api, "second")) == 1, limit=10)
        taken = lease_record(api, "inv-leader")
    finally:
        await two.halt()
    assert standby_execs == 1
    # The stopping leader hands the Lease back, and the standby takes it at its
    # next read instead of waiting out the lease duration (that would be about
    # lease_duration / lease_retry_period = 10 unanswered reads).
    assert (released["holderIdentity"], taken["holderIdentity"]) == (None, standby.identity)
    assert lease_reads_before_taking(api, "inv-leader", since=stopped) <= 1


def lease_record(api: KubeApiDouble, name: str) -> dict[str, Any]:
    """The spec of the Lease ``name`` in the double, as it stands now."""
    lease = api.get("leases", "gpufleet", name)
    assert lease is not None
    return dict(lease["spec"])


def lease_reads_before_taking(api: KubeApiDouble, name: str, *, since: int) -> int:
    """Reads of the Lease, from request ``since`` on, before the first write to it.

    After the leader has stopped only the standby talks to the Lease, and its
    first write is its taking it.
    """
    verbs = [
        r.verb
        for r in api.requests[since:]
        if r.resource == "leases" and r.name == name and r.verb in {"get", "update"}
    ]
    assert "update" in verbs, "the standby never wrote the Lease"
    return verbs[: verbs.index("update")].count("get")


async def readyz(run: Running) -> int:
    assert run.server is not None
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{run.server.port}/readyz") as response,
    ):
        return response.status


async def test_a_standby_replica_is_ready_once_synced(api: KubeApiDouble, tmp_path: Path) -> None:
    # The stopping leader's release must finish within one retry period; 0.3 s
    # leaves a busy machine room, and waiting out the lease is still 10 reads.
    lease = {
        "leader_election": True, "lease_namespace": "gpufleet", "lease_name": "inv-leader",
        "lease_duration": 3.0, "lease_renew_deadline": 2.0, "lease_retry_period": 0.3,
    }  # fmt: skip
    leader = await start_watch(
        api, controller_settings(tmp_path / "a", pod_name="a", **lease), controller_processor
    )
    await eventually(lambda: leader.work is not None and leader.work.leading)
    standby = await start_watch(
        api, controller_settings(tmp_path / "b", pod_name="b", **lease), controller_processor
    )
    try:
        await eventually(lambda: standby.server is not None)
        statuses = []
        for _ in range(100):
            statuses = [await readyz(leader), await readyz(standby)]
            if statuses == [200, 200]:
                break
            await asyncio.sleep(0.05)
        assert standby.work is not None
        standby_leads = standby.work.leading
    finally:
        await standby.halt()
        await leader.halt()
    assert (statuses, standby_leads) == ([200, 200], False)


async def test_readyz_is_503_while_the_exporter_is_unreachable(
    api: KubeApiDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_ENDPOINT", "http://127.0.0.1:9/unreachable")
    run = await start_watch(api, controller_settings(tmp_path, exporter_type=("http",)),
                            controller_processor)  # fmt: skip
    try:
        await eventually(lambda: run.server is not None)
        status = await readyz(run)
    finally:
        await run.halt()
    assert status == 503


async def test_a_pod_deleted_while_it_waits_gets_no_exec(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    api.add_node("n0", provider_id="aws:///us-east-1a/i-00000000000000000")
    api.add_node("n1", provider_id="aws:///us-east-1a/i-00000000000000001")
    api.add_pod(NS, "slow", node_name="n0", labels=LABELS)
    release = asyncio.Event()

    async def handler(request: ExecRequest) -> ExecReply:
        if request.pod == "slow":
            await release.wait()
        return ExecReply(stdout=SMALL_XML)

    api.set_exec_handler(handler)
    run = await start_watch(api, controller_settings(tmp_path, workers=1), controller_processor)
    try:
        await eventually(lambda: api.exec_count() == 1)  # the only worker is busy
        api.add_pod(NS, "doomed", node_name="n1", labels=LABELS)
        doomed = uid(api, "doomed")
        await eventually(lambda: run.work is not None and len(run.work.queue) == 1)
        api.delete_pod(NS, "doomed")
        await eventually(lambda: len(run.work.queue) == 0)  # type: ignore[union-attr]
        release.set()
        await eventually(
            lambda: _sample(run, "gpufleet_pods_processed_total", result="success") == 1
        )
        await asyncio.sleep(0.3)
    finally:
        await run.halt()
    assert api.exec_count(doomed) == 0


async def test_node_labels_carry_the_serials_and_stale_ones_are_removed(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    api.add_node(
        "n0", provider_id="aws:///us-east-1a/i-00000000000000000",
        labels={"gpufleet.io/gpu-9": "OLD", "team": "ml"},
    )  # fmt: skip
    api.add_pod(NS, "dp", node_name="n0", labels=LABELS)
    run = await start_watch(api, controller_settings(tmp_path, node_labels=True),
                            controller_processor)  # fmt: skip
    try:
        await eventually(lambda: "gpufleet.io/gpu-count" in _labels(api, "n0"))
    finally:
        await run.halt()
    all_labels = _labels(api, "n0")
    labels = {k: v for k, v in all_labels.items() if k.startswith("gpufleet.io/")}
    with sqlite3.connect(tmp_path / "inv.db") as conn:
        serials = dict(conn.execute("SELECT gpu_index, gpu FROM readings").fetchall())
    assert labels == {
        "gpufleet.io/gpu-count": "8",
        **{f"gpufleet.io/gpu-{i}": serial for i, serial in serials.items()},
    }  # fmt: skip
    assert all_labels["team"] == "ml"  # labels that are not ours are left alone


def _labels(api: KubeApiDouble, node: str) -> dict[str, str]:
    obj = api.get("nodes", None, node)
    assert obj is not None
    return dict(obj["metadata"].get("labels") or {})


async def test_gpu_count_gauge_follows_the_last_read(api: KubeApiDouble, tmp_path: Path) -> None:
    api.add_node("n0", provider_id="aws:///us-east-1a/i-00000000000000000")
    api.add_pod(NS, "dp", node_name="n0", labels=LABELS)
    run = await start_watch(api, controller_settings(tmp_path), controller_processor)
    try:
        await eventually(lambda: len(readings(tmp_path / "inv.db")) == 8)
    finally:
        await run.halt()
    assert _sample(run, "gpuid_gpu_count_total", cluster="c1", node="n0") == 8


async def start_check(api: KubeApiDouble, tmp_path: Path, force_restart: bool) -> Running:
    settings = load_settings(
        CheckSettings, cluster_name="c1", command="test -e /dev/nvidia0",
        force_restart=force_restart, server_port=0, spool_dir=tmp_path / "spool",
        leader_election=False, workers=2,
    )  # fmt: skip
    return await start_watch(api, settings, check_processor)


async def failing_check(request: ExecRequest) -> ExecReply:
    return ExecReply(stdout=b"", stderr=b"no device\n", exit_code=1)


async def test_check_mode_logs_a_failing_command_and_keeps_the_pod(
    api: KubeApiDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.add_node("n0")
    api.add_pod(NS, "dp", node_name="n0", labels=LABELS)
    api.set_exec_handler(failing_check)
    caplog.set_level(logging.INFO)
    run = await start_check(api, tmp_path, force_restart=False)
    try:
        await eventually(lambda: any(r.getMessage() == "check failed" for r in caplog.records))
        await asyncio.sleep(0.2)
    finally:
        await run.halt()
    (record,) = [r for r in caplog.records if r.getMessage() == "check failed"]
    assert (record.exit_code, record.stderr, record.pod) == (1, "no device\n", f"{NS}/dp")  # type: ignore[attr-defined]
    assert api.get("pods", NS, "dp") is not None


async def test_check_mode_deletes_a_failing_pod_with_force_restart(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    api.add_node("n0")
    api.add_pod(NS, "dp", node_name="n0", labels=LABELS)
    api.set_exec_handler(failing_check)
    run = await start_check(api, tmp_path, force_restart=True)
    try:
        await eventually(lambda: api.get("pods", NS, "dp") is None)
    finally:
        await run.halt()
    assert api.count(verb="delete", resource="pods") == 1


async def test_agent_reads_simulated_gpus_with_the_machine_from_its_node(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    api.add_node("gpu-7", provider_id="gce://proj/zone/gke-gpu-7")
    settings = load_settings(
        AgentSettings, cluster_name="c1", node_name="gpu-7", simulate="gb200",
        exporter_type=("sqlite",), sqlite_path=tmp_path / "inv.db", server_port=0,
        spool_dir=tmp_path / "spool", scan_interval=3600.0,
    )  # fmt: skip
    kube = await kube_for(api, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_agent(settings, kube=kube, registry=CollectorRegistry(), stop=stop)
    )
    try:
        await eventually(lambda: len(readings(tmp_path / "inv.db")) == 4)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await kube.close()
    assert set(readings(tmp_path / "inv.db")) == {("gpu-7", "gke-gpu-7", "simulated/gb200")}
    assert api.count(subresource="exec") == 0


async def test_agent_stops_delivering_at_a_configuration_error_and_readyz_names_it(
    api: KubeApiDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    posts: list[bytes] = []

    async def not_here(request: web.Request) -> web.Response:
        if request.method == "POST":
            posts.append(await request.read())
        return web.Response(status=404, text="no such route")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_here)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    monkeypatch.setenv("HTTP_ENDPOINT", f"http://127.0.0.1:{runner.addresses[0][1]}/ingest")
    api.add_node("gpu-7", provider_id="gce://proj/zone/gke-gpu-7")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings = load_settings(
        AgentSettings, cluster_name="c1", node_name="gpu-7", simulate="l4",
        exporter_type=("http",), server_port=port, spool_dir=tmp_path / "spool",
        scan_interval=3600.0, flush_interval=0.01, retry_max_backoff=0.01,
    )  # fmt: skip
    kube = await kube_for(api, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_agent(settings, kube=kube, registry=CollectorRegistry(), stop=stop)
    )
    body: dict[str, Any] = {}
    try:
        await eventually(lambda: len(posts) == 1)
        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # until the server is up and the error is known
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as answer:
                        body = await answer.json()
                check = body.get("checks", {}).get("exporter:http", {})
                if "HTTP 404" in check.get("error", ""):
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)  # a stop makes no last attempt here
        await kube.close()
        await runner.cleanup()
    assert (body["ready"], len(posts)) == (False, 1)
    assert "HTTP_ENDPOINT" in body["checks"]["exporter:http"]["error"]
    assert [r.getMessage() for r in caplog.records if "misconfigured" in r.getMessage()] == [
        "exporter misconfigured: not retried; delivery to it stops until the settings are "
        "fixed and the process restarts, and its readings stay in the spool"
    ]


async def test_pods_on_a_hung_node_hold_no_worker_through_their_backoff(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    api.add_node("hung", provider_id="aws:///us-east-1a/i-00000000000000000")
    api.add_node("fine", provider_id="aws:///us-east-1a/i-00000000000000001")
    for n in range(4):  # first in the queue: they take both workers first
        api.add_pod(NS, f"a-hung-{n}", node_name="hung", labels=LABELS)
    for n in range(3):
        api.add_pod(NS, f"b-fine-{n}", node_name="fine", labels=LABELS)
    order: list[str] = []

    async def handler(request: ExecRequest) -> ExecReply:
        order.append(request.pod)
        if request.pod.startswith("a-hung"):
            return ExecReply(stdout=b"", delay=30.0)  # a kubelet that never answers
        return ExecReply(stdout=SMALL_XML)

    api.set_exec_handler(handler)
    # Each failed pod waits 2-4 s before its second attempt; the three healthy
    # pods need a worker for a few milliseconds each.
    settings = controller_settings(
        tmp_path, workers=2, timeout=0.3, max_retries=10, pod_retry_backoff=4.0,
        pod_retry_max_backoff=4.0,
    )  # fmt: skip
    run = await start_watch(api, settings, controller_processor)
    try:
        await eventually(lambda: sum(p.startswith("b-fine") for p in order) == 3)
        await eventually(
            lambda: _sample(run, "gpufleet_pods_processed_total", result="success") == 3
        )
        read_while_retrying = list(order)
        await eventually(lambda: all(order.count(f"a-hung-{n}") >= 2 for n in range(4)))
    finally:
        await run.halt()
    assert sorted(read_while_retrying) == sorted(
        [f"a-hung-{n}" for n in range(4)] + [f"b-fine-{n}" for n in range(3)]
    )  # every pod once: the healthy ones before any failing pod's second attempt
    assert _sample(run, "gpufleet_pods_processed_total", result="gave_up") == 0


def _fill_spool(path: Path, max_bytes: int) -> None:
    """Fill the spool at ``path`` with old readings until one more does not fit."""
    from gpufleet.gpu.smi import parse_smi_xml
    from gpufleet.inventory.reading import readings_from_devices
    from gpufleet.inventory.spool import Spool, SpoolFullError

    path.parent.mkdir(parents=True, exist_ok=True)
    old = readings_from_devices(
        parse_smi_xml(SMALL_XML, origin="old").devices.devices, cluster="c1", node="old",
        machine="old", source="old/pod", read_time=datetime(2020, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    spool = Spool(path, max_bytes=max_bytes)
    try:
        while True:
            spool.append(old)
    except SpoolFullError:
        pass
    finally:
        spool.close()


async def test_a_full_spool_holds_up_no_other_exporter_and_gets_the_same_readings_later(
    api: KubeApiDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[dict[str, Any]] = []
    receiver = {"up": False}

    async def ingest(request: web.Request) -> web.Response:
        if not receiver["up"]:
            return web.Response(status=503, text="receiver down")
        received.extend(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/ingest", ingest)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    monkeypatch.setenv("HTTP_ENDPOINT", f"http://127.0.0.1:{runner.addresses[0][1]}/ingest")
    _fill_spool(tmp_path / "spool" / "http.spool", 64 * 1024)
    api.add_node("n0", provider_id="aws:///us-east-1a/i-00000000000000000")
    api.add_pod(NS, "dp", node_name="n0", labels=LABELS)
    settings = controller_settings(
        tmp_path, exporter_type=("sqlite", "http"), spool_max_bytes=64 * 1024,
        flush_interval=0.01, retry_max_backoff=0.05, max_retries=100,
        pod_retry_backoff=0.1, pod_retry_max_backoff=0.2,
    )  # fmt: skip
    db = tmp_path / "inv.db"
    run = await start_watch(api, settings, controller_processor)
    try:
        await eventually(lambda: len(readings(db)) == 8)  # sqlite took them: not held up
        await eventually(lambda: _sample(run, "gpufleet_pods_processed_total", result="retry") >= 2)
        receiver["up"] = True  # the spool drains: room appears
        await eventually(lambda: sum(r["source"] == f"{NS}/dp" for r in received) == 8)
        await eventually(
            lambda: _sample(run, "gpufleet_pods_processed_total", result="success") == 1
        )
    finally:
        await run.halt()
        await runner.cleanup()
    with sqlite3.connect(db) as conn:
        local = conn.execute("SELECT gpu, read_time FROM readings").fetchall()
    remote = [(r["gpu"], r["read_time"]) for r in received if r["source"] == f"{NS}/dp"]
    assert (len(local), sorted(remote), api.exec_count()) == (8, sorted(local), 1)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The process's JSON log lines (the default format), as configure_logging writes them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("inventory", stream=stream)
    yield stream
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _json_lines(stream: io.StringIO, msg: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["msg"] == msg]


async def test_a_pod_retry_line_in_json_says_why(
    api: KubeApiDouble, tmp_path: Path, json_logs: io.StringIO
) -> None:
    api.add_node("n0", provider_id="aws:///us-east-1a/i-00000000000000000")
    api.add_pod(NS, "dp", node_name="n0", labels=LABELS)

    async def broken(request: ExecRequest) -> ExecReply:
        return ExecReply(stdout=b"", stderr=b"NVML: driver not loaded\n", exit_code=9)

    api.set_exec_handler(broken)
    settings = controller_settings(
        tmp_path, max_retries=1, pod_retry_backoff=0.05, pod_retry_max_backoff=0.05
    )
    run = await start_watch(api, settings, controller_processor)
    try:
        await eventually(
            lambda: _sample(run, "gpufleet_pods_processed_total", result="gave_up") == 1
        )
    finally:
        await run.halt()
    (retry,) = _json_lines(json_logs, "pod processing failed; retrying")
    (give_up,) = _json_lines(json_logs, "giving up on pod until its next update")
    assert [line.get("error", "") for line in (retry, give_up)] == [
        f"{NS}/dp: nvidia-smi exited 9: NVML: driver not loaded"
    ] * 2


async def test_a_list_failure_line_in_json_says_why(
    api: KubeApiDouble, tmp_path: Path, json_logs: io.StringIO
) -> None:
    kube = await kube_for(api, controller_settings(tmp_path))
    # The server refuses the list (400: a field it cannot select on), as a broken
    # or hostile apiserver may: the informer retries, and says why.
    informer = Informer(
        kube.core.list_namespaced_pod, namespace=NS, field_selector="spec.bogus=1",
        backoff=Backoff(initial=0.05, cap=0.05),
    )  # fmt: skip
    task = asyncio.create_task(informer.run())
    try:
        await eventually(lambda: bool(_json_lines(json_logs, "list/watch failed, retrying")))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()
    line = _json_lines(json_logs, "list/watch failed, retrying")[0]
    assert ("ApiException" in line["error"], line["status"]) == (True, 400)
