"""The CSI Identity service: who the plugin is, what it offers, whether it is ready.

A node-only plugin: `GetPluginCapabilities` names no service at all (no ``CONTROLLER_SERVICE``,
which GKM's driver advertised without serving it; the kubelet then never calls a controller),
and no volume accessibility constraints (the scheduler places pods by the cache's Node label,
not by CSI topology). `Probe` answers ``ready`` from a callable of the node process: false while
it is still starting (informers not synced), which the CO reads as "healthy, not ready yet".
"""

from __future__ import annotations

from collections.abc import Callable

import grpc.aio
from google.protobuf import wrappers_pb2

from gpufleet import __version__
from gpufleet.kcache.cluster import CSI_DRIVER
from gpufleet.kcache.csi.v1 import csi_pb2, csi_pb2_grpc

__all__ = ["IdentityServicer"]


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """``csi.v1.Identity``: plugin name ``csi.gkm.io``, vendor version = gpufleet's version."""

    def __init__(
        self,
        ready: Callable[[], bool],
        *,
        name: str = CSI_DRIVER,
        vendor_version: str = __version__,
    ) -> None:
        self._ready = ready
        self._name = name
        self._vendor_version = vendor_version

    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.aio.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        """The plugin's name (the CSIDriver object's) and version."""
        return csi_pb2.GetPluginInfoResponse(name=self._name, vendor_version=self._vendor_version)

    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        """None: the Node service only, volumes reachable from every node that serves them."""
        return csi_pb2.GetPluginCapabilitiesResponse()

    async def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        """Healthy; ``ready`` says whether the node process has finished starting."""
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=bool(self._ready())))
