"""How fast is the device API? 1,024 GPUs, 100 watchers, one writer, over real gRPC.

The server runs as its own process (``gpufleet device-api serve`` on a unix
socket), so its RSS is its own. Watchers are GpuInformers spread over a few
watcher processes (they are the consumers' processes in production, and one
Python process cannot decode 100 streams at full rate). The writer, in this
process, updates GPU status; every write's send time is kept in a side table
by the resourceVersion it got, and every watcher stamps when each version
arrived (CLOCK_MONOTONIC is system-wide, so the clocks agree).

It prints, against the issue's targets:
  - List latency for 1,024 GPUs (target p99 <= 20 ms),
  - update-to-delivery-at-all-watchers latency at 1,000 updates/s (target p99 <= 10 ms),
  - the highest write rate with every watcher keeping up, and watch events
    delivered per second (target >= 50k/s), with the server's stream messages
    per second beside them: the informers read WatchGpuBatches (through
    DeviceApiClient), so one message carries several events under load,
  - the server's RSS.

Usage: python bench/bench_device_api.py [--gpus 1024] [--watchers 100] [--procs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket as socketlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.informer import GpuInformer
from gpufleet.deviceapi.v1alpha1 import gpu_pb2

HERE = Path(__file__).resolve()
WATCHER_CMD = (sys.executable, str(HERE), "--role", "watchers")


def make_gpu(i: int) -> gpu_pb2.Gpu:
    gpu = gpu_pb2.Gpu()
    gpu.metadata.name = f"gpu-{i:04d}"
    gpu.metadata.labels["gpufleet.io/node"] = f"node-{i // 8:03d}"
    gpu.spec.uuid = f"GPU-{i:08x}-5b9a-4e6c-9f0a-3e1c2b7d8a91"
    gpu.spec.serial = f"1650{i:09d}"
    gpu.spec.product = "NVIDIA H100 80GB HBM3"
    gpu.spec.pci_bus_id = f"00000000:{i % 256:02X}:00.0"
    gpu.spec.index = i % 8
    gpu.spec.node = f"node-{i // 8:03d}"
    return gpu


def set_health(gpu: gpu_pb2.Gpu, healthy: bool, seq: int) -> gpu_pb2.Gpu:
    out = gpu_pb2.Gpu()
    out.CopyFrom(gpu)
    del out.status.conditions[:]
    out.status.conditions.add(
        type="Healthy",
        status="True" if healthy else "False",
        reason="Ok" if healthy else "XidCritical",
        message=f"bench write {seq}",
    )
    out.status.recommended_action = "None" if healthy else "ResetGpu"
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- watcher process --------------------------------------------------------------


async def watcher_main(socket: str, count: int) -> None:
    """Run `count` informers; on 'stop RV' from stdin, wait for RV and dump arrivals."""
    arrivals: dict[int, list[float]] = {}  # rv -> [watchers seen, last arrival]
    clients = [DeviceApiClient(socket) for _ in range(count)]
    informers = [GpuInformer(c) for c in clients]

    def on_update(old: gpu_pb2.Gpu, new: gpu_pb2.Gpu) -> None:
        now = time.monotonic()
        rv = int(new.metadata.resource_version)
        seen = arrivals.get(rv)
        if seen is None:
            arrivals[rv] = [1, now]
        else:
            seen[0] += 1
            seen[1] = now

    for informer in informers:
        informer.on_update(on_update)
    tasks = [asyncio.create_task(i.run()) for i in informers]
    for informer in informers:
        await informer.wait_synced()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line:
            break
        if line[0] == "stop":
            target = line[1]
            # Polls the informers' own state; they have no "reached RV" signal.
            while any(i.resource_version != target for i in informers):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            relists = sum(i.relists - 1 for i in informers)
            print(json.dumps({"arrivals": arrivals, "relists": relists}), flush=True)
            arrivals = {}
    for informer in informers:
        informer.stop()
    await asyncio.gather(*tasks)
    for client in clients:
        await client.close()


# -- the benchmark ------------------------------------------------------------------


class Watchers:
    """The watcher processes."""

    def __init__(self, socket: str, watchers: int, procs: int) -> None:
        shares = [watchers // procs + (1 if p < watchers % procs else 0) for p in range(procs)]
        self.total = watchers
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE),
                    "--role",
                    "watchers",
                    "--socket",
                    socket,
                    "--watchers",
                    str(share),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for share in shares
            if share
        ]

    def wait_ready(self) -> None:
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"watcher process failed to start: {line!r}")

    def collect(self, final_rv: str) -> tuple[dict[int, list[float]], int]:
        """Per rv: [watchers that saw it, when the last one did]; and relists."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"stop {final_rv}\n")
            proc.stdin.flush()
        merged: dict[int, list[float]] = {}
        relists = 0
        for proc in self.procs:
            assert proc.stdout is not None
            body = json.loads(proc.stdout.readline())
            relists += body["relists"]
            for rv_text, (seen, last) in body["arrivals"].items():
                entry = merged.setdefault(int(rv_text), [0, 0.0])
                entry[0] += seen
                entry[1] = max(entry[1], last)
        return merged, relists

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=30)


async def write_phase(
    client: DeviceApiClient, gpus: list[gpu_pb2.Gpu], count: int, rate: float | None, seq0: int
) -> tuple[dict[int, float], float]:
    """`count` status updates round-robin over `gpus` (paced at `rate`/s, or flat out)."""
    sent: dict[int, float] = {}
    start = time.monotonic()
    for k in range(count):
        if rate is not None:
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        i = k % len(gpus)
        update = set_health(gpus[i], healthy=(seq0 + k) % 2 == 0, seq=seq0 + k)
        t = time.monotonic()
        gpus[i] = await client.update_status(update)
        sent[int(gpus[i].metadata.resource_version)] = t
    return sent, time.monotonic() - start


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


