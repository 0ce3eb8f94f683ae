"""The contract of ``KubeApiDouble``, checked with the real ``kubernetes_asyncio`` client.

Each test states one behaviour of the real API server that gpufleet relies on,
and shows the double reproducing it over a loopback socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import config, watch
from kubernetes_asyncio.client import (
    ApiClient,
    CoordinationV1Api,
    CoreV1Api,
    V1Lease,
    V1LeaseSpec,
    V1ObjectMeta,
)
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.leaderelection import electionconfig, leaderelection
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock
from kubernetes_asyncio.stream import WsApiClient

from gpufleet.gpu.smi import parse_smi_xml
from tests.doubles.kubeapi import ExecReply, ExecRequest, KubeApiDouble
from tests.integration.kubeapi_double_support import collect

pytestmark = pytest.mark.integration

NS = "gpu-operator"
PLUGIN = {"app": "nvidia-device-plugin"}
SMI = ["nvidia-smi", "-q", "-x"]


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble(bookmark_interval=0.2) as double:
        yield double


@pytest.fixture
async def core(api: KubeApiDouble) -> AsyncIterator[CoreV1Api]:
    async with ApiClient(api.client_configuration()) as client:
        yield CoreV1Api(client)


@pytest.fixture
async def ws(api: KubeApiDouble) -> AsyncIterator[CoreV1Api]:
    async with WsApiClient(api.client_configuration()) as client:
        yield CoreV1Api(client)


@pytest.fixture
async def leases(api: KubeApiDouble) -> AsyncIterator[CoordinationV1Api]:
    async with ApiClient(api.client_configuration()) as client:
        yield CoordinationV1Api(client)


async def run_exec(
    ws: CoreV1Api, pod: str, command: list[str], **kwargs: Any
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Exec through the websocket and split the channels: (stdout, stderr, status)."""
    stdout, stderr, status = b"", b"", {}
    connection = await ws.connect_get_namespaced_pod_exec(
        pod, NS, command=command, stdout=True, stderr=True, stdin=False, tty=False,
        _preload_content=False, **kwargs,
    )  # fmt: skip
    async with connection as sock:
        async for message in sock:
            assert message.type == aiohttp.WSMsgType.BINARY
            channel, data = message.data[0], message.data[1:]
            if channel == 1:
                stdout += data
            elif channel == 2:
                stderr += data
            elif channel == 3:
                status = json.loads(data)
    return stdout, stderr, status


# --- objects and lists -----------------------------------------------------------------


async def test_objects_carry_uid_timestamp_and_one_global_resource_version(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_node("node-1", provider_id="aws:///us-east-1a/i-0abc", system_uuid="ec2a-1")
    api.add_pod(NS, "plugin-1", node_name="node-1", labels=PLUGIN)

    node = (await core.list_node()).items[0]
    pods = await core.list_namespaced_pod(NS)

    assert node.metadata.resource_version == "1"
    assert pods.items[0].metadata.resource_version == "2"
    assert pods.metadata.resource_version == "2"
    assert pods.items[0].metadata.uid
    assert pods.items[0].metadata.creation_timestamp
    assert node.spec.provider_id == "aws:///us-east-1a/i-0abc"
    assert node.status.node_info.system_uuid == "ec2a-1"


async def test_label_selectors_equality_inequality_and_sets(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "a", node_name="n1", labels={"app": "plugin", "tier": "gold"})
    api.add_pod(NS, "b", node_name="n1", labels={"app": "plugin", "tier": "silver"})
    api.add_pod(NS, "c", node_name="n2", labels={"app": "other"})

    async def names(selector: str) -> list[str]:
        pods = await core.list_namespaced_pod(NS, label_selector=selector)
        return [p.metadata.name for p in pods.items]

    assert await names("app=plugin") == ["a", "b"]
    assert await names("app!=plugin") == ["c"]
    assert await names("tier in (gold,bronze)") == ["a"]
    assert await names("app=plugin,tier notin (gold)") == ["b"]
    assert await names("!tier") == ["c"]


async def test_field_selectors_on_node_name_and_name(api: KubeApiDouble, core: CoreV1Api) -> None:
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)
    api.add_pod(NS, "b", node_name="n2", labels=PLUGIN)
    api.add_pod("other", "c", node_name="n1", labels=PLUGIN)

    on_n1 = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    named = await core.list_namespaced_pod(NS, field_selector="metadata.name=b")

    assert sorted(p.metadata.name for p in on_n1.items) == ["a", "c"]
    assert [p.metadata.name for p in named.items] == ["b"]


