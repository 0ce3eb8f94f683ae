"""The health server answers /metrics, /healthz and /readyz over a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.core.http import HealthServer


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter(
        "gpufleet_test_scrapes", "Scrapes seen by the test.", ["node"], registry=registry
    ).labels(node="n1").inc(3)
    return registry


@pytest.fixture
async def server(registry: CollectorRegistry) -> AsyncIterator[HealthServer]:
    server = HealthServer(host="127.0.0.1", port=0, registry=registry, check_timeout=0.2)
    yield server
    await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(server: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def ready() -> bool:
    return True


async def not_ready() -> bool:
    return False


async def broken() -> bool:
    raise ConnectionError("sink unreachable")


async def hangs() -> bool:
    await asyncio.Event().wait()
    return True


async def test_port_zero_binds_a_real_free_port(server: HealthServer) -> None:
    await server.start()
    assert server.port > 0


async def test_port_before_start_is_an_error(server: HealthServer) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port


async def test_healthz_says_ok(server: HealthServer, client: aiohttp.ClientSession) -> None:
    await server.start()
    async with client.get(url(server, "/healthz")) as response:
        assert (response.status, await response.text()) == (200, "ok")


async def test_metrics_renders_the_given_registry(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    await server.start()
    async with client.get(url(server, "/metrics")) as response:
        text = await response.text()
    samples = {
        (sample.name, sample.labels.get("node"), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert ("gpufleet_test_scrapes_total", "n1", 3.0) in samples


async def test_metrics_uses_the_prometheus_text_content_type(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    await server.start()
    async with client.get(url(server, "/metrics")) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")


async def test_metrics_defaults_to_the_global_registry(client: aiohttp.ClientSession) -> None:
    server = HealthServer(host="127.0.0.1", port=0)
    await server.start()
    try:
        async with client.get(url(server, "/metrics")) as response:
            names = {
                family.name for family in text_string_to_metric_families(await response.text())
            }
    finally:
        await server.stop()
    # The global registry always carries the client library's own Python collectors.
    assert "python_info" in names


async def test_readyz_without_checks_is_ready(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    await server.start()
    async with client.get(url(server, "/readyz")) as response:
        assert (response.status, await response.json()) == (200, {"ready": True, "checks": {}})


async def test_readyz_is_ready_when_every_check_passes(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    server.add_readiness_check("informer", ready)
    server.add_readiness_check("sink", ready)
    await server.start()
    async with client.get(url(server, "/readyz")) as response:
        assert response.status == 200


async def test_readyz_is_503_when_a_check_returns_false(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    server.add_readiness_check("informer", ready)
    server.add_readiness_check("sink", not_ready)
    await server.start()
    async with client.get(url(server, "/readyz")) as response:
        assert (response.status, (await response.json())["ready"]) == (503, False)


async def test_readyz_reports_each_check_by_name(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    server.add_readiness_check("informer", ready)
    server.add_readiness_check("sink", not_ready)
    await server.start()
    async with client.get(url(server, "/readyz")) as response:
        assert (await response.json())["checks"] == {
            "informer": {"ok": True},
            "sink": {"ok": False, "error": "check returned false"},
        }


async def test_readyz_check_that_raises_is_not_ready_with_the_error_text(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    server.add_readiness_check("sink", broken)
    await server.start()
    async with client.get(url(server, "/readyz")) as response:
        assert (await response.json())["checks"]["sink"] == {
            "ok": False,
            "error": "ConnectionError: sink unreachable",
        }


async def test_readyz_check_that_hangs_times_out_as_not_ready(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    server.add_readiness_check("provider", hangs)
    await server.start()
    async with client.get(url(server, "/readyz")) as response:
        assert (await response.json())["checks"]["provider"] == {
            "ok": False,
            "error": "timed out after 0.2s",
        }


async def test_readyz_runs_checks_concurrently(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    running = 0
    most = 0

    async def counted() -> bool:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1
        return True

    for name in ("a", "b", "c"):
        server.add_readiness_check(name, counted)
    await server.start()
    async with client.get(url(server, "/readyz")):
        pass
    assert most == 3


def test_duplicate_check_name_is_rejected(registry: CollectorRegistry) -> None:
    server = HealthServer(host="127.0.0.1", port=0, registry=registry)
    server.add_readiness_check("sink", ready)
    with pytest.raises(ValueError, match="sink"):
        server.add_readiness_check("sink", ready)


async def test_feature_routes_added_to_app_are_served(
    server: HealthServer, client: aiohttp.ClientSession
) -> None:
    async def version(request: web.Request) -> web.Response:
        return web.Response(text="v1")

    server.app.router.add_get("/version", version)
    await server.start()
    async with client.get(url(server, "/version")) as response:
        assert await response.text() == "v1"


async def test_stop_closes_the_port(server: HealthServer, client: aiohttp.ClientSession) -> None:
    await server.start()
    address = url(server, "/healthz")
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with client.get(address):
            pass


async def test_starting_twice_is_an_error(server: HealthServer) -> None:
    await server.start()
    with pytest.raises(RuntimeError, match="already started"):
        await server.start()
