"""exec_command over the websocket channel protocol, against the API double."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gpufleet.kube.client import Kube
from gpufleet.kube.errors import ExecError, ExecTimeout
from gpufleet.kube.exec import exec_command
from tests.doubles.kubeapi import ExecHandler, ExecReply, ExecRequest, KubeApiDouble

pytestmark = pytest.mark.integration

NS = "gpu-operator"
CONTAINER = "nvidia-device-plugin"
HANG_GUARD_S = 30.0
"""Fails only a command that never ends; the exec timeout under test is 0.3 s."""


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble() as double:
        double.add_node("gpu-node-1", provider_id="aws:///us-east-1a/i-0abc1234def567890")
        double.set_node_fleet("gpu-node-1", "dgx-h100")
        double.add_pod(NS, "plugin-1", node_name="gpu-node-1", labels={"app": "plugin"})
        yield double


def reply_with(reply: ExecReply, seen: list[ExecRequest] | None = None) -> ExecHandler:
    async def handler(request: ExecRequest) -> ExecReply:
        if seen is not None:
            seen.append(request)
        return reply

    return handler


async def test_exec_returns_stdout_and_a_zero_exit(kube: Kube) -> None:
    result = await exec_command(
        kube, NS, "plugin-1", CONTAINER, ["nvidia-smi", "-q", "-x"], timeout=10
    )

    assert result.exit_code == 0
    assert b"<nvidia_smi_log>" in result.stdout


async def test_the_command_reaches_the_container_as_argv_without_a_shell(
    api: KubeApiDouble, kube: Kube
) -> None:
    seen: list[ExecRequest] = []
    api.set_exec_handler(reply_with(ExecReply(b"ok"), seen))
    argv = ["nvidia-smi", "--query-gpu=serial", "a b; rm -rf /", "$(reboot)"]

    await exec_command(kube, NS, "plugin-1", CONTAINER, argv, timeout=10)

    assert [request.command for request in seen] == [argv]


async def test_a_non_zero_exit_is_a_result_not_an_error(api: KubeApiDouble, kube: Kube) -> None:
    api.set_exec_handler(reply_with(ExecReply(b"partial", b"NVML: driver not loaded", 9)))

    result = await exec_command(kube, NS, "plugin-1", CONTAINER, ["nvidia-smi"], timeout=10)

    assert (result.stdout, result.stderr, result.exit_code) == (
        b"partial",
        b"NVML: driver not loaded",
        9,
    )


async def test_a_hanging_command_times_out(api: KubeApiDouble, kube: Kube) -> None:
    events: list[str] = []
    release = asyncio.Event()

    async def hang(request: ExecRequest) -> ExecReply:
        events.append("command started")
        await release.wait()
        events.append("command finished")
        return ExecReply(b"late")

    api.set_exec_handler(hang)
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            with pytest.raises(ExecTimeout) as caught:
                await exec_command(kube, NS, "plugin-1", CONTAINER, ["nvidia-smi"], timeout=0.3)
        events.append("timed out")
    finally:
        release.set()

    # It gave up while the command still ran: the timeout, not the command, ended the wait.
    assert events == ["command started", "timed out"]
    assert (caught.value.pod, caught.value.timeout) == ("plugin-1", 0.3)


async def test_a_missing_pod_is_an_exec_error_with_status_404(kube: Kube) -> None:
    with pytest.raises(ExecError, match="gone-pod") as caught:
        await exec_command(kube, NS, "gone-pod", CONTAINER, ["nvidia-smi"], timeout=10)

    assert caught.value.status == 404


async def test_a_missing_container_is_an_exec_error_with_status_400(kube: Kube) -> None:
    with pytest.raises(ExecError) as caught:
        await exec_command(kube, NS, "plugin-1", "no-such-container", ["nvidia-smi"], timeout=10)

    assert (caught.value.status, caught.value.container) == (400, "no-such-container")


async def test_a_finished_pod_refuses_exec(api: KubeApiDouble, kube: Kube) -> None:
    api.add_pod(NS, "done", node_name="gpu-node-1", labels={}, ready=False, phase="Succeeded")

    with pytest.raises(ExecError) as caught:
        await exec_command(kube, NS, "done", CONTAINER, ["nvidia-smi"], timeout=10)

    assert caught.value.status == 400


async def test_output_over_the_cap_is_an_exec_error(api: KubeApiDouble, kube: Kube) -> None:
    api.set_exec_handler(reply_with(ExecReply(b"x" * 100_000)))

    with pytest.raises(ExecError, match="output exceeds 4096 bytes"):
        await exec_command(
            kube, NS, "plugin-1", CONTAINER, ["nvidia-smi"], timeout=10, max_output=4096
        )


async def test_a_string_command_is_refused_before_any_request(
    api: KubeApiDouble, kube: Kube
) -> None:
    with pytest.raises(TypeError):
        await exec_command(kube, NS, "plugin-1", CONTAINER, "nvidia-smi -q -x", timeout=10)

    assert api.exec_count() == 0
