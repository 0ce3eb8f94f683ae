"""The device API bench's server: ``gpufleet device-api serve`` and what it costs.

Starts the server as its own process, and reads its counters from
``/metrics`` and its CPU time and RSS (and the whole machine's CPU time)
from ``/proc``.
"""

from __future__ import annotations

import os
import socket as socketlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used so far (all CPUs, from /proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS  # less idle and iowait


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def server_counts(metrics_port: int) -> tuple[float, float, float]:
    """The server's watch events, watch messages and evicted watchers so far, from /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    events = messages = evicted = 0.0
    for line in text.splitlines():
        if line.startswith("gpufleet_deviceapi_watch_events_total{"):
            events += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gpufleet_deviceapi_watch_messages_total "):
            messages += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gpufleet_deviceapi_watchers_evicted_total "):
            evicted += float(line.rsplit(" ", 1)[1])
    return events, messages, evicted


def start_server(
    socket: Path, watch_queue: int, metrics_port: int, watch_linger: float = 0.0
) -> subprocess.Popen[bytes]:
    """``gpufleet device-api serve`` on `socket`; returns once the socket exists."""
    env = dict(os.environ, LOG_LEVEL="warning", WATCH_QUEUE=str(watch_queue),
               WATCH_LINGER=f"{watch_linger * 1000:g}ms")  # fmt: skip
    gpufleet = Path(sys.executable).with_name("gpufleet")
    server = subprocess.Popen(
        [str(gpufleet), "device-api", "serve", "--socket", str(socket),
         "--metrics-port", str(metrics_port)],
        env=env,
    )  # fmt: skip
    for _ in range(500):
        if socket.exists():
            return server
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        time.sleep(0.02)
    server.terminate()
    raise RuntimeError("server did not start")
