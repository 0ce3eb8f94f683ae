"""Check mode (gpuid's "pod monitor"): run a command in each pod, log it, maybe restart.

The command is a shell script (``sh -c COMMAND``): unlike the inventory read,
the user writes it, and pipes and tests are the point. With ``FORCE_RESTART``
a pod whose command fails is deleted, so its owner (the device-plugin
DaemonSet) recreates it.
"""

from __future__ import annotations

import logging
from typing import Any

from gpufleet.inventory.podwork import ControllerMetrics, Obj, meta
from gpufleet.kube.exec import exec_command

log = logging.getLogger(__name__)

_OUTPUT_CHARS = 4096


class CheckProcessor:
    """Runs ``COMMAND`` in ``CONTAINER`` and logs one structured record per pod."""

    def __init__(
        self,
        kube: Any,
        *,
        container: str,
        command: str,
        timeout: float,
        force_restart: bool,
        metrics: ControllerMetrics,
    ) -> None:
        self.kube = kube
        self.container = container
        self.argv = ["sh", "-c", command]
        self.timeout = timeout
        self.force_restart = force_restart
        self.metrics = metrics

    async def process(self, pod: Obj, node: Obj) -> None:
        """Run the check; a failing check is a result, an exec error is retried."""
        namespace, name = str(meta(pod, "namespace")), str(meta(pod, "name"))
        with self.metrics.exec_duration.time():
            result = await exec_command(
                self.kube, namespace, name, self.container, self.argv, timeout=self.timeout
            )
        record = {
            "pod": f"{namespace}/{name}",
            "uid": meta(pod, "uid"),
            "node": meta(node, "name"),
            "container": self.container,
            "exit_code": result.exit_code,
            "stdout": result.stdout.decode(errors="replace")[-_OUTPUT_CHARS:],
            "stderr": result.stderr.decode(errors="replace")[-_OUTPUT_CHARS:],
        }
        if result.exit_code == 0:
            log.info("check passed", extra=record)
            return
        log.warning("check failed", extra={**record, "force_restart": self.force_restart})
        if self.force_restart:
            await self.kube.core.delete_namespaced_pod(name, namespace)
            log.warning("deleted pod so that its owner recreates it", extra=record)