async def test_unsupported_field_selector_is_a_bad_request(core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_pod(NS, field_selector="spec.schedulerName=x")
    assert caught.value.status == 400


async def test_list_pages_with_limit_and_continue(api: KubeApiDouble, core: CoreV1Api) -> None:
    for i in range(5):
        api.add_pod(NS, f"p{i}", node_name="n1", labels=PLUGIN)

    first = await core.list_namespaced_pod(NS, limit=2)
    rest = await core.list_namespaced_pod(NS, limit=10, _continue=first.metadata._continue)

    assert [p.metadata.name for p in first.items] == ["p0", "p1"]
    assert first.metadata.remaining_item_count == 3
    assert [p.metadata.name for p in rest.items] == ["p2", "p3", "p4"]
    assert rest.metadata.resource_version == first.metadata.resource_version


async def test_continue_token_from_expired_history_is_gone(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    for i in range(3):
        api.add_pod(NS, f"p{i}", node_name="n1", labels=PLUGIN)
    first = await core.list_namespaced_pod(NS, limit=1)
    api.add_pod(NS, "late", node_name="n1", labels=PLUGIN)
    api.expire_history()

    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_pod(NS, limit=1, _continue=first.metadata._continue)
    assert caught.value.status == 410


async def test_a_paginated_list_at_a_compacted_version_is_gone(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "p0", node_name="n1", labels=PLUGIN)
    old = (await core.list_namespaced_pod(NS)).metadata.resource_version
    api.add_pod(NS, "p1", node_name="n1", labels=PLUGIN)
    api.expire_history()

    # Read from etcd at that exact revision (the legacy rule for limit + version).
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_pod(NS, limit=10, resource_version=old)
    served = [
        await core.list_namespaced_pod(NS, resource_version=old),  # the watch cache: present
        await core.list_namespaced_pod(NS, limit=10, resource_version="0"),
        await core.list_namespaced_pod(NS, limit=10),  # consistent
    ]
    assert caught.value.status == 410
    assert [len(body.items) for body in served] == [2, 2, 2]
    assert api.etcd_list_count("pods") == 3  # the first, the refused one, the consistent one


async def test_a_continue_token_with_a_resource_version_is_a_bad_request(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    for i in range(3):
        api.add_pod(NS, f"p{i}", node_name="n1", labels=PLUGIN)
    first = await core.list_namespaced_pod(NS, limit=1, resource_version="0")
    token = first.metadata._continue

    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_pod(
            NS, limit=1, _continue=token, resource_version=first.metadata.resource_version
        )
    rest = await core.list_namespaced_pod(NS, limit=5, _continue=token, resource_version="0")
    assert caught.value.status == 400
    assert [p.metadata.name for p in rest.items] == ["p1", "p2"]


async def test_a_restore_takes_versions_back_and_refuses_the_newer_ones(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "p0", node_name="n1", labels=PLUGIN)
    backup = api.backup()
    api.add_pod(NS, "p1", node_name="n1", labels=PLUGIN)
    newer = (await core.list_namespaced_pod(NS)).metadata.resource_version
    api.restore(backup)

    listed = await core.list_namespaced_pod(NS)
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_pod(NS, resource_version=newer)
    stream = watch.Watch().stream(
        core.list_namespaced_pod, NS, resource_version=newer, timeout_seconds=5
    )
    with pytest.raises(ApiException) as in_stream:
        await collect(stream, 1)
    again = api.add_pod(NS, "p2", node_name="n1", labels=PLUGIN)
    assert [p.metadata.name for p in listed.items] == ["p0"]
    assert int(listed.metadata.resource_version) < int(newer)
    assert caught.value.status == 504
    assert "Too large resource version" in caught.value.body
    assert in_stream.value.status == 504
    assert again["metadata"]["resourceVersion"] == newer  # handed out again, to another write


async def test_unknown_path_is_a_404_status(core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_config_map(NS)
    assert caught.value.status == 404
    assert json.loads(caught.value.body)["kind"] == "Status"


async def test_missing_pod_is_a_404_status(core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as caught:
        await core.read_namespaced_pod("nope", NS)
    assert caught.value.status == 404
    assert json.loads(caught.value.body)["reason"] == "NotFound"


# --- writes ----------------------------------------------------------------------------


async def test_node_label_merge_patch_with_null_removes_the_label(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_node("node-1", labels={"gpufleet.io/stale": "yes", "keep": "me"})

    await core.patch_node(
        "node-1",
        {"metadata": {"labels": {"gpufleet.io/stale": None, "gpufleet.io/gpus": "8"}}},
        _content_type="application/merge-patch+json",
    )

    labels = api.get("nodes", None, "node-1")["metadata"]["labels"]  # type: ignore[index]
    assert "gpufleet.io/stale" not in labels
    assert labels["gpufleet.io/gpus"] == "8"
    assert labels["keep"] == "me"


async def test_strategic_merge_patch_is_applied_as_merge_patch(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_node("node-1", labels={"old": "x"})

    node = await core.patch_node("node-1", {"metadata": {"labels": {"old": None, "new": "y"}}})

    assert "old" not in node.metadata.labels
    assert node.metadata.labels["new"] == "y"


async def test_json_patch_adds_a_pod_label(api: KubeApiDouble, core: CoreV1Api) -> None:
    api.add_pod(NS, "p", node_name="n1", labels=PLUGIN)

    pod = await core.patch_namespaced_pod(
        "p", NS, [{"op": "add", "path": "/metadata/labels/gpufleet.io~1seen", "value": "1"}]
    )

    assert pod.metadata.labels["gpufleet.io/seen"] == "1"


async def test_patch_carrying_a_stale_resource_version_conflicts(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    stale = api.add_node("node-1")["metadata"]["resourceVersion"]
    api.add_pod(NS, "p", node_name="node-1", labels=PLUGIN)  # any write moves the counter on
    await core.patch_node("node-1", {"metadata": {"labels": {"a": "1"}}})

    with pytest.raises(ApiException) as caught:
        await core.patch_node(
            "node-1", {"metadata": {"resourceVersion": stale, "labels": {"a": "2"}}}
        )
    assert caught.value.status == 409


async def test_set_pod_ready_flips_containers_and_the_ready_condition(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "p", node_name="n1", labels=PLUGIN, uid="uid-1", containers=("a", "b"))

    api.set_pod_ready(NS, "p", False)
    pod = await core.read_namespaced_pod("p", NS)

    assert pod.metadata.uid == "uid-1"
    assert [c.ready for c in pod.status.container_statuses] == [False, False]
    assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "False"


async def test_lease_create_of_existing_name_is_already_exists(leases: CoordinationV1Api) -> None:
    body = V1Lease(metadata=V1ObjectMeta(name="gpufleet"), spec=V1LeaseSpec(holder_identity="a"))
    await leases.create_namespaced_lease(NS, body)

    with pytest.raises(ApiException) as caught:
        await leases.create_namespaced_lease(NS, body)
    assert caught.value.status == 409
    assert json.loads(caught.value.body)["reason"] == "AlreadyExists"


async def test_lease_replace_from_a_stale_resource_version_conflicts(
    leases: CoordinationV1Api,
) -> None:
    body = V1Lease(metadata=V1ObjectMeta(name="gpufleet"), spec=V1LeaseSpec(holder_identity="a"))
    created = await leases.create_namespaced_lease(NS, body)
    created.spec.holder_identity = "b"
    await leases.replace_namespaced_lease("gpufleet", NS, created)  # wins: its version was current
    created.spec.holder_identity = "c"

    with pytest.raises(ApiException) as caught:
        await leases.replace_namespaced_lease("gpufleet", NS, created)  # loses: now stale
    assert caught.value.status == 409
    assert json.loads(caught.value.body)["reason"] == "Conflict"
    assert (await leases.read_namespaced_lease("gpufleet", NS)).spec.holder_identity == "b"


async def test_kubernetes_asyncio_leader_election_acquires_the_lease(
    api: KubeApiDouble, leases: CoordinationV1Api
) -> None:
    leading = asyncio.Event()

    async def on_started() -> None:
        leading.set()

    async def on_stopped() -> None:
        pass

    lock = LeaseLock("gpufleet-leader", NS, "candidate-a", leases.api_client)
    election = leaderelection.LeaderElection(
        electionconfig.Config(lock, lease_duration=3, renew_deadline=2, retry_period=1,
                              onstarted_leading=on_started, onstopped_leading=on_stopped)
    )  # fmt: skip
    task = asyncio.create_task(election.run())
    try:
        await asyncio.wait_for(leading.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert api.get("leases", NS, "gpufleet-leader")["spec"]["holderIdentity"] == "candidate-a"  # type: ignore[index]


async def test_deleted_pod_disappears_and_watchers_see_deleted(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "p", node_name="n1", labels=PLUGIN)
    listed = await core.list_namespaced_pod(NS)
    stream = watch.Watch().stream(
        core.list_namespaced_pod,
        NS,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=5,
    )

    await core.delete_namespaced_pod("p", NS)
    events = await collect(stream, 1)
    await stream.close()

    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "p")]
    assert api.get("pods", NS, "p") is None


# --- watch -----------------------------------------------------------------------------


async def test_watch_from_list_resource_version_sees_only_later_events(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "before", node_name="n1", labels=PLUGIN)
    listed = await core.list_namespaced_pod(NS)
    api.add_pod(NS, "after", node_name="n1", labels=PLUGIN)
    api.set_pod_ready(NS, "before", False)

    stream = watch.Watch().stream(
        core.list_namespaced_pod,
        NS,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=5,
    )
    events = await collect(stream, 2)
    await stream.close()

    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "after"),
        ("MODIFIED", "before"),
    ]
    assert events[1]["object"].status.container_statuses[0].ready is False


async def test_watch_without_resource_version_starts_with_synthetic_added(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)
    api.add_pod(NS, "b", node_name="n1", labels={"app": "other"})

    stream = watch.Watch().stream(
        core.list_namespaced_pod, NS, label_selector="app=nvidia-device-plugin", timeout_seconds=5
    )
    events = await collect(stream, 1)
    await stream.close()

    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "a")]


async def test_pod_leaving_the_selector_is_deleted_for_the_watcher(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)
    listed = await core.list_namespaced_pod(NS, label_selector="app=nvidia-device-plugin")
    stream = watch.Watch().stream(
        core.list_namespaced_pod, NS, label_selector="app=nvidia-device-plugin",
        resource_version=listed.metadata.resource_version, timeout_seconds=5,
    )  # fmt: skip

    api.update_pod(NS, "a", lambda pod: pod["metadata"]["labels"].update(app="retired"))
    events = await collect(stream, 1)
    await stream.close()

    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "a")]


async def test_bookmarks_carry_the_current_resource_version(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)
    listed = await core.list_namespaced_pod(NS)
    api.add_node("elsewhere")  # bumps the global version; pods watchers learn it by bookmark

    stream = watch.Watch().stream(
        core.list_namespaced_pod, NS, resource_version=listed.metadata.resource_version,
        allow_watch_bookmarks=True, timeout_seconds=5,
    )  # fmt: skip
    events = await collect(stream, 1)
    await stream.close()

    assert events[0]["type"] == "BOOKMARK"
    assert events[0]["raw_object"]["metadata"]["resourceVersion"] == str(api.resource_version)
    assert stream.resource_version == str(api.resource_version)


async def test_timeout_seconds_ends_the_stream(core: CoreV1Api) -> None:
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1)

    events = await asyncio.wait_for(collect_all(stream), 5)

    assert events == []


