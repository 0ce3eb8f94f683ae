"""The NVML provider through the simulator, against the real server over a unix socket.

Each test runs a real ``serve`` on a socket in a temp dir and a ``GpuProvider``
over ``NvmlSource(SimulatedNvml)`` talking to it through ``DeviceApiClient``,
with a short health interval; the test holds the simulated library to inject
XIDs and lost GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.health import CONDITION_HEALTHY
from gpufleet.deviceapi.provider_cli import CLIENT_OPTIONS
from gpufleet.deviceapi.v1alpha1.gpu_pb2 import Condition, Gpu
from gpufleet.deviceapi.xid_events import XID_POLL_S
from gpufleet.gpu import sim
from gpufleet.gpu.model import DeviceList, GpuProcess, GpuSample, XidEvent
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.source import GpuError, GpuSource, XidEventStream
from tests import polling
from tests.integration.deviceapi_harness import (
    DEADLINE,
    INTERVAL,
    RunningProvider,
    Server,
    start_provider,
    start_server,
)

pytestmark = pytest.mark.integration


async def eventually(check: Callable[[], Awaitable[bool]], within: float = DEADLINE) -> None:
    """Poll ``check`` until it is true; server errors while polling count as "not yet".

    ``check`` is async (it asks the server), so a task polls it and
    ``tests.polling.eventually`` guards the task against a hang; the last
    error seen while polling is added to the failure.
    """
    errors: list[Exception] = []

    async def poll() -> None:
        while True:
            try:
                if await check():
                    return
            except Exception as exc:
                errors[:] = [exc]
            await asyncio.sleep(0.05)

    task = asyncio.create_task(poll())
    try:
        await polling.eventually(task.done, within)
    except pytest.fail.Exception as failed:
        failed.add_note(f"last error while polling: {errors[-1] if errors else None}")
        raise
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def healthy(gpu: Gpu) -> Condition:
    (condition,) = [c for c in gpu.status.conditions if c.type == CONDITION_HEALTHY]
    return condition


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "device.sock"


@pytest.fixture
async def server(socket_path: Path) -> AsyncIterator[Server]:
    running = await start_server(socket_path)
    yield running
    if not running.task.done():
        await running.stop()


@pytest.fixture
async def provided(server: Server, socket_path: Path) -> AsyncIterator[RunningProvider]:
    running = await start_provider(socket_path)
    yield running
    await running.close()


async def test_provider_registers_every_gpu_healthy(provided: RunningProvider) -> None:
    listing = await provided.client.list("gpufleet.io/node=node-a")
    by_name = {gpu.metadata.name: gpu for gpu in listing.items}
    assert sorted(by_name) == sorted(provided.name(i) for i in range(8))
    first = by_name[provided.name(0)]
    assert (first.spec.uuid, first.spec.index, first.spec.node) == (provided.uuid(0), 0, "node-a")
    assert first.metadata.labels["gpufleet.io/product"] == "NVIDIA-H100-80GB-HBM3"
    assert all(healthy(gpu).status == "True" for gpu in listing.items)


async def test_simulated_gpus_are_labelled_as_simulated(provided: RunningProvider) -> None:
    listing = await provided.client.list("gpufleet.io/node=node-a")
    assert {gpu.metadata.labels["gpufleet.io/provider"] for gpu in listing.items} == {"sim"}


async def test_a_provider_logs_one_line_when_it_re_registers_after_a_server_restart(
    tmp_path: Path, socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state.db"
    server = await start_server(socket_path, state_file=state)
    running = await start_provider(socket_path)
    try:
        caplog.set_level(logging.INFO, logger="gpufleet.deviceapi.provider")
        await server.stop()

        def lost() -> bool:
            return any("device API unavailable" in r.getMessage() for r in caplog.records)

        await polling.eventually(lost, DEADLINE)
        server = await start_server(socket_path, state_file=state)

        def back() -> list[logging.LogRecord]:
            wanted = "re-registered with the device API"
            return [r for r in caplog.records if r.getMessage() == wanted]

        await polling.eventually(lambda: bool(back()), DEADLINE)
        # Later rounds say nothing more: one line per outage, not one per round.
        await asyncio.sleep(INTERVAL * 3)
        (record,) = back()
        assert (record.__dict__["gpus"], record.__dict__["gpus_created"]) == (8, 0)
    finally:
        await running.close()
        await server.stop()


async def test_xid_79_makes_only_that_gpu_unhealthy_with_its_action(
    provided: RunningProvider,
) -> None:
    await provided.inject_xid(2, 79)

    async def gpu2_unhealthy() -> bool:
        return healthy(await provided.gpu(2)).status == "False"

    await eventually(gpu2_unhealthy)
    gpu = await provided.gpu(2)
    condition = healthy(gpu)
    assert (condition.reason, gpu.status.recommended_action) == ("XidCritical", "RebootNode")
    assert "XID 79" in condition.message
    assert [record.xid for record in gpu.status.last_xids] == [79]
    others = [await provided.gpu(i) for i in range(8) if i != 2]
    assert [healthy(other).status for other in others] == ["True"] * 7
    assert {other.status.recommended_action for other in others} == {"None"}


async def test_xid_13_changes_nothing(provided: RunningProvider) -> None:
    before = await provided.gpu(1)
    await provided.inject_xid(1, 13)
    # XIDs are handled in order: once the later 48 on GPU 3 is written, the 13 was seen.
    await provided.inject_xid(3, 48)

    async def gpu3_unhealthy() -> bool:
        return healthy(await provided.gpu(3)).status == "False"

    await eventually(gpu3_unhealthy)
    await asyncio.sleep(INTERVAL * 2)  # and a health round or two later, still no write
    after = await provided.gpu(1)
    assert after.metadata.resource_version == before.metadata.resource_version


async def test_warning_xid_is_recorded_without_changing_health(provided: RunningProvider) -> None:
    await provided.inject_xid(5, 92)

    async def recorded() -> bool:
        return [r.xid for r in (await provided.gpu(5)).status.last_xids] == [92]

    await eventually(recorded)
    assert healthy(await provided.gpu(5)).status == "True"


async def test_lost_gpu_becomes_gpu_lost_at_the_next_health_check(
    provided: RunningProvider,
) -> None:
    provided.nvml.set_lost(4)

    async def lost() -> bool:
        return healthy(await provided.gpu(4)).reason == "GpuLost"

    await eventually(lost)
    gpu = await provided.gpu(4)
    assert (healthy(gpu).status, gpu.status.recommended_action) == ("False", "RebootNode")
    assert healthy(await provided.gpu(3)).status == "True"


async def test_server_restart_leads_to_re_registration_with_current_status(
    provided: RunningProvider, server: Server, socket_path: Path
) -> None:
    await provided.inject_xid(2, 79)

    async def gpu2_unhealthy() -> bool:
        return healthy(await provided.gpu(2)).status == "False"

    await eventually(gpu2_unhealthy)
    await server.stop()
    restarted = await start_server(socket_path)  # a new, empty store on the same socket
    try:

        async def all_back() -> bool:
            return len((await provided.client.list()).items) == 8

        await eventually(all_back)
        await eventually(gpu2_unhealthy)
        gpu = await provided.gpu(2)
        assert (healthy(gpu).reason, gpu.status.recommended_action) == ("XidCritical", "RebootNode")
        assert [record.xid for record in gpu.status.last_xids] == [79]
        assert healthy(await provided.gpu(0)).status == "True"
    finally:
        await restarted.stop()


async def test_state_file_keeps_conditions_and_a_monotonic_resource_version(
    tmp_path: Path, socket_path: Path
) -> None:
    state = tmp_path / "state.db"
    server = await start_server(socket_path, state_file=state)
    running = await start_provider(socket_path)
    try:
        await running.inject_xid(2, 79)

        async def gpu2_unhealthy() -> bool:
            return healthy(await running.gpu(2)).status == "False"

        await eventually(gpu2_unhealthy)
        before = await running.gpu(2)
        list_rv = int((await running.client.list()).resource_version)
    finally:
        await running.stop()  # nobody re-applies anything: what follows came from the file
        await server.stop()

    server = await start_server(socket_path, state_file=state)
    client = DeviceApiClient(socket_path, options=CLIENT_OPTIONS)
    try:
        after = await client.get(before.metadata.name)
        assert after.status == before.status
        assert after.metadata.resource_version == before.metadata.resource_version
        assert int((await client.list()).resource_version) >= list_rv
        other = await client.get(running.name(0))
        other.metadata.labels["touched"] = "yes"
        written = await client.update(other)
        assert int(written.metadata.resource_version) > list_rv
    finally:
        await client.close()
        await running.close()
        await server.stop()


async def test_restarted_provider_keeps_xid_history_but_clears_the_latch(
    server: Server, socket_path: Path
) -> None:
    nvml = sim.open("dgx-h100")
    first = await start_provider(socket_path, nvml)
    try:
        await first.inject_xid(2, 79)

        async def gpu2_unhealthy() -> bool:
            return healthy(await first.gpu(2)).status == "False"

        await eventually(gpu2_unhealthy)
    finally:
        await first.stop()
    second = await start_provider(socket_path, sim.open("dgx-h100"))
    try:

        async def gpu2_healthy_again() -> bool:
            return healthy(await second.gpu(2)).status == "True"

        await eventually(gpu2_healthy_again)
        assert [r.xid for r in (await second.gpu(2)).status.last_xids] == [79]
    finally:
        await second.close()
        await first.close()


async def test_provider_keeps_conditions_of_other_providers(provided: RunningProvider) -> None:
    gpu = await provided.gpu(6)
    gpu.status.conditions.append(Condition(type="ThermalOk", status="True", reason="Cool"))
    await provided.client.update_status(gpu)
    await provided.inject_xid(6, 48)

    async def gpu6_unhealthy() -> bool:
        return healthy(await provided.gpu(6)).status == "False"

    await eventually(gpu6_unhealthy)
    types = {c.type: c.reason for c in (await provided.gpu(6)).status.conditions}
    assert types == {CONDITION_HEALTHY: "XidCritical", "ThermalOk": "Cool"}


class _RecordingStream:
    """An XID event set that logs each wait (with its bound) and its close."""

    def __init__(self, inner: XidEventStream, log: list[str]) -> None:
        self.inner = inner
        self.log = log

    def wait(self, timeout_s: float) -> XidEvent | None:
        self.log.append(f"wait {timeout_s}")
        return self.inner.wait(timeout_s)

    def close(self) -> None:
        self.log.append("close")
        self.inner.close()


class _RecordingSource:
    """A GpuSource that logs, in order, every sample and its XID event sets' waits and closes."""

    def __init__(self, inner: NvmlSource, log: list[str]) -> None:
        self.inner = inner
        self.log = log

    def devices(self) -> DeviceList:
        return self.inner.devices()

    def sample(self, uuid: str) -> GpuSample:
        self.log.append(f"sample {uuid}")
        return self.inner.sample(uuid)

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        return self.inner.processes(uuid)

    def xid_events(self) -> XidEventStream:
        return _RecordingStream(self.inner.xid_events(), self.log)

    def close(self) -> None:
        self.inner.close()


