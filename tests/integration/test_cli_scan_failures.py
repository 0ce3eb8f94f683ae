"""`inventory scan` says plainly what did not go through: refusals, bad settings, Ctrl-C.

Each test runs the real command in a subprocess against a real aiohttp server
on loopback that answers from a script, and counts the requests it got.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.integration.http_ingest_support import ingest_endpoint

pytestmark = pytest.mark.integration

GPUFLEET = [sys.executable, "-m", "gpufleet.cli"]

# Terminal escapes and more than 200 characters: the excerpt must tame both.
HOSTILE_BODY = "bad field read_time\x1b[2J\x07 " + "x" * 300 + "END-OF-BODY"


@dataclass
class Receiver:
    """Answers every POST with ``status`` and ``body``; with ``stall`` it never answers."""

    url: str = ""
    status: int = 200
    body: str = "ok"
    stall: bool = False
    posts: list[list[dict[str, object]]] = field(default_factory=list)
    got_post: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.Response(status=405)
        self.posts.append(json.loads(await request.read()))
        self.got_post.set()
        if self.stall:
            await asyncio.Event().wait()
        return web.Response(status=self.status, text=self.body)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    async with ingest_endpoint(recv.handle) as recv.url:
        yield recv


def env_for(url: str, spool: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTP_", "EXPORTER"))}
    env.update(
        CLUSTER_NAME="c1", NODE_NAME="node-1", MACHINE_ID="i-1", EXPORTER_TYPE="http",
        HTTP_ENDPOINT=url, HTTP_TIMEOUT="120s", SPOOL_DIR=str(spool), RETRY_MAX_BACKOFF="0.2s",
        DELIVERY_TIMEOUT="120s", LOG_FORMAT="json", **extra,
    )  # fmt: skip
    return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def scan(env: dict[str, str], *args: str) -> Finished:
    proc = await asyncio.create_subprocess_exec(
        *GPUFLEET, "inventory", "scan", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    # A hang guard, well below DELIVERY_TIMEOUT and HTTP_TIMEOUT (120 s).
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(), err.decode())


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


async def test_a_batch_the_endpoint_refuses_fails_the_scan_with_status_and_body(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.status, receiver.body = 400, HOSTILE_BODY
    done = await scan(env_for(receiver.url, tmp_path), "--simulate", "l4")
    line = last_line(done.stderr)
    assert done.returncode == 1
    assert line.startswith(f"gpufleet: error: exporter http: POST {receiver.url} (1 readings): ")
    assert "HTTP 400 Bad Request: bad field read_time\\x1b[2J\\x07 xxx" in line
    assert "END-OF-BODY" not in line  # at most 200 characters of the body
    assert line.endswith(
        f"; 1 reading(s) refused, now in the dead-letter file {tmp_path}/http.dead-letter.jsonl"
    )


async def test_a_refusing_endpoint_does_not_stop_stdout(receiver: Receiver, tmp_path: Path) -> None:
    receiver.status = 422
    done = await scan(env_for(receiver.url, tmp_path), "--simulate", "l4", "-e", "stdout,http")
    assert (done.returncode, len(done.stdout.splitlines())) == (1, 1)


async def test_a_configuration_error_fails_at_once_without_a_retry(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.status = 404  # HTTP_ENDPOINT names nothing there
    done = await scan(env_for(receiver.url, tmp_path), "--simulate", "dgx-h100")
    assert (done.returncode, len(receiver.posts)) == (2, 1)
    line = last_line(done.stderr)
    assert line.startswith("gpufleet: configuration error: exporter http:")
    assert "HTTP 404" in line
    assert "HTTP_ENDPOINT" in line
    assert "DELIVERY_TIMEOUT" not in done.stderr
    assert "will be retried" not in done.stderr


async def test_ctrl_c_while_the_endpoint_stalls_says_where_the_readings_are(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.stall = True
    proc = await asyncio.create_subprocess_exec(
        *GPUFLEET, "inventory", "scan", "--simulate", "dgx-h100",
        env=env_for(receiver.url, tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.wait_for(receiver.got_post.wait(), 60)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)  # the hang guard
    line = last_line(err.decode())
    assert proc.returncode == 130
    assert line == (
        f"gpufleet: interrupted by SIGINT: 8 reading(s) for http are still in the spool at "
        f"{tmp_path}/http.spool; the next run with the same SPOOL_DIR sends them first"
    )
    # And so it does.
    receiver.stall = False
    done = await scan(env_for(receiver.url, tmp_path), "--simulate", "l4")
    assert done.returncode == 0, done.stderr
    assert [len(batch) for batch in receiver.posts] == [8, 8, 1]


def test_stdout_gets_its_readings_when_the_sqlite_file_cannot_be_opened(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SQLITE", "EXPORTER"))}
    env.update(CLUSTER_NAME="c1", MACHINE_ID="i-1", SPOOL_DIR=str(tmp_path))
    done = subprocess.run(
        [*GPUFLEET, "inventory", "scan", "--simulate", "l4", "-e", "stdout,sqlite",
         "--db", "/proc/inv.db"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, len(done.stdout.splitlines())) == (1, 1)
    assert json.loads(done.stdout)["machine"] == "i-1"
    line = last_line(done.stderr)
    assert line.startswith("gpufleet: error: exporter sqlite: cannot open /proc/inv.db")


async def test_a_batch_failing_every_time_is_given_up_after_retry_max_attempts(
    tmp_path: Path,
) -> None:
    stored: list[int] = []
    refused_posts = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal refused_posts
        indexes = [int(str(r["index"])) for r in json.loads(await request.read())]
        if 0 in indexes:  # this receiver chokes on GPU 0's reading, and only on it
            refused_posts += 1
            return web.Response(status=500, text="internal error")
        stored.extend(indexes)
        return web.Response(status=200)

    async with ingest_endpoint(handle) as url:
        env = env_for(url, tmp_path, BATCH_SIZE="2", RETRY_MAX_ATTEMPTS="2")
        done = await scan(env, "--simulate", "dgx-h100")
    line = last_line(done.stderr)
    assert (done.returncode, sorted(stored), refused_posts) == (1, [2, 3, 4, 5, 6, 7], 3)
    assert "gave up after 3 failed attempts" in line
    assert "HTTP 500" in line
    assert "2 reading(s) refused" in line


@pytest.mark.parametrize(
    ("variable", "value"), [("RETRY_MAX_ATTEMPTS", "-1"), ("RETRY_MAX_AGE", "soon")]
)
async def test_a_bad_retry_limit_is_refused_with_one_line_naming_it(
    receiver: Receiver, tmp_path: Path, variable: str, value: str
) -> None:
    done = await scan(env_for(receiver.url, tmp_path, **{variable: value}), "--simulate", "l4")
    assert (done.returncode, len(receiver.posts)) == (2, 0)
    assert variable in last_line(done.stderr)
    assert "Traceback" not in done.stderr