async def collect_all(stream: watch.Watch) -> list[dict[str, Any]]:
    return [event async for event in stream]


async def test_watch_from_expired_resource_version_sends_a_410_error_event(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)  # resourceVersion 1
    api.add_pod(NS, "b", node_name="n1", labels=PLUGIN)  # resourceVersion 2
    api.expire_history()

    response = await asyncio.wait_for(
        core.list_namespaced_pod(NS, watch=True, resource_version="1", _preload_content=False), 5
    )
    lines = (await asyncio.wait_for(response.content.read(), 5)).splitlines()
    response.close()

    assert response.status == 200
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert (event["object"]["kind"], event["object"]["code"], event["object"]["reason"]) == (
        "Status",
        410,
        "Expired",
    )


async def test_watch_stream_raises_410_after_expire_history(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)
    listed = await core.list_namespaced_pod(NS)
    api.add_pod(NS, "b", node_name="n1", labels=PLUGIN)
    api.expire_history()

    # Without timeout_seconds kubernetes_asyncio retries a 410 once, from the same
    # version; the retry is gone too, so the caller sees the 410 and must relist.
    stream = watch.Watch().stream(
        core.list_namespaced_pod, NS, resource_version=listed.metadata.resource_version
    )
    with pytest.raises(ApiException) as caught:
        await asyncio.wait_for(collect_all(stream), 5)

    assert caught.value.status == 410
    assert api.count(verb="watch", resource="pods") == 2


