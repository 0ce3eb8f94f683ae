"""The inventory controller's processor: nvidia-smi in each device-plugin pod.

For each ready pod it runs ``SMI_COMMAND`` (argv, never through a shell) in the
device-plugin container, parses the XML, and hands one reading per GPU to the
delivery pipeline. The machine comes from the Node's providerID.

Each exporter takes the readings on its own: one with a full spool (or a
failing local sink) holds up none of the others, and the retry hands the same
readings (same ``read_time``) to the exporters that did not take them, without
exec'ing the pod again.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from gpufleet.gpu.smi import parse_smi_xml
from gpufleet.inventory.delivery import Delivery
from gpufleet.inventory.errors import InventoryError
from gpufleet.inventory.podwork import ControllerMetrics, Obj, Unfinished, meta
from gpufleet.inventory.reading import Reading, readings_from_devices
from gpufleet.kube.exec import exec_command
from gpufleet.kube.identity import machine_id

log = logging.getLogger(__name__)

LABEL_PREFIX = "gpufleet.io/"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class PodReadError(InventoryError):
    """Reading a pod's GPUs failed (exec, exit status or XML); it will be retried."""


class SmiProcessor:
    """Reads the GPUs of a node through its device-plugin pod."""

    def __init__(
        self,
        kube: Any,
        *,
        cluster: str,
        container: str,
        command: Sequence[str],
        timeout: float,
        deliveries: Sequence[Delivery],
        metrics: ControllerMetrics,
        node_labels: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.cluster = cluster
        self.container = container
        self.command = list(command)
        self.timeout = timeout
        self.deliveries = deliveries
        self.metrics = metrics
        self.node_labels = node_labels
        self._clock = clock

    async def process(self, pod: Obj, node: Obj) -> None:
        """Exec, parse, deliver, and (optionally) label the node."""
        namespace, name = str(meta(pod, "namespace")), str(meta(pod, "name"))
        node_name = str(meta(node, "name"))
        where = f"{namespace}/{name}"
        with self.metrics.exec_duration.time():
            result = await exec_command(
                self.kube, namespace, name, self.container, self.command, timeout=self.timeout
            )
        if result.exit_code != 0:
            stderr = result.stderr.decode(errors="replace").strip()[:300]
            raise PodReadError(f"{where}: {self.command[0]} exited {result.exit_code}: {stderr}")
        report = parse_smi_xml(result.stdout, origin=where)
        if report.attached_gpus is not None and report.attached_gpus > len(report.devices.devices):
            log.warning(
                "nvidia-smi lists fewer GPUs than are attached",
                extra={"pod": where, "node": node_name, "attached": report.attached_gpus,
                       "listed": len(report.devices.devices)},
            )  # fmt: skip
        readings = readings_from_devices(
            report.devices.devices,
            cluster=self.cluster,
            node=node_name,
            machine=machine_id(node),
            source=where,
            read_time=self._clock(),
        )
        await self._finish(where, node, readings, self.deliveries, labelled=not self.node_labels)

    async def _finish(
        self,
        where: str,
        node: Obj,
        readings: Sequence[Reading],
        deliveries: Sequence[Delivery],
        *,
        labelled: bool,
    ) -> None:
        """Hand ``readings`` to ``deliveries`` and label the node; what fails is resumed later.

        Raises ``Unfinished``, whose ``resume`` does only what is left: the same
        readings to the exporters that did not take them, and the labels if
        they were not written.
        """
        node_name = str(meta(node, "name"))
        # All at once, each on its own: one that fails or waits holds up no other.
        submitted = await asyncio.gather(
            *(d.submit(readings) for d in deliveries), return_exceptions=True
        )
        failed: list[tuple[Delivery, Exception]] = []
        for delivery, outcome in zip(deliveries, submitted, strict=True):
            if isinstance(outcome, Exception):
                failed.append((delivery, outcome))
            elif isinstance(outcome, BaseException):
                raise outcome  # cancelled: stop, as asked
        self.metrics.gpu_count.labels(self.cluster, node_name).set(len(readings))
        reasons = [f"{delivery.name}: {exc}" for delivery, exc in failed]
        if not labelled:
            try:
                await self._label(node, readings)
                labelled = True
            except Exception as exc:
                reasons.append(f"node labels: {type(exc).__name__}: {exc}")
        if reasons:
            left = [delivery for delivery, _ in failed]
            raise Unfinished(
                f"{where}: read {len(readings)} GPUs; not done: " + "; ".join(reasons),
                resume=lambda: self._finish(where, node, readings, left, labelled=labelled),
            )
        log.info("read GPUs", extra={"pod": where, "node": node_name, "gpus": len(readings)})

    async def _label(self, node: Obj, readings: Sequence[Reading]) -> None:
        """Write the GPU serials and chassis as labels; stale gpufleet.io labels become null."""
        wanted = node_labels_for(readings)
        current = {
            key: value
            for key, value in (meta(node, "labels") or {}).items()
            if key.startswith(LABEL_PREFIX)
        }
        patch: dict[str, str | None] = {k: v for k, v in wanted.items() if current.get(k) != v}
        patch.update({key: None for key in current if key not in wanted})
        if patch:
            await self.kube.core.patch_node(meta(node, "name"), {"metadata": {"labels": patch}})


def node_labels_for(readings: Sequence[Reading]) -> dict[str, str]:
    """``gpufleet.io/gpu-<index>: <serial>``, ``chassis`` and ``gpu-count``, valid values only.

    A value that is not a valid label value (too long, odd characters) is left
    out rather than failing the whole patch.
    """
    labels = {f"{LABEL_PREFIX}gpu-count": str(len(readings))}
    for reading in readings:
        labels[f"{LABEL_PREFIX}gpu-{reading.index}"] = reading.gpu
    chassis = sorted({r.chassis for r in readings if r.chassis})
    if len(chassis) == 1:
        labels[f"{LABEL_PREFIX}chassis"] = chassis[0]
    return {k: v for k, v in labels.items() if len(v) <= 63 and _LABEL_VALUE.match(v)}
