"""The HTTP exporter against a real aiohttp server on loopback that records what it gets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.core.http import HealthServer
from gpufleet.core.retry import Backoff
from gpufleet.inventory.delivery import DeliveryConfig, DeliveryPipeline
from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.http import HttpExporter, HttpSettings
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading, batch_hash
from gpufleet.inventory.spool import Spool
from gpufleet.inventory.wiring import add_readiness_checks
from tests.integration.http_ingest_support import ingest_endpoint
from tests.polling import eventually

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 24, 0, 16, 10, 123000, tzinfo=UTC)

BATCH = [
    Reading(
        cluster="c1", node="node-1", machine="i-1", source="nvml", chassis="",
        gpu=f"SN-{i}", read_time=T0, uuid=f"GPU-{i}", model="NVIDIA H100 80GB HBM3",
        pci_bus_id=f"00000000:{i:02x}:00.0", index=i,
    )
    for i in range(3)
]  # fmt: skip


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP server that records requests and answers from a script."""

    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    """Statuses for the next POSTs, in order; 200 once they run out."""
    body: str = "ok"
    delay: float = 0.0
    options_status: int = 405

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Seen(request.method, dict(request.headers), await request.read()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.method == "OPTIONS":
            return web.Response(status=self.options_status)
        status = self.statuses.pop(0) if self.statuses else 200
        headers = {"Location": "http://elsewhere.test/in?token=x"} if 300 <= status < 400 else {}
        return web.Response(status=status, text=self.body, headers=headers)

    @property
    def posts(self) -> list[Seen]:
        return [r for r in self.requests if r.method == "POST"]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    async with ingest_endpoint(recv.handle) as recv.url:
        yield recv


def exporter(url: str, **overrides: Any) -> HttpExporter:
    return HttpExporter(load_settings(HttpSettings, http_endpoint=url, **overrides))


async def send(exp: HttpExporter, batch: list[Reading] = BATCH) -> None:
    try:
        await exp.write(batch)
    finally:
        await exp.close()


async def failure(exp: HttpExporter) -> ExporterError:
    with pytest.raises(ExporterError) as caught:
        await send(exp)
    return caught.value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_idempotency_key_is_the_batch_hash(receiver: Receiver) -> None:
    await send(exporter(receiver.url))
    assert receiver.posts[0].headers["Idempotency-Key"] == batch_hash(BATCH)


async def test_replayed_batch_sends_the_same_idempotency_key(receiver: Receiver) -> None:
    await send(exporter(receiver.url))
    await send(exporter(receiver.url))
    assert len({p.headers["Idempotency-Key"] for p in receiver.posts}) == 1


async def test_bearer_token_is_sent_in_the_authorization_header(receiver: Receiver) -> None:
    await send(exporter(receiver.url, http_auth_token="s3cret-token"))
    assert receiver.posts[0].headers["Authorization"] == "Bearer s3cret-token"


async def test_no_authorization_header_without_a_token(receiver: Receiver) -> None:
    await send(exporter(receiver.url))
    assert "Authorization" not in receiver.posts[0].headers


async def test_body_is_a_json_array_that_round_trips_to_the_readings(receiver: Receiver) -> None:
    await send(exporter(receiver.url))
    assert [Reading.from_dict(d) for d in json.loads(receiver.posts[0].body)] == BATCH


async def test_body_is_sent_as_application_json(receiver: Receiver) -> None:
    await send(exporter(receiver.url))
    assert receiver.posts[0].headers["Content-Type"] == "application/json"


async def test_empty_batch_sends_nothing(receiver: Receiver) -> None:
    await send(exporter(receiver.url), [])
    assert receiver.requests == []


async def test_503_is_a_retryable_server_error(receiver: Receiver) -> None:
    receiver.statuses = [503]
    error = await failure(exporter(receiver.url))
    assert (type(error), error.error_type) == (ExporterError, "server")


async def test_503_then_200_delivers_the_batch_on_the_second_write(receiver: Receiver) -> None:
    receiver.statuses = [503]
    exp = exporter(receiver.url)
    with pytest.raises(ExporterError):
        await exp.write(BATCH)
    await send(exp)
    assert [p.headers["Idempotency-Key"] for p in receiver.posts] == [batch_hash(BATCH)] * 2


async def test_429_is_retryable(receiver: Receiver) -> None:
    receiver.statuses = [429]
    error = await failure(exporter(receiver.url))
    assert not isinstance(error, PermanentExporterError)


async def test_400_is_a_permanent_rejection(receiver: Receiver) -> None:
    receiver.statuses = [400]
    error = await failure(exporter(receiver.url))
    assert (type(error), error.error_type) == (PermanentExporterError, "rejected")


async def test_rejection_message_names_the_status_and_quotes_the_body(receiver: Receiver) -> None:
    receiver.statuses = [400]
    receiver.body = "field 'gpu' is\n required"
    error = await failure(exporter(receiver.url))
    assert str(error).endswith("HTTP 400 Bad Request: field 'gpu' is required")


async def test_error_message_quotes_at_most_200_chars_of_the_body(receiver: Receiver) -> None:
    receiver.statuses = [422]
    receiver.body = "x" * 5000
    error = await failure(exporter(receiver.url))
    assert str(error).endswith(": " + "x" * 199 + "…")


async def test_401_is_a_retryable_auth_error(receiver: Receiver) -> None:
    receiver.statuses = [401]
    error = await failure(exporter(receiver.url, http_auth_token="old-token"))
    assert (type(error), error.error_type) == (ExporterError, "auth")


async def test_auth_error_message_never_contains_the_token(receiver: Receiver) -> None:
    receiver.statuses = [403]
    error = await failure(exporter(receiver.url, http_auth_token="old-token"))
    assert "old-token" not in str(error)


async def test_redirect_is_not_followed_and_is_a_config_error(receiver: Receiver) -> None:
    receiver.statuses = [302]
    error = await failure(exporter(receiver.url))
    assert (error.error_type, len(receiver.requests)) == ("config", 1)


async def test_slow_server_is_a_timeout_error(receiver: Receiver) -> None:
    receiver.delay = 2.0
    error = await failure(exporter(receiver.url, http_timeout="200ms"))
    assert error.error_type == "timeout"


async def test_refused_connection_is_a_connection_error() -> None:
    error = await failure(exporter(f"http://127.0.0.1:{free_port()}/ingest"))
    assert error.error_type == "connection"


async def test_health_passes_when_a_post_only_endpoint_answers_405(receiver: Receiver) -> None:
    exp = exporter(receiver.url)
    await exp.health()
    await exp.close()
    assert [r.method for r in receiver.requests] == ["OPTIONS"]


async def test_health_fails_with_auth_when_the_token_is_refused(receiver: Receiver) -> None:
    receiver.options_status = 401
    exp = exporter(receiver.url, http_auth_token="old-token")
    with pytest.raises(ExporterError) as caught:
        await exp.health()
    await exp.close()
    assert caught.value.error_type == "auth"


async def test_health_fails_when_nothing_listens() -> None:
    exp = exporter(f"http://127.0.0.1:{free_port()}/ingest")
    with pytest.raises(ExporterError) as caught:
        await exp.health()
    await exp.close()
    assert caught.value.error_type == "connection"


BAD_URLS = ["ftp://example.test/in", "example.test/in", "http://", "http://h:x/"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_invalid_endpoint_is_refused_with_one_line_naming_http_endpoint(url: str) -> None:
    one_line = r"^invalid HTTP_ENDPOINT=.*expected an http:// or https:// URL[^\n]*$"
    with pytest.raises(ConfigError, match=one_line):
        load_settings(HttpSettings, http_endpoint=url)


def test_missing_endpoint_is_refused_naming_http_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HTTP_ENDPOINT", raising=False)
    with pytest.raises(ConfigError, match=r"^missing required HTTP_ENDPOINT$"):
        load_settings(HttpSettings)


def test_timeout_is_read_as_a_duration() -> None:
    settings = load_settings(HttpSettings, http_endpoint="http://h/", http_timeout="1m30s")
    assert settings.http_timeout == 90.0


# --- through the delivery pipeline: retry and dead-letter are the pipeline's job ---


def http_pipeline(url: str, tmp_path: Path) -> DeliveryPipeline:
    return DeliveryPipeline(
        exporter(url), Spool(tmp_path / "http.spool", max_bytes=1 << 20),
        cluster="c1", metrics=ExportMetrics(CollectorRegistry()),
        config=DeliveryConfig(backoff=Backoff(initial=0.01, cap=0.05, jitter=0.0)),
    )  # fmt: skip


async def test_pipeline_retries_503_then_delivers_on_200(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.statuses = [503]
    pipe = http_pipeline(receiver.url, tmp_path)
    await pipe.submit(BATCH)
    delivered = await pipe.drain(within=10)
    await pipe.exporter.close()
    assert delivered
    assert [json.loads(p.body)[0]["gpu"] for p in receiver.posts] == ["SN-0", "SN-0"]


async def test_pipeline_moves_a_400_batch_to_the_dead_letter_file(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.statuses = [400]
    receiver.body = "field read_time: invalid"
    pipe = http_pipeline(receiver.url, tmp_path)
    await pipe.submit(BATCH)
    await pipe.drain(within=10)
    await pipe.exporter.close()
    (dead,) = [json.loads(x) for x in pipe.spool.dead_letter_path.read_text().splitlines()]
    assert "400" in dead["reason"]
    assert len(dead["readings"]) == 3
    assert len(receiver.posts) == 1


# --- a configuration error is never retried ----------------------------------------


async def test_a_404_is_a_configuration_error(receiver: Receiver) -> None:
    receiver.statuses = [404]
    error = await failure(exporter(receiver.url))
    assert error.is_config
    assert "HTTP_ENDPOINT" in str(error)


async def test_running_pipeline_stops_at_a_configuration_error_and_readyz_says_why(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [404] * 10
    pipe = http_pipeline(receiver.url, tmp_path)
    server = HealthServer(host="127.0.0.1", port=0, registry=CollectorRegistry())
    add_readiness_checks(server, [pipe])
    await server.start()
    run = asyncio.create_task(pipe.run())
    try:
        await pipe.submit(BATCH)
        await eventually(lambda: pipe.config_error is not None, limit=10)
        await pipe.submit(BATCH[:1])  # still accepted into the spool, never sent
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.port}/readyz") as answer,
        ):
            status, body = answer.status, await answer.json()
        pipe.stop()  # a stop makes one last attempt, except after a configuration error
        await asyncio.wait_for(run, 10)
        spooled = pipe.stats().readings
    finally:
        run.cancel()
        await server.stop()
        await pipe.close()
    check = body["checks"]["exporter:http"]
    assert (status, check["ok"], len(receiver.posts)) == (503, False, 1)
    assert "HTTP 404" in check["error"]
    assert "HTTP_ENDPOINT" in check["error"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "exporter misconfigured: not retried; delivery to it stops until the settings are "
        "fixed and the process restarts, and its readings stay in the spool"
    ]
    assert spooled == len(BATCH) + 1