async def test_relist_after_expire_history_is_served_and_can_be_watched_from(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)
    api.expire_history()

    relisted = await core.list_namespaced_pod(NS)
    stream = watch.Watch().stream(
        core.list_namespaced_pod,
        NS,
        resource_version=relisted.metadata.resource_version,
        timeout_seconds=5,
    )
    api.add_pod(NS, "b", node_name="n1", labels=PLUGIN)
    events = await collect(stream, 1)
    await stream.close()

    assert [p.metadata.name for p in relisted.items] == ["a"]
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "b")]


async def test_drop_watches_ends_the_stream(api: KubeApiDouble, core: CoreV1Api) -> None:
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=30)
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)
    await collect(stream, 1)

    api.drop_watches()
    rest = await asyncio.wait_for(collect_all(stream), 5)

    assert rest == []


async def test_client_resumes_after_drop_from_its_last_version_without_duplicates(
    api: KubeApiDouble, core: CoreV1Api
) -> None:
    listed = await core.list_namespaced_pod(NS)
    stream = watch.Watch().stream(
        core.list_namespaced_pod, NS, resource_version=listed.metadata.resource_version
    )
    api.add_pod(NS, "a", node_name="n1", labels=PLUGIN)
    first = await collect(stream, 1)

    api.drop_watches()
    api.add_pod(NS, "b", node_name="n1", labels=PLUGIN)
    second = await collect(stream, 1)
    await stream.close()

    assert [e["object"].metadata.name for e in first + second] == ["a", "b"]
    assert api.count(verb="watch", resource="pods") == 2