def watch_counts(metrics_port: int) -> tuple[float, float]:
    """The server's (watch events, watch messages) sent so far, from /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    events = messages = 0.0
    for line in text.splitlines():
        if line.startswith("gpufleet_deviceapi_watch_events_total{"):
            events += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gpufleet_deviceapi_watch_messages_total "):
            messages += float(line.rsplit(" ", 1)[1])
    return events, messages


def start_server(socket: Path, watch_queue: int, metrics_port: int) -> subprocess.Popen[bytes]:
    """``gpufleet device-api serve`` on `socket`; returns once the socket exists."""
    env = dict(os.environ, LOG_LEVEL="warning", WATCH_QUEUE=str(watch_queue))
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


async def bench(
    args: argparse.Namespace, socket: Path, server: subprocess.Popen[bytes], metrics_port: int
) -> None:
    watchers: Watchers | None = None
    try:
        async with DeviceApiClient(socket) as client:
            gpus = [await client.create(make_gpu(i)) for i in range(args.gpus)]
            list_ms = []
            for _ in range(args.lists):
                t = time.perf_counter()
                listed = await client.list()
                list_ms.append((time.perf_counter() - t) * 1e3)
            assert len(listed.items) == args.gpus
            rss_idle = rss_mib(server.pid)

            watchers = Watchers(str(socket), args.watchers, args.procs)
            watchers.wait_ready()
            print(f"device API: {args.gpus} GPUs, {args.watchers} watchers in "
                  f"{len(watchers.procs)} processes, {os.cpu_count()} CPUs")  # fmt: skip
            print(f"List of {args.gpus} GPUs: p50 {pct(list_ms, 0.5):.1f} ms, "
                  f"p99 {pct(list_ms, 0.99):.1f} ms  (target p99 <= 20 ms)")  # fmt: skip

            seq = 0
            # Paced phase: the latency target is stated at 1,000 updates/s.
            for rate in args.rates:
                count = int(rate * args.seconds)
                before = watch_counts(metrics_port)
                sent, took = await write_phase(client, gpus, count, rate, seq)
                seq += count
                arrivals, relists = watchers.collect(str(max(sent)))
                report(f"{rate:,.0f}/s paced", sent, took, arrivals, relists, watchers.total)
                report_batching(before, watch_counts(metrics_port), None)
            # Flat out: one writer as fast as its round trips allow.
            count = int(args.max_writes)
            before = watch_counts(metrics_port)
            sent, took = await write_phase(client, gpus, count, None, seq)
            seq += count
            final_rv = max(sent)
            t_done = time.monotonic()
            arrivals, relists = watchers.collect(str(final_rv))
            after = watch_counts(metrics_port)
            drained = max(last for _, last in arrivals.values()) if arrivals else t_done
            span = max(drained, t_done) - min(sent.values())
            delivered = sum(seen for seen, _ in arrivals.values())
            report("flat out", sent, took, arrivals, relists, watchers.total)
            print(f"  delivered {delivered / span:,.0f} events/s over {span:.2f} s "
                  f"(target >= 50,000/s)")  # fmt: skip
            report_batching(before, after, span)
            print(f"server RSS: {rss_idle:.0f} MiB with {args.gpus} GPUs idle, "
                  f"{rss_mib(server.pid):.0f} MiB after the run")  # fmt: skip
    finally:
        if watchers is not None:
            watchers.close()


def report(
    label: str,
    sent: dict[int, float],
    took: float,
    arrivals: dict[int, list[float]],
    relists: int,
    watchers: int,
) -> None:
    latencies = [
        (arrivals[rv][1] - t) * 1e3
        for rv, t in sent.items()
        if rv in arrivals and arrivals[rv][0] >= watchers
    ]
    complete = len(latencies)
    rate = len(sent) / took
    line = f"{label}: wrote {len(sent)} at {rate:,.0f}/s; "
    if latencies:
        line += (
            f"delivery to all {watchers} watchers p50 {statistics.median(latencies):.1f} ms, "
            f"p99 {pct(latencies, 0.99):.1f} ms"
        )
    line += f"; {complete}/{len(sent)} writes reached every watcher, {relists} relists"
    print(line, flush=True)


def report_batching(
    before: tuple[float, float], after: tuple[float, float], span: float | None
) -> None:
    """Events and stream messages the server sent in a phase (and per second over `span`)."""
    events, messages = after[0] - before[0], after[1] - before[1]
    line = f"  server sent {events:,.0f} events in {messages:,.0f} messages"
    if messages:
        line += f" ({events / messages:.1f} events/message)"
    if span:
        line += f"; {events / span:,.0f} events/s, {messages / span:,.0f} messages/s"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="bench", choices=["bench", "watchers"])
    parser.add_argument("--socket", default="")
    parser.add_argument("--gpus", type=int, default=1024)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--lists", type=int, default=50)
    parser.add_argument("--rates", type=float, nargs="*", default=[100.0, 1000.0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-writes", type=int, default=3000)
    parser.add_argument("--watch-queue", type=int, default=4096)
    args = parser.parse_args()
    if args.role == "watchers":
        asyncio.run(watcher_main(args.socket, args.watchers))
        return
    directory = Path(tempfile.mkdtemp(prefix="gfbench-", dir="/tmp"))
    socket = directory / "device.sock"
    metrics_port = free_port()
    server = start_server(socket, args.watch_queue, metrics_port)
    try:
        asyncio.run(bench(args, socket, server, metrics_port))
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
