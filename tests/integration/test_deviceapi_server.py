"""The device API server: socket permissions, listening policy, readiness, health, metrics."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import stat
import sys
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.deviceapi.config import DeviceApiSettings
from gpufleet.deviceapi.errors import NotFoundError, UnavailableError
from gpufleet.deviceapi.server import serve
from gpufleet.deviceapi.service import SERVICE_NAME
from tests.integration.deviceapi_harness import make_gpu, running_server, short_tmp

pytestmark = pytest.mark.integration


async def _status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def _health(target: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        status: int = reply.status
        return status


async def test_the_socket_file_is_mode_0660() -> None:
    with short_tmp() as directory:
        async with running_server(directory) as running:
            mode = stat.S_IMODE(os.stat(running.socket).st_mode)
    assert mode == 0o660


async def test_a_stale_socket_is_replaced_and_removed_on_shutdown() -> None:
    with short_tmp() as directory:
        path = directory / "run" / "device.sock"
        path.parent.mkdir()
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(path))
        dead.close()  # leaves the file behind, like a killed server
        async with running_server(directory) as running, running.client() as api:
            with pytest.raises(NotFoundError):
                await api.get("gpu-0")
        assert not path.exists()


@pytest.mark.parametrize(
    ("listen", "extra"),
    [
        ("0.0.0.0:0", {}),
        ("0.0.0.0:0", {"allow_remote": True}),
        ("[::]:0", {}),
        ("gpu-node.example.com:9000", {}),
    ],
)
async def test_a_non_loopback_tcp_bind_without_allow_remote_and_tls_is_refused(
    listen: str, extra: dict[str, object]
) -> None:
    with short_tmp() as directory:
        settings = load_settings(
            DeviceApiSettings,
            device_api_socket=directory / "device.sock",
            device_api_listen=listen,
            metrics_port=0,
            **extra,
        )
        with pytest.raises(ConfigError, match="DEVICE_API_LISTEN"):
            await serve(settings, stop=asyncio.Event())
        assert not (directory / "device.sock").exists()


async def test_tcp_on_loopback_is_served() -> None:
    with short_tmp() as directory:
        async with running_server(directory, device_api_listen="127.0.0.1:0") as running:
            assert running.info.tcp_port
            async with DeviceApiClient(f"127.0.0.1:{running.info.tcp_port}") as api:
                created = await api.create(make_gpu("gpu-0"))
            assert created.metadata.uid


async def test_readyz_waits_for_the_first_gpu_and_grpc_health_follows() -> None:
    with short_tmp() as directory:
        async with running_server(directory) as running, running.client() as api:
            target = f"unix:{running.socket}"
            assert await _status(running.metrics_url + "/healthz") == 200
            assert await _status(running.metrics_url + "/readyz") == 503
            assert await _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING
            await api.create(make_gpu("gpu-0"))
            assert await _status(running.metrics_url + "/readyz") == 200
            await asyncio.sleep(0.05)  # the health servicer is switched by a task
            assert await _health(target) == health_pb2.HealthCheckResponse.SERVING
            assert await _health(target, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING


async def test_without_the_readiness_gate_the_server_is_ready_at_once() -> None:
    with short_tmp() as directory:
        async with running_server(directory, readiness_gate=False) as running:
            await asyncio.sleep(0.05)
            assert await _status(running.metrics_url + "/readyz") == 200
            health = await _health(f"unix:{running.socket}")
            assert health == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_gpu_service() -> None:
    with short_tmp() as directory:
        async with (
            running_server(directory) as running,
            grpc.aio.insecure_channel(f"unix:{running.socket}") as channel,
        ):
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            call = stub.ServerReflectionInfo(iter([request]))
            names = [
                service.name
                async for reply in call
                for service in reply.list_services_response.service
            ]
    assert SERVICE_NAME in names


async def test_metrics_count_requests_by_method_and_code() -> None:
    frozen_before = gc.get_freeze_count()
    with short_tmp() as directory:
        async with running_server(directory) as running, running.client() as api:
            await api.create(make_gpu("gpu-0"))
            await api.get("gpu-0")
            for _ in range(2):
                with pytest.raises(NotFoundError):
                    await api.get("gpu-9")
            async with (
                aiohttp.ClientSession() as session,
                session.get(running.metrics_url + "/metrics") as response,
            ):
                text = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    requests = "gpufleet_deviceapi_requests_total"
    assert samples[(requests, (("code", "OK"), ("method", "CreateGpu")))] == 1
    assert samples[(requests, (("code", "OK"), ("method", "GetGpu")))] == 1
    assert samples[(requests, (("code", "NOT_FOUND"), ("method", "GetGpu")))] == 2
    assert (
        samples[("gpufleet_deviceapi_request_duration_seconds_count", (("method", "GetGpu"),))] == 3
    )
    assert samples[("gpufleet_deviceapi_gpus", ())] == 1
    assert samples[("gpufleet_deviceapi_watchers", ())] == 0
    assert samples[("gpufleet_deviceapi_watchers_evicted_total", ())] == 0
    # serve() inside another program (this test) leaves its garbage collector alone.
    assert samples[("gpufleet_deviceapi_gc_frozen_objects", ())] == frozen_before
    assert gc.get_freeze_count() == frozen_before


async def test_the_server_process_freezes_its_start_up_objects_out_of_the_gc() -> None:
    # Full collections walking every start-up object stopped the event loop
    # for 30-60 ms; `gpufleet device-api serve` freezes them once serving.
    gpufleet = Path(sys.executable).with_name("gpufleet")
    with short_tmp() as directory, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        server = await asyncio.create_subprocess_exec(
            str(gpufleet), "device-api", "serve", "--socket", str(directory / "device.sock"),
            "--metrics-port", str(port), env=dict(os.environ, LOG_LEVEL="warning"),
        )  # fmt: skip
        try:
            text = ""
            async with aiohttp.ClientSession() as session:
                for _ in range(500):
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                            text = await response.text()
                            break
                    except aiohttp.ClientConnectionError:
                        assert server.returncode is None, f"server exited: {server.returncode}"
                        await asyncio.sleep(0.02)
            server.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(server.wait(), 30) == 0
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()
    frozen = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gpufleet_deviceapi_gc_frozen_objects"
    ]
    # Modules, functions and descriptors alone are tens of thousands of objects.
    assert len(frozen) == 1
    assert frozen[0] > 10_000


async def test_shutdown_ends_open_watches_with_unavailable() -> None:
    with short_tmp() as directory:
        api = None
        try:
            async with running_server(directory) as running:
                api = running.client()
                await api.create(make_gpu("gpu-0"))
                stream = api.watch()
                first = await anext(stream)
                assert first.object.metadata.name == "gpu-0"
                pending = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(0.05)
            with pytest.raises(UnavailableError):
                await asyncio.wait_for(pending, 5)
        finally:
            if api is not None:
                await api.close()


def test_settings_name_the_variable_on_a_bad_listen_address(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DEVICE_API_LISTEN"):
        load_settings(DeviceApiSettings, device_api_listen="no-port-here")


def test_settings_refuse_a_store_whose_list_could_exceed_the_response_cap() -> None:
    # Every object in one List: MAX_STORE_BYTES (and MAX_GPUS) must keep it under 64 MiB.
    with pytest.raises(ConfigError, match="MAX_STORE_BYTES=67108864 with MAX_GPUS=4096"):
        load_settings(DeviceApiSettings, max_store_bytes=64 * 1024 * 1024)
    with pytest.raises(ConfigError, match="MAX_OBJECT_BYTES=8192 is more than MAX_STORE_BYTES"):
        load_settings(DeviceApiSettings, max_object_bytes=8192, max_store_bytes=4096)