# --- exec ------------------------------------------------------------------------------


async def test_exec_returns_stdout_stderr_and_success(api: KubeApiDouble, ws: CoreV1Api) -> None:
    api.add_pod(NS, "p", node_name="n1", labels=PLUGIN)

    async def handler(request: ExecRequest) -> ExecReply:
        return ExecReply(stdout=f"hello from {request.node_name}".encode(), stderr=b"warning\n")

    api.set_exec_handler(handler)
    stdout, stderr, status = await run_exec(ws, "p", ["echo", "hi"])

    assert (stdout, stderr) == (b"hello from n1", b"warning\n")
    assert status["status"] == "Success"
    assert WsApiClient.parse_error_data(json.dumps(status)) == 0


async def test_exec_reports_a_non_zero_exit_code_on_channel_3(
    api: KubeApiDouble, ws: CoreV1Api
) -> None:
    api.add_pod(NS, "p", node_name="n1", labels=PLUGIN)

    _, stderr, status = await run_exec(ws, "p", ["lspci"])

    assert stderr == b"sh: 1: lspci: not found\n"
    assert (status["status"], status["reason"]) == ("Failure", "NonZeroExitCode")
    assert WsApiClient.parse_error_data(json.dumps(status)) == 127


async def test_exec_handler_sees_the_pod_container_and_command(
    api: KubeApiDouble, ws: CoreV1Api
) -> None:
    pod = api.add_pod(NS, "p", node_name="n1", labels=PLUGIN, containers=("plugin", "sidecar"))
    seen: list[ExecRequest] = []

    async def handler(request: ExecRequest) -> ExecReply:
        seen.append(request)
        return ExecReply(stdout=b"")

    api.set_exec_handler(handler)
    await run_exec(ws, "p", ["true", "--flag"], container="sidecar")

    assert seen == [
        ExecRequest(NS, "p", "sidecar", ["true", "--flag"], "n1", pod["metadata"]["uid"])
    ]


async def test_default_handler_answers_nvidia_smi_with_eight_gpus(
    api: KubeApiDouble, ws: CoreV1Api
) -> None:
    api.add_pod(NS, "p", node_name="node-1", labels=PLUGIN)

    stdout, _, status = await run_exec(ws, "p", SMI)

    report = parse_smi_xml(stdout, origin="node-1")
    assert len(report.devices.devices) == 8
    assert status["status"] == "Success"


async def test_every_node_has_its_own_gpus(api: KubeApiDouble, ws: CoreV1Api) -> None:
    api.add_pod(NS, "p1", node_name="node-1", labels=PLUGIN)
    api.add_pod(NS, "p2", node_name="node-2", labels=PLUGIN)

    one = parse_smi_xml((await run_exec(ws, "p1", SMI))[0])
    two = parse_smi_xml((await run_exec(ws, "p2", SMI))[0])

    assert not {d.uuid for d in one.devices.devices} & {d.uuid for d in two.devices.devices}