async def test_provider_stops_promptly(server: Server, socket_path: Path) -> None:
    """Stop wakes the provider out of its interval and ends the XID thread before it returns.

    The health interval is an hour, so a stop that waited for it would hang
    (``RunningProvider.stop``'s hang guard fails). The XID thread waits in bounded
    polls and looks for stop between them, so by the time stop returns it has
    closed its event set and done nothing since; a thread still blocked would
    have been abandoned by the provider's join, and its close would come later.
    """
    log: list[str] = []
    running = await start_provider(
        socket_path,
        wrap=lambda source: _RecordingSource(source, log),
        health_interval=3600.0,
    )
    try:
        await polling.eventually(lambda: running.provider.xid_stream_ready, DEADLINE)
        log.append("stop")
        await running.stop()
        after = log[log.index("stop") + 1 :]
        assert not [entry for entry in after if entry.startswith("sample")]  # no round began
        assert after[-1:] == ["close"]  # the XID thread closed its event set, then nothing
        assert after.count("close") == 1
        assert {entry for entry in log if entry.startswith("wait")} == {f"wait {XID_POLL_S}"}
    finally:
        await running.close()


class _BrokenStream:
    """An event set whose wait fails with a non-timeout NVML error."""

    def __init__(self, inner: XidEventStream) -> None:
        self.inner = inner

    def wait(self, timeout_s: float) -> XidEvent | None:
        raise GpuError("nvmlEventSetWait: Unknown Error")

    def close(self) -> None:
        self.inner.close()


