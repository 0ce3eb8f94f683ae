"""End to end: one-shot scans against a remote exporter that is down, then back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

GPUFLEET = [sys.executable, "-m", "gpufleet.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Receiver(ThreadingHTTPServer):
    """A real HTTP server on loopback that keeps every POSTed batch."""

    def __init__(self, port: int) -> None:
        self.batches: list[list[dict[str, object]]] = []
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.batches.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def receiver(port: int) -> Iterator[Receiver]:
    server = Receiver(port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def env_for(port: int, spool: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTP_", "EXPORTER"))}
    env.update(
        CLUSTER_NAME="c1", NODE_NAME="node-1", MACHINE_ID="i-1", EXPORTER_TYPE="http",
        HTTP_ENDPOINT=f"http://127.0.0.1:{port}/ingest", HTTP_TIMEOUT="1s",
        SPOOL_DIR=str(spool), RETRY_MAX_BACKOFF="0.2s", **extra,
    )  # fmt: skip
    return env


def scan(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GPUFLEET, "inventory", "scan", *args], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def test_unreachable_exporter_leaves_readings_in_the_spool_and_exits_non_zero(
    port: int, tmp_path: Path
) -> None:
    result = scan(env_for(port, tmp_path, DELIVERY_TIMEOUT="1s"), "--simulate", "dgx-h100")
    assert result.returncode == 1
    assert "8 reading(s) for http left in the spool" in result.stderr.splitlines()[-1]


def test_next_run_with_the_same_spool_delivers_the_spooled_readings_first(
    port: int, tmp_path: Path
) -> None:
    down = scan(env_for(port, tmp_path, DELIVERY_TIMEOUT="1s"), "--simulate", "l4", "--seed", "1")
    assert down.returncode == 1
    server = Receiver(port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        up = scan(env_for(port, tmp_path), "--simulate", "l4", "--seed", "2")
    finally:
        server.shutdown()
        server.server_close()
    assert up.returncode == 0, up.stderr
    first, second = ([r["gpu"] for r in batch] for batch in server.batches)
    old = json.loads(scan_stdout("l4", "1"))["gpu"]
    assert (first, second) == ([old], [json.loads(scan_stdout("l4", "2"))["gpu"]])


def scan_stdout(preset: str, seed: str) -> str:
    env = {**os.environ, "CLUSTER_NAME": "c1", "EXPORTER_TYPE": "stdout", "MACHINE_ID": "i-1"}
    return scan(env, "--simulate", preset, "--seed", seed).stdout


def test_sigterm_stops_waiting_and_keeps_every_reading_in_the_spool(
    port: int, tmp_path: Path
) -> None:
    env = env_for(port, tmp_path, DELIVERY_TIMEOUT="120s", LOG_FORMAT="json")
    proc = subprocess.Popen(
        [*GPUFLEET, "inventory", "scan", "--simulate", "dgx-a100"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # the first failed attempt means the readings are spooled
        if "export failed" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # a hang guard: DELIVERY_TIMEOUT is 120s
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM: 8 reading(s) for http are still in the spool" in err


def test_export_test_reports_success_per_exporter(port: int, receiver: Receiver) -> None:
    env = env_for(port, Path("/nonexistent"))
    result = subprocess.run(
        [*GPUFLEET, "inventory", "export-test", "-e", "http"], env=env, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("ok    http")
    assert receiver.batches[0][0]["source"] == "gpufleet-export-test"


def test_export_test_reports_the_exact_failure(port: int) -> None:
    result = subprocess.run(
        [*GPUFLEET, "inventory", "export-test", "-e", "http"],
        env=env_for(port, Path("/nonexistent")), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL  http: ExporterError: exporter http:")
    assert f"127.0.0.1:{port}" in result.stdout
