"""A long-running reading producer for outage tests: the real pipeline in its own process.

It accepts one reading at a time through ``open_delivery`` (the same wiring as
``gpufleet inventory scan``: spool, pipeline, exporter from the environment)
while the pipeline's sender runs, and prints ``accepted <gpu>`` on stdout only
after ``submit`` returned, that is, after the reading is durably in the spool.
The test kills it with SIGKILL at a moment of its choosing.

Usage: python feeder.py START COUNT
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

from gpufleet.core.config import load_settings
from gpufleet.core.logging import configure_logging
from gpufleet.inventory.config import ScanSettings
from gpufleet.inventory.delivery import DeliveryPipeline
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.wiring import open_delivery


async def main(start: int, count: int) -> None:
    configure_logging("feeder", level="info")
    settings = load_settings(ScanSettings)
    delivery = open_delivery(settings.exporter_type[0], settings)
    assert isinstance(delivery, DeliveryPipeline)
    sender = asyncio.create_task(delivery.run())
    for i in range(start, start + count):
        reading = Reading(
            cluster=settings.cluster_name, node="feeder", machine="i-feeder", source="feeder",
            chassis="", gpu=f"FEED-{i:07d}", read_time=datetime.now(UTC), uuid=f"GPU-FEED-{i}",
            model="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:18:00.0", index=0,
        )  # fmt: skip
        await delivery.submit([reading])
        sys.stdout.write(f"accepted {reading.gpu}\n")
        sys.stdout.flush()
        await asyncio.sleep(0.005)
    delivery.stop()
    await sender


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
