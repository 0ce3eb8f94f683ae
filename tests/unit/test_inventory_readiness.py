"""/readyz follows the exporters' health checks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from gpufleet.core.http import HealthServer
from gpufleet.inventory.delivery import DeliveryPipeline
from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.metrics import ExportMetrics
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import Spool
from gpufleet.inventory.wiring import add_readiness_checks


class SwitchableExporter:
    name = "switch"

    def __init__(self) -> None:
        self.up = False

    async def write(self, batch: Sequence[Reading]) -> None:
        pass

    async def health(self) -> None:
        if not self.up:
            raise ExporterError(self.name, "connection refused", error_type="connection")

    async def close(self) -> None:
        pass


async def test_readyz_is_503_while_the_exporter_is_down_and_200_once_it_is_up(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    exporter = SwitchableExporter()
    spool = Spool(tmp_path / "s.spool", max_bytes=1 << 20)
    pipe = DeliveryPipeline(exporter, spool, cluster="c", metrics=ExportMetrics(registry))
    server = HealthServer(host="127.0.0.1", port=0, registry=registry)
    add_readiness_checks(server, [pipe])
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{server.port}/readyz"
            async with http.get(url) as down:
                down_status, down_body = down.status, await down.json()
            exporter.up = True
            async with http.get(url) as up:
                up_status = up.status
    finally:
        await server.stop()
        spool.close()
    assert (down_status, up_status) == (503, 200)
    assert down_body["checks"]["exporter:switch"]["ok"] is False
