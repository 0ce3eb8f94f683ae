"""A batch that can never go through does not hold back the ones behind it.

Against real HTTP receivers on loopback: one that answers 500 only to the batch
holding one reading, one that is down for everything, and one with a body limit
that answers 413. And against an S3-speaking server that refuses one key.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.core.config import load_settings
from gpufleet.core.retry import Backoff
from gpufleet.gpu.model import DeviceList, GpuDevice
from gpufleet.inventory.delivery import DeliveryConfig, DeliveryPipeline
from gpufleet.inventory.exporters.base import Exporter
from gpufleet.inventory.exporters.http import HttpExporter, HttpSettings
from gpufleet.inventory.local import scan_once
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool
from tests.integration.http_ingest_support import ingest_endpoint

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 24, tzinfo=UTC)
FAST = Backoff(initial=0.001, factor=2.0, cap=0.005, jitter=0.0)
POISON = "S-POISON"


def reading(gpu: str, i: int, node: str = "node-1", model: str = "NVIDIA L4") -> Reading:
    return Reading(
        cluster="c1", node=node, machine="m", source="nvml", chassis="", gpu=gpu,
        read_time=T0 + timedelta(seconds=i), uuid=f"GPU-{gpu}", model=model,
        pci_bus_id="00000000:01:00.0", index=0,
    )  # fmt: skip


@dataclass
class Receiver:
    """Stores what it takes; answers 500 to poison batches, or to the first ``down`` POSTs."""

    url: str = ""
    stored: list[list[str]] = field(default_factory=list)
    poison_posts: int = 0
    posts: int = 0
    down: int = 0
    on_post: Any = None

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.on_post is not None:
            self.on_post()
        # Past the server's client_max_size this answers 413, as a body limit does.
        gpus = [r["gpu"] for r in json.loads(await request.read())]
        if self.posts <= self.down:
            return web.Response(status=503, text="down")
        if POISON in gpus:
            self.poison_posts += 1
            return web.Response(status=500, text="internal error")
        self.stored.append(gpus)
        return web.Response(status=200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    async with ingest_endpoint(recv.handle) as recv.url:
        yield recv


def http(url: str) -> HttpExporter:
    return HttpExporter(load_settings(HttpSettings, http_endpoint=url))


def pipeline(
    exporter: Exporter, tmp_path: Path, registry: CollectorRegistry, **limits: Any
) -> DeliveryPipeline:
    wall = limits.pop("wall", lambda: 1_000_000.0)
    return DeliveryPipeline(
        exporter, Spool(tmp_path / "x.spool", max_bytes=10_000_000),
        cluster="c1", metrics=ExportMetrics(registry),
        config=DeliveryConfig(batch_size=2, flush_interval=0.01, backoff=FAST, **limits),
        wall=wall,
    )  # fmt: skip


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def dead_letters(pipe: DeliveryPipeline) -> list[dict[str, Any]]:
    path = pipe.spool.dead_letter_path
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# The poison batch first, five good batches of two behind it.
BATCHES = [[POISON, "S-00"]] + [[f"S-{i}{j}" for j in range(2)] for i in range(1, 6)]


async def submit_all(pipe: DeliveryPipeline) -> None:
    await pipe.submit([reading(g, i) for i, g in enumerate(g for b in BATCHES for g in b)])


# --- a batch that fails every time (item 9) ---------------------------------------------


async def test_a_batch_failing_with_500_every_time_is_dead_lettered_and_the_rest_delivered(
    receiver: Receiver, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    pipe = pipeline(http(receiver.url), tmp_path, registry, max_attempts=3, max_age=0)
    try:
        await submit_all(pipe)
        assert await pipe.drain(within=20)
    finally:
        await pipe.close()
    assert receiver.stored == BATCHES[1:]
    # Three attempts, then once more after the sink took the batch behind it.
    assert receiver.poison_posts == 4
    (dead,) = dead_letters(pipe)
    assert [r["gpu"] for r in dead["readings"]] == BATCHES[0]
    assert "gave up after 4 failed attempts" in dead["reason"]
    assert "HTTP 500" in dead["reason"]
    assert sample(registry, "gpufleet_delivery_dropped_total", reason="retry_limit") == 2
    assert [r.readings for r in pipe.refused] == [2]


async def test_a_batch_failing_past_its_age_limit_is_dead_lettered(
    receiver: Receiver, tmp_path: Path
) -> None:
    now = [1_000_000.0]

    def tick() -> None:
        now[0] += 60.0  # a minute passes with every POST

    receiver.on_post = tick
    pipe = pipeline(
        http(receiver.url), tmp_path, CollectorRegistry(),
        max_attempts=0, max_age=100.0, wall=lambda: now[0],
    )  # fmt: skip
    try:
        await submit_all(pipe)
        assert await pipe.drain(within=20)
    finally:
        await pipe.close()
    assert receiver.stored == BATCHES[1:]
    # Failed at t, t+60 and t+120 (past 100 s), then once more after the next batch went.
    assert receiver.poison_posts == 4
    (dead,) = dead_letters(pipe)
    assert "RETRY_MAX_AGE=100s" in dead["reason"]


async def test_an_outage_longer_than_the_limits_dead_letters_nothing(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.down = 12  # every batch fails, far past max_attempts, then the sink is back
    pipe = pipeline(http(receiver.url), tmp_path, CollectorRegistry(), max_attempts=2, max_age=0)
    try:
        await pipe.submit([reading(f"S-{i:02d}", i) for i in range(12)])
        assert await pipe.drain(within=20)
    finally:
        await pipe.close()
    # The sink came back while the batches behind the stuck one were being
    # tried, so the one that proved it went first; every reading went once.
    delivered = [g for batch in receiver.stored for g in batch]
    assert sorted(delivered) == [f"S-{i:02d}" for i in range(12)]
    assert (dead_letters(pipe), pipe.refused) == ([], [])


async def test_a_stuck_batch_with_no_batch_behind_it_stays_in_the_spool(
    receiver: Receiver, tmp_path: Path
) -> None:
    pipe = pipeline(http(receiver.url), tmp_path, CollectorRegistry(), max_attempts=2, max_age=0)
    try:
        await pipe.submit([reading(POISON, 0), reading("S-00", 1)])
        assert not await pipe.drain(within=0.5)
        left = pipe.stats().readings
    finally:
        await pipe.close()
    assert (left, dead_letters(pipe)) == (2, [])


# --- HTTP 413: the batch is split, down to the one reading that is too large (item 10) --


def device(i: int, model: str = "NVIDIA L4") -> GpuDevice:
    return GpuDevice(i, f"GPU-{i}", f"S-{i}", model, f"00000000:{i + 1:02x}:00.0")


class FixedSource:
    """A GpuSource with fixed devices."""

    def __init__(self, devices: list[GpuDevice]) -> None:
        self.listing = DeviceList(devices=tuple(devices), faults=())

    def devices(self) -> DeviceList:
        return self.listing

    def close(self) -> None:
        pass


@pytest.fixture
async def limited_receiver() -> AsyncIterator[Receiver]:
    """A receiver whose aiohttp body limit lets two or three readings through, never eight."""
    recv = Receiver()
    async with ingest_endpoint(recv.handle, client_max_size=2_000) as recv.url:
        yield recv


async def test_413_splits_the_batch_and_only_the_reading_too_large_alone_is_dead_lettered(
    limited_receiver: Receiver, tmp_path: Path
) -> None:
    receiver = limited_receiver
    devices = [device(i) for i in range(8)]
    devices[5] = device(5, model="H" * 5_000)  # too large even alone
    pipe = DeliveryPipeline(
        http(receiver.url), Spool(tmp_path / "http.spool", max_bytes=10_000_000),
        cluster="c1", metrics=ExportMetrics(CollectorRegistry()),
        config=DeliveryConfig(batch_size=500, flush_interval=0.01, backoff=FAST),
    )  # fmt: skip
    try:
        result = await scan_once(
            FixedSource(devices), [pipe], cluster="c1", node="node-1", machine="m",
            source_label="nvml", delivery_timeout=20,
        )  # fmt: skip
    finally:
        await pipe.close()
    assert sorted(g for batch in receiver.stored for g in batch) == [
        f"S-{i}" for i in range(8) if i != 5
    ]
    (dead,) = dead_letters(pipe)
    assert [r["gpu"] for r in dead["readings"]] == ["S-5"]
    assert "413" in dead["reason"]
    assert "even alone" in dead["reason"]
    # The scan does not report the refused reading as delivered.
    assert result.failed_exporters == ("http",)
    assert "1 reading(s) refused" in result.errors["http"]


# --- S3: a put refused for its own content is permanent; access denied is not -----------

_S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    "<Error><Code>{code}</Code><Message>{message}</Message><RequestId>r1</RequestId></Error>"
)


@dataclass
class HostileS3:
    """Speaks enough S3 for PutObject: refuses keys of nodes starting ``refuse_node``."""

    url: str = ""
    refuse_node: str = "poison"
    status: int = 400
    code: str = "KeyTooLongError"
    puts: dict[str, int] = field(default_factory=dict)
    stored: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        await request.read()
        self.puts[key] = self.puts.get(key, 0) + 1
        if f"/node={self.refuse_node}" in key:
            text = _S3_ERROR.format(code=self.code, message="refused by the test server")
            return web.Response(status=self.status, text=text, content_type="application/xml")
        self.stored.append(key)
        return web.Response(status=200, headers={"ETag": '"0123456789abcdef"'})


@pytest.fixture
async def hostile_s3(aws_env: None) -> AsyncIterator[HostileS3]:
    server = HostileS3()
    app = web.Application()
    app.router.add_route("PUT", "/inv/{key:.+}", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def s3_exporter(url: str) -> Exporter:
    from gpufleet.inventory.exporters.s3 import S3Exporter, S3Settings

    settings = load_settings(
        S3Settings, s3_bucket="inv", s3_endpoint_url=url, s3_force_path_style=True
    )
    return S3Exporter(settings)


def node_batches() -> list[Reading]:
    """Batches of two: the first holds the refused node's reading, three good ones follow."""
    nodes = ["poison", "node-1", "node-2", "node-3"]
    return [reading(f"S-{i}{j}", 2 * i + j, node=nodes[i]) for i in range(4) for j in range(2)]