async def test_node_fleet_preset_sets_the_gpus_behind_nvidia_smi(
    api: KubeApiDouble, ws: CoreV1Api
) -> None:
    api.add_pod(NS, "p", node_name="node-1", labels=PLUGIN)
    api.set_node_fleet("node-1", "l4")

    report = parse_smi_xml((await run_exec(ws, "p", SMI))[0])

    assert [d.product_name for d in report.devices.devices] == ["NVIDIA L4"]


async def test_preloaded_exec_output_is_the_whole_document(
    api: KubeApiDouble, ws: CoreV1Api
) -> None:
    api.add_pod(NS, "p", node_name="node-1", labels=PLUGIN)

    text = await ws.connect_get_namespaced_pod_exec(
        "p", NS, command=SMI, stdout=True, stderr=True, stdin=False, tty=False
    )

    assert len(parse_smi_xml(text).devices.devices) == 8


async def test_exec_on_a_succeeded_pod_is_refused(api: KubeApiDouble, ws: CoreV1Api) -> None:
    api.add_pod(NS, "done", node_name="n1", labels=PLUGIN, phase="Succeeded", ready=False)

    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await run_exec(ws, "done", SMI)

    assert caught.value.status == 400
    assert api.exec_count() == 1


async def test_exec_into_an_unknown_container_is_refused(api: KubeApiDouble, ws: CoreV1Api) -> None:
    api.add_pod(NS, "p", node_name="n1", labels=PLUGIN)

    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await run_exec(ws, "p", SMI, container="nope")

    assert caught.value.status == 400


async def test_exec_on_a_missing_pod_is_not_found(ws: CoreV1Api) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await run_exec(ws, "ghost", SMI)

    assert caught.value.status == 404


async def test_exec_reply_delay_simulates_a_hanging_command(
    api: KubeApiDouble, ws: CoreV1Api
) -> None:
    api.add_pod(NS, "p", node_name="n1", labels=PLUGIN)

    async def hang(request: ExecRequest) -> ExecReply:
        return ExecReply(stdout=b"late", delay=30)

    api.set_exec_handler(hang)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_exec(ws, "p", SMI), 0.5)


# --- accounting and configuration ------------------------------------------------------


async def test_requests_are_recorded_with_verbs_and_monotonic_times(
    api: KubeApiDouble, core: CoreV1Api, ws: CoreV1Api
) -> None:
    pod = api.add_pod(NS, "p", node_name="n1", labels=PLUGIN)
    await core.list_namespaced_pod(NS)
    await core.read_namespaced_pod("p", NS)
    await core.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"x": "1"}}})
    await run_exec(ws, "p", SMI)
    await run_exec(ws, "p", SMI)

    assert [r.verb for r in api.requests] == ["list", "get", "patch", "exec", "exec"]
    assert api.count(verb="list", resource="pods") == 1
    assert api.count(subresource="exec") == 2
    assert api.exec_count(pod["metadata"]["uid"]) == 2
    times = [r.time for r in api.requests]
    assert times == sorted(times)


async def test_kubeconfig_points_the_client_at_the_double(
    api: KubeApiDouble, tmp_path: Path
) -> None:
    api.add_node("node-1")
    path = api.write_kubeconfig(tmp_path / "kubeconfig")

    client = await config.new_client_from_config(config_file=str(path))
    async with client:
        nodes = await CoreV1Api(client).list_node()

    assert [n.metadata.name for n in nodes.items] == ["node-1"]


async def test_discovery_lists_the_emulated_resources(api: KubeApiDouble) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{api.url}/api/v1") as response:
            core = await response.json()
        async with session.get(f"{api.url}/apis/coordination.k8s.io/v1") as response:
            coordination = await response.json()

    assert {"pods", "nodes", "pods/exec"} <= {r["name"] for r in core["resources"]}
    assert "leases" in {r["name"] for r in coordination["resources"]}


async def test_kmock_reactions_answer_paths_the_double_does_not_emulate(api: KubeApiDouble) -> None:
    api.kmock["get /apis/metrics.k8s.io/v1beta1/nodes"] << {"kind": "NodeMetricsList", "items": []}

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api.url}/apis/metrics.k8s.io/v1beta1/nodes") as response,
    ):
        body = await response.json()

    assert body["kind"] == "NodeMetricsList"
    assert [(r.verb, r.resource) for r in api.requests] == [("get", None)]
