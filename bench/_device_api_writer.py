"""The device API bench's writer: one client, closed loop or open loop at a fixed rate.

See ``bench_device_api.py``'s docstring for the two modes and what their
latencies start from. Every update flips a GPU's ``Healthy`` condition, so no
write is a no-op, and carries the resourceVersion of that GPU's last reply.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.errors import DeviceApiError
from gpufleet.deviceapi.v1alpha1 import gpu_pb2


def set_health(gpu: gpu_pb2.Gpu, healthy: bool, seq: int) -> gpu_pb2.Gpu:
    """`gpu` (with its resourceVersion) carrying a new Healthy condition; never a no-op."""
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


@dataclass
class Writes:
    """One write phase as the writer saw it."""

    sent: dict[int, float] = field(default_factory=dict)  # rv -> when its latency starts
    start: float = 0.0  # the first send (closed loop) or scheduled time (open loop)
    end: float = 0.0  # the last reply
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # reason -> count
    cap_hits: int = 0  # open loop: updates that found the in-flight cap full
    peak: int = 0  # open loop: most updates in flight at once

    def fail(self, error: DeviceApiError) -> None:
        self.errors += 1
        key = f"{error.reason}: {str(error)[:80]}"
        self.error_kinds[key] = self.error_kinds.get(key, 0) + 1


class Writer:
    """The one writer: a client and the last version it got of every GPU."""

    def __init__(self, client: DeviceApiClient, gpus: list[gpu_pb2.Gpu]) -> None:
        self.client = client
        self.gpus = gpus
        self.seq = 0

    def _next(self, i: int) -> gpu_pb2.Gpu:
        self.seq += 1
        return set_health(self.gpus[i], healthy=self.seq % 2 == 0, seq=self.seq)

    async def closed_loop(self, seconds: float) -> Writes:
        """Round-robin updates for `seconds`, each sent when the previous reply is back."""
        out = Writes(start=time.monotonic())
        stop = out.start + seconds
        k = 0
        while time.monotonic() < stop:
            i = k % len(self.gpus)
            k += 1
            update = self._next(i)
            t = time.monotonic()
            try:
                self.gpus[i] = await self.client.update_status(update)
            except DeviceApiError as error:
                out.fail(error)
                continue
            out.sent[int(self.gpus[i].metadata.resource_version)] = t
        out.end = time.monotonic()
        return out

    async def open_loop(self, rate: float, count: int, max_inflight: int) -> Writes:
        """`count` updates, update k scheduled at start + k/rate, not waiting for replies."""
        if max_inflight >= len(self.gpus):
            raise ValueError("--max-inflight must be below the number of GPUs")
        idle = deque(range(len(self.gpus)))  # GPUs with no update in flight
        out = Writes()
        inflight = 0
        room = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def one(i: int, update: gpu_pb2.Gpu, due: float) -> None:
            nonlocal inflight
            try:
                reply = await self.client.update_status(update)
            except DeviceApiError as error:
                out.fail(error)
            else:
                self.gpus[i] = reply
                out.sent[int(reply.metadata.resource_version)] = due
            finally:
                out.end = max(out.end, time.monotonic())
                idle.append(i)
                inflight -= 1
                room.set()

        out.start = time.monotonic() + 0.01
        k = 0
        while k < count:
            due = out.start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if inflight >= max_inflight:
                out.cap_hits += 1
                while inflight >= max_inflight:
                    room.clear()
                    await room.wait()
                continue  # re-check the clock; `due` stays where it was
            i = idle.popleft()
            inflight += 1
            out.peak = max(out.peak, inflight)
            task = asyncio.create_task(one(i, self._next(i), due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        while tasks:
            await asyncio.gather(*tasks)
        return out