async def test_s3_key_too_long_dead_letters_the_batch_at_once_and_delivers_the_rest(
    hostile_s3: HostileS3, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    pipe = pipeline(s3_exporter(hostile_s3.url), tmp_path, registry, max_attempts=0, max_age=0)
    try:
        await pipe.submit(node_batches())
        assert await pipe.drain(within=20)
    finally:
        await pipe.close()
    refused = [key for key in hostile_s3.puts if "node=poison/" in key]
    assert [hostile_s3.puts[key] for key in refused] == [1]  # never retried
    stored_nodes = sorted(key.split("/")[-2] for key in hostile_s3.stored)
    assert stored_nodes == ["node=node-1", "node=node-2", "node=node-3"]
    (dead,) = dead_letters(pipe)
    assert "KeyTooLongError" in dead["reason"]
    assert sample(registry, "gpufleet_delivery_dropped_total", reason="dead_letter") == 2


async def test_s3_access_denied_for_every_put_is_retried_not_dead_lettered(
    hostile_s3: HostileS3, tmp_path: Path
) -> None:
    # Every node of these batches: credentials or a policy an operator must fix.
    hostile_s3.refuse_node, hostile_s3.status, hostile_s3.code = "node-", 403, "AccessDenied"
    exporter = s3_exporter(hostile_s3.url)
    pipe = pipeline(exporter, tmp_path, CollectorRegistry(), max_attempts=2, max_age=0)
    try:
        await pipe.submit([reading(f"S-{i}", i, node=f"node-{i}") for i in range(4)])
        assert not await pipe.drain(within=0.5)
        left = pipe.stats().readings
    finally:
        await pipe.close()
    assert (left, dead_letters(pipe)) == (4, [])
    assert max(hostile_s3.puts.values()) > 2  # retried past the limit: the sink is down for all
