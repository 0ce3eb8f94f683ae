"""The inventory feature's exception hierarchy."""

from gpufleet.core.errors import GpufleetError


class InventoryError(GpufleetError):
    """Base class for inventory failures."""


class ExporterError(InventoryError):
    """An exporter could not write a batch or is not healthy."""

    def __init__(self, exporter: str, message: str) -> None:
        super().__init__(f"exporter {exporter}: {message}")
        self.exporter = exporter


class HistoryError(InventoryError):
    """A history query could not be answered (missing or foreign database)."""
