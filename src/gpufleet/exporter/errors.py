"""The GPU exporter's exception hierarchy."""

from gpufleet.core.errors import GpufleetError


class ExporterError(GpufleetError):
    """The GPU exporter could not do something it was asked to do."""


class PodResourcesError(ExporterError):
    """The kubelet PodResources API could not be read (socket missing, refused, bad reply)."""
