"""Which GPU a Dynamic Resource Allocation device is, from this node's ResourceSlices.

A DRA claim names each device it was allocated as (driver, pool, device), for
NVIDIA's driver ``("gpu.nvidia.com", "<node name>", "gpu-0")`` or a MIG device
such as ``"gpu-0-mig-9-4-2"``. The kubelet's PodResources API reports exactly
that triple and nothing more. The GPU or MIG UUID that NVML knows is published
by the DRA driver in the cluster-scoped ``ResourceSlice`` objects of the node,
as the device attribute ``uuid`` (or ``<driver>/uuid``, the same attribute
qualified with the driver's domain).

`ResourceSliceIndex` maps (driver, pool, device) to that UUID. It is fed by an
informer over this node's slices (``fieldSelector=spec.nodeName=<node>``),
which `ResourceSliceWatch` runs against the newest API version the server
serves: ``resource.k8s.io/v1`` (Kubernetes 1.34+), else ``v1beta2`` (1.33),
else ``v1beta1`` (1.32). In ``v1`` and ``v1beta2`` a device's attributes are
at ``spec.devices[].attributes``; in ``v1beta1`` they are one level down, at
``spec.devices[].basic.attributes``. Both are read whatever the version says.

Device names are the driver's own and opaque here: nothing parses them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kubernetes_asyncio.client import ResourceV1Api, ResourceV1beta1Api, ResourceV1beta2Api
from kubernetes_asyncio.client.exceptions import ApiException

from gpufleet.core.retry import Backoff
from gpufleet.exporter.podmap.draindex import DraDevice, ResourceSliceIndex, slice_devices
from gpufleet.kube.client import api_status, call_json
from gpufleet.kube.watch import Informer

__all__ = [
    "RESOURCE_API_VERSIONS",
    "DraDevice",
    "ResourceSliceIndex",
    "ResourceSliceWatch",
    "resource_slice_listers",
    "slice_devices",
]

log = logging.getLogger(__name__)

RESOURCE_API_VERSIONS = ("v1", "v1beta2", "v1beta1")
"""The ``resource.k8s.io`` versions that serve ResourceSlices, most preferred first."""

ListFunc = Callable[..., Awaitable[Any]]
"""A generated ``list_resource_slice`` method."""


def resource_slice_listers(api_client: Any) -> dict[str, ListFunc]:
    """``list_resource_slice`` of every version in `RESOURCE_API_VERSIONS`, over one API client."""
    apis: dict[str, Any] = {
        "v1": ResourceV1Api(api_client),
        "v1beta2": ResourceV1beta2Api(api_client),
        "v1beta1": ResourceV1beta1Api(api_client),
    }
    return {version: apis[version].list_resource_slice for version in RESOURCE_API_VERSIONS}


class ResourceSliceWatch:
    """Find the ResourceSlice version the server serves, then keep `index` current.

    `listers` maps a version to its ``list_resource_slice`` (see
    `resource_slice_listers`), in order of preference. `run` lists each in
    turn, once, with this node's field selector: a 404 means the version is not
    served. The first that answers is watched by an `Informer` limited to this
    node's slices. When none is served, DRA attribution is off (one info line)
    until a later check, every `rediscover` seconds, finds one: a cluster may
    enable the DRA API while the exporter runs. Any other failure (403
    without the RBAC rule, the API server unreachable) is logged once per
    distinct status and retried with backoff, since it says nothing about what
    the server serves. The version found is kept for the life of the process.
    """

    def __init__(
        self,
        listers: Mapping[str, ListFunc],
        index: ResourceSliceIndex,
        *,
        node_name: str,
        backoff: Backoff | None = None,
        request_timeout: float = 60.0,
        rediscover: float = 600.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if rediscover <= 0:
            raise ValueError(f"rediscover must be > 0 seconds, got {rediscover!r}")
        self._listers = dict(listers)
        self._rediscover = rediscover
        self.index = index
        self._field_selector = f"spec.nodeName={node_name}"
        self._backoff = backoff if backoff is not None else Backoff()
        self._request_timeout = request_timeout
        self._sleep = sleep
        self._rand = rand
        self._stopping = False
        self.version: str | None = None
        """The version being watched; None before it is known, and when none is served."""
        self.informer: Informer | None = None
        self.decided = asyncio.Event()
        """Set once the served version (or that none is served) is known."""

    async def run(self) -> None:
        """Pick the version, then run the informer until `stop()` or cancellation."""
        while True:
            version = await self._choose_version()
            self.version = version
            first = not self.decided.is_set()
            self.decided.set()
            if version is not None or self._stopping:
                break
            if first:
                log.info(
                    "no resource.k8s.io version serves ResourceSlices: "
                    "GPUs allocated through DRA are not attributed to pods",
                    extra={"tried": list(self._listers), "checking_every_s": self._rediscover},
                )
            await self._sleep(self._rediscover)
            if self._stopping:
                return
        if self._stopping or version is None:
            return
        informer = Informer(self._listers[version], field_selector=self._field_selector)
        informer.add_handlers(
            on_add=self.index.on_add, on_update=self.index.on_update, on_delete=self.index.on_delete
        )
        self.informer = informer
        log.info(
            "watching ResourceSlices for DRA attribution",
            extra={"api_version": f"resource.k8s.io/{version}", "selector": self._field_selector},
        )
        await informer.run()

    async def stop(self) -> None:
        """End `run()`'s informer; a `run()` still choosing the version ends before watching."""
        self._stopping = True
        if self.informer is not None:
            await self.informer.stop()

    async def _choose_version(self) -> str | None:
        attempt = 0
        reported: object = None
        while True:
            try:
                return await self._first_served()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status = api_status(exc)
                what = status if status is not None else type(exc).__name__
                if what != reported:
                    reported = what
                    log.warning(
                        "cannot tell which ResourceSlice version is served, retrying",
                        extra={"error": f"{type(exc).__name__}: {exc}", "status": status},
                    )
            await self._sleep(self._backoff.delay(attempt, self._rand))
            attempt += 1

    async def _first_served(self) -> str | None:
        for version, list_func in self._listers.items():
            try:
                await call_json(
                    list_func,
                    field_selector=self._field_selector,
                    limit=1,
                    _request_timeout=self._request_timeout,
                )
            except ApiException as exc:
                if api_status(exc) == 404:
                    continue
                raise
            return version
        return None
