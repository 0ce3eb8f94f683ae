"""``gpufleet gpus watch`` as a process, against a real server it outlives.

The server runs on the test's event loop (``running_server``); the watch is a
subprocess whose stdout (the events) and stderr (JSON log lines) the test reads.
Timeouts only guard against hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpufleet.deviceapi.store import GpuStore
from tests.integration.deviceapi_harness import (
    make_gpu,
    running_server,
    short_tmp,
    with_condition,
)

pytestmark = pytest.mark.integration

DEADLINE = 30.0


@dataclass
class Watch:
    """A running ``gpus watch``: its process and the log records it wrote so far."""

    process: asyncio.subprocess.Process
    logs: list[dict[str, object]] = field(default_factory=list)

    async def line(self) -> str:
        """The next line on stdout."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), DEADLINE)
        assert line, f"gpus watch ended (rc={self.process.returncode}); logs: {self.logs}"
        return line.decode().rstrip("\n")

    def messages(self, level: str | None = None) -> list[str]:
        return [str(r["msg"]) for r in self.logs if level is None or r.get("level") == level]

    async def until(self, check: Callable[[], bool]) -> None:
        """Wait until `check()` is true of the logs read so far."""
        async with asyncio.timeout(DEADLINE):
            while not check():
                assert self.process.returncode is None, f"gpus watch ended; logs: {self.logs}"
                await asyncio.sleep(0.05)


async def _read_logs(watch: Watch) -> None:
    assert watch.process.stderr is not None
    async for raw in watch.process.stderr:
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            # Not a log record (the one-line error of a failed command): kept to show.
            record = {"level": "stderr", "msg": raw.decode(errors="replace").rstrip("\n")}
        watch.logs.append(record)


@contextlib.asynccontextmanager
async def gpus_watch(socket: Path) -> AsyncIterator[Watch]:
    """``gpufleet --log-level debug gpus watch --socket SOCKET``, SIGTERMed at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpufleet.cli", "--log-level", "debug", "--log-format", "json",
        "gpus", "watch", "--socket", str(socket),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    watch = Watch(process)
    reader = asyncio.create_task(_read_logs(watch))
    try:
        yield watch
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(process.wait(), DEADLINE)
        await asyncio.wait_for(reader, DEADLINE)
    assert rc == 0, f"gpus watch exited {rc} on SIGTERM; logs: {watch.logs}"


async def test_gpus_watch_outlives_a_server_restart_and_prints_each_change_once() -> None:
    names = [f"gpu-{i}" for i in range(3)]
    with short_tmp() as directory:
        state = directory / "state.db"
        async with contextlib.AsyncExitStack() as watching:
            first = GpuStore(state_file=state)
            try:
                async with running_server(directory, store=first) as running:
                    async with running.client() as api:
                        for index, name in enumerate(names):
                            await api.create(make_gpu(name, index))
                    watch = await watching.enter_async_context(gpus_watch(running.socket))
                    lines = [await watch.line() for _ in names]
                    assert sorted(line.split()[:2] for line in lines) == [
                        ["ADDED", name] for name in names
                    ]
            finally:
                first.close()

            # The server is gone: one warning, however many retries (seen at debug).
            retries = "device API still unavailable"
            await watch.until(lambda: watch.messages("debug").count(retries) >= 2)
            assert watch.messages("warning") == ["device API unavailable; reconnecting"]

            second = GpuStore(state_file=state)  # the same state: the same GPUs
            try:
                async with running_server(directory, store=second) as running:
                    await watch.until(lambda: "device API reconnected" in watch.messages())
                    async with running.client() as api:
                        gpu = await api.get("gpu-1")
                        sick = await api.update_status(with_condition(gpu, "False", "XidCritical"))
                        # A second change marks the end: whatever came before it is printed.
                        last = await api.update_status(
                            with_condition(await api.get("gpu-2"), "False")
                        )
                    lines += [await watch.line(), await watch.line()]
                    assert watch.process.returncode is None
                    # Before this server stops too (a second outage, logged as such).
                    warnings, infos = watch.messages("warning"), watch.messages("info")
            finally:
                second.close()

    sick_rv, last_rv = sick.metadata.resource_version, last.metadata.resource_version
    assert lines[3:] == [
        f"MODIFIED gpu-1 rv={sick_rv} healthy='False (XidCritical)' action=-",
        f"MODIFIED gpu-2 rv={last_rv} healthy='False' action=-",
    ]
    assert len(set(lines)) == len(lines)  # no event twice, the relist after the restart included
    assert warnings == ["device API unavailable; reconnecting"]
    assert infos.count("device API reconnected") == 1


async def test_gpus_watch_ends_quietly_when_its_reader_goes_away() -> None:
    with short_tmp() as directory:
        async with running_server(directory) as running, running.client() as api:
            gpu = await api.create(make_gpu("gpu-0"))
            # `head` exits after the first line; the watch's next write then fails.
            pipeline = await asyncio.create_subprocess_exec(
                "bash", "-c", 'set -o pipefail; "$0" -m gpufleet.cli gpus watch --socket "$1"'
                " | head -n 1 >/dev/null", sys.executable, str(running.socket),
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            try:
                async with asyncio.timeout(DEADLINE):
                    healthy = "True"
                    while pipeline.returncode is None:
                        healthy = "False" if healthy == "True" else "True"
                        gpu = await api.update_status(with_condition(gpu, healthy))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(pipeline.wait(), 0.2)
            finally:
                if pipeline.returncode is None:
                    os.killpg(pipeline.pid, signal.SIGKILL)  # bash, the watch and head
                    await pipeline.wait()
            assert pipeline.stderr is not None
            errors = (await pipeline.stderr.read()).decode()
    assert pipeline.returncode == 0, errors
    assert "Traceback" not in errors
    assert "handler failed" not in errors