class _FirstEventSetBreaks:
    """A GpuSource whose first XID event set breaks; later ones work."""

    def __init__(self, inner: NvmlSource) -> None:
        self.inner = inner
        self.created = 0

    def devices(self) -> DeviceList:
        return self.inner.devices()

    def sample(self, uuid: str) -> GpuSample:
        return self.inner.sample(uuid)

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        return self.inner.processes(uuid)

    def xid_events(self) -> XidEventStream:
        self.created += 1
        stream = self.inner.xid_events()
        return _BrokenStream(stream) if self.created == 1 else stream

    def close(self) -> None:
        self.inner.close()


async def test_broken_event_set_is_recreated_without_marking_gpus_unhealthy(
    server: Server, socket_path: Path
) -> None:
    flaky: list[_FirstEventSetBreaks] = []

    def wrap(source: NvmlSource) -> GpuSource:
        flaky.append(_FirstEventSetBreaks(source))
        return flaky[0]

    running = await start_provider(socket_path, wrap=wrap)
    try:
        await polling.eventually(
            lambda: flaky[0].created >= 2 and running.provider.xid_stream_ready, DEADLINE
        )
        listing = await running.client.list()
        assert {healthy(gpu).status for gpu in listing.items} == {"True"}
        await running.inject_xid(1, 79)

        async def gpu1_unhealthy() -> bool:
            return healthy(await running.gpu(1)).status == "False"

        await eventually(gpu1_unhealthy)
    finally:
        await running.close()


async def test_gpu_lost_before_a_provider_restart_is_found_by_its_index(
    server: Server, socket_path: Path
) -> None:
    nvml = sim.open("dgx-h100")
    first = await start_provider(socket_path, nvml)
    await first.close()
    nvml.set_lost(3)  # now it cannot even tell its UUID
    second = await start_provider(socket_path, nvml)
    try:

        async def gpu3_lost() -> bool:
            return healthy(await second.gpu(3)).reason == "GpuLost"

        await eventually(gpu3_lost)
        assert healthy(await second.gpu(2)).status == "True"
        nvml.set_lost(3, False)  # back on the bus: healthy at the next check

        async def gpu3_healthy() -> bool:
            return healthy(await second.gpu(3)).status == "True"

        await eventually(gpu3_healthy)
    finally:
        await second.close()
