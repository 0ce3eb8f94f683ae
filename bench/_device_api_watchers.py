"""The device API bench's watcher processes: GpuInformers that stamp each arrival.

A watcher process (this file run as a script, ``--socket S --watchers N``)
runs N informers and, on ``stop RV`` from stdin, waits until every one is at
RV and prints, as one JSON line, when each resourceVersion reached how many of
them, and the relists, evictions and expirations since the last report.
``Watchers`` is the bench's side: it starts the processes and merges their
reports. CLOCK_MONOTONIC is system-wide, so the processes' stamps agree with
the writer's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.informer import GpuInformer
from gpufleet.deviceapi.v1alpha1 import gpu_pb2

HERE = Path(__file__).resolve()


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
    # Relists and evictions so far (the first list is not a relist).
    reported = {"relists": count, "evictions": 0, "expirations": 0}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line:
            break
        if line[0] == "stop":
            target = line[1]
            deadline = time.monotonic() + 60
            # Polls the informers' own state; they have no "reached RV" signal.
            while any(i.resource_version != target for i in informers):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.005)
            behind = sum(i.resource_version != target for i in informers)
            now = {
                "relists": sum(i.relists for i in informers),
                "evictions": sum(i.evictions for i in informers),
                "expirations": sum(i.expirations for i in informers),
            }
            body: dict[str, object] = {key: now[key] - reported[key] for key in now}
            reported = now
            body.update(arrivals=arrivals, behind=behind)
            print(json.dumps(body), flush=True)
            arrivals = {}
    for informer in informers:
        informer.stop()
    await asyncio.gather(*tasks)
    for client in clients:
        await client.close()


@dataclass
class Collected:
    """What the watchers saw of one phase."""

    arrivals: dict[int, list[float]]  # rv -> [watchers that saw it, when the last one did]
    relists: int = 0
    evictions: int = 0
    expirations: int = 0
    behind: int = 0  # informers that never reached the phase's last version


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

    def collect(self, final_rv: int) -> Collected:
        """Wait until every informer is at `final_rv`; what they saw since the last collect."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"stop {final_rv}\n")
            proc.stdin.flush()
        out = Collected(arrivals={})
        for proc in self.procs:
            assert proc.stdout is not None
            body = json.loads(proc.stdout.readline())
            out.relists += body["relists"]
            out.evictions += body["evictions"]
            out.expirations += body["expirations"]
            out.behind += body["behind"]
            for rv_text, (seen, last) in body["arrivals"].items():
                entry = out.arrivals.setdefault(int(rv_text), [0, 0.0])
                entry[0] += seen
                entry[1] = max(entry[1], last)
        return out

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--watchers", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(watcher_main(args.socket, args.watchers))


if __name__ == "__main__":
    main()
