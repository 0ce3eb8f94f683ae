"""Stress: many informers, one busy writer, and a stalled watcher that must not slow it.

The defaults are the issue's sizes (100 informers, 1,024 GPUs, 20,000 status
updates): 2 million deliveries through Python gRPC, about 2.5 minutes on two
cores. The environment can shrink them for a quick local run:

    DEVICEAPI_STRESS_UPDATES=2000 pytest tests/integration/test_deviceapi_stress.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from gpufleet.core.retry import Backoff
from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.errors import WatcherEvictedError
from gpufleet.deviceapi.informer import GpuInformer
from gpufleet.deviceapi.v1alpha1 import gpu_pb2
from tests.integration.deviceapi_harness import (
    make_gpu,
    running_server,
    short_tmp,
    with_condition,
)

pytestmark = pytest.mark.integration

WATCHERS = int(os.environ.get("DEVICEAPI_STRESS_WATCHERS", "100"))
GPUS = int(os.environ.get("DEVICEAPI_STRESS_GPUS", "1024"))
UPDATES = int(os.environ.get("DEVICEAPI_STRESS_UPDATES", "20000"))


async def _write_statuses(
    client: DeviceApiClient, gpus: list[gpu_pb2.Gpu], updates: int
) -> list[gpu_pb2.Gpu]:
    for k in range(updates):
        i = k % len(gpus)
        healthy = (k // len(gpus)) % 2 == 1
        gpus[i] = await client.update_status(
            with_condition(gpus[i], "True" if healthy else "False", f"Write{k}")
        )
    return gpus


async def _caught_up(informers: list[GpuInformer], rv: str) -> None:
    # Polls state the informers' tasks own; wrap in asyncio.timeout to bound it.
    while any(i.resource_version != rv for i in informers):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def _drain(first: asyncio.Future[gpu_pb2.WatchEvent], stream: AsyncIterator[object]) -> None:
    await first
    async for _ in stream:
        pass


async def test_every_informer_ends_with_the_store_after_a_burst_of_status_updates() -> None:
    fast = Backoff(initial=0.05, cap=0.5)
    with short_tmp() as directory:
        async with (
            running_server(directory, max_gpus=max(GPUS, 1)) as running,
            running.client() as writer,
        ):
            gpus = [await writer.create(make_gpu(f"gpu-{i:04d}", i)) for i in range(GPUS)]
            clients = [running.client() for _ in range(WATCHERS)]
            informers = [GpuInformer(c, backoff=fast) for c in clients]
            tasks = [asyncio.create_task(i.run()) for i in informers]
            try:
                async with asyncio.timeout(60):
                    await asyncio.gather(*(i.wait_synced() for i in informers))
                await _write_statuses(writer, gpus, UPDATES)
                final_rv = str(running.store.resource_version)
                async with asyncio.timeout(120):
                    await _caught_up(informers, final_rv)
                expected = {g.metadata.name: g for g in running.store.list().items}
                mismatched = [
                    n
                    for n, i in enumerate(informers)
                    if {g.metadata.name: g for g in i.items()} != expected
                ]
            finally:
                for informer in informers:
                    informer.stop()
                await asyncio.gather(*tasks)
                for client in clients:
                    await client.close()
    assert mismatched == []


@pytest.mark.parametrize("batched", [True, False], ids=["WatchGpuBatches", "WatchGpus"])
async def test_a_stalled_watcher_is_evicted_without_slowing_the_writer(batched: bool) -> None:
    updates = max(UPDATES, 2000)
    with short_tmp() as directory:
        async with running_server(directory, watch_queue=64) as running:
            # Without BDP probing the stalled client's receive window stays at 64 KiB,
            # so the server's writes to it block soon and its queue overflows.
            stalled_client = DeviceApiClient(running.socket, options=[("grpc.http2.bdp_probe", 0)])
            # WatchGpus: the state a client is in once a server predating
            # WatchGpuBatches has answered UNIMPLEMENTED.
            stalled_client._batched = batched
            async with running.client() as writer, stalled_client as stalled:
                gpus = [await writer.create(make_gpu(f"gpu-{i:04d}", i)) for i in range(16)]
                # Opened and never read: the server keeps writing until flow control
                # stops it, then the store's bounded queue overflows.
                stream = stalled.watch(gpus[-1].metadata.resource_version)
                first = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(0.1)

                # Nothing has read the stalled stream yet, so a writer that waited
                # on watchers would never finish: the timeout only guards a hang.
                async with asyncio.timeout(300):
                    await _write_statuses(writer, gpus, updates)
                # Evicted while the writes went on: its queue overflowed because the
                # writer kept writing past the point where the watcher stopped.
                evicted = running.store.evicted_total

                # Reading now drains what was in flight, then ends with the eviction.
                with pytest.raises(WatcherEvictedError):
                    await asyncio.wait_for(_drain(first, stream), 30)
                with contextlib.suppress(Exception):
                    await stream.aclose()
    assert stalled._batched is batched  # the eviction came through the RPC meant
    assert evicted == 1
