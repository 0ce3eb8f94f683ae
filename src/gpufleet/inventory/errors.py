"""The inventory feature's exception hierarchy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gpufleet.core.errors import GpufleetError

if TYPE_CHECKING:
    from gpufleet.inventory.reading import Reading


class InventoryError(GpufleetError):
    """Base class for inventory failures."""


class ExporterError(InventoryError):
    """An exporter could not write a batch or is not healthy; retrying may help.

    ``error_type`` is a short, low-cardinality word for metrics labels:
    ``connection``, ``timeout``, ``server``, ``auth``, ``rejected``, ``config`` or
    ``other``.
    """

    def __init__(self, exporter: str, message: str, *, error_type: str = "other") -> None:
        super().__init__(f"exporter {exporter}: {message}")
        self.exporter = exporter
        self.error_type = error_type

    @property
    def is_config(self) -> bool:
        """The exporter's settings or its sink's setup are wrong (``error_type`` ``config``).

        A missing bucket or database, a table of another layout, a redirecting
        endpoint: the same write fails the same way until an operator changes
        something, so the delivery pipeline never retries it. This is the one
        place that decides it; exporters only say ``error_type="config"``.
        """
        return self.error_type == CONFIG


CONFIG = "config"
"""The ``error_type`` of a configuration error: never retried."""


class ExporterConfigError(ExporterError):
    """An ``ExporterError`` of type ``config``: fix the settings or the sink, then restart."""

    def __init__(self, exporter: str, message: str) -> None:
        super().__init__(exporter, message, error_type=CONFIG)


class PermanentExporterError(ExporterError):
    """The sink refused this batch for good (an HTTP 4xx, say): retrying cannot help.

    The delivery pipeline moves such a batch to the dead-letter file with the
    reason, instead of blocking every later batch behind it. ``refused`` names
    the readings refused when the sink took the rest of the batch (an HTTP 413
    split down to single readings); ``None`` means the whole batch.
    """

    def __init__(
        self,
        exporter: str,
        message: str,
        *,
        error_type: str = "rejected",
        refused: Sequence[Reading] | None = None,
    ) -> None:
        super().__init__(exporter, message, error_type=error_type)
        self.refused: tuple[Reading, ...] | None = None if refused is None else tuple(refused)


class EarlierWriteFailed(ExporterError):
    """A batch was not committed because the one written before it, still in flight, failed.

    Exporters that take several batches at once (``max_in_flight`` > 1)
    commit them in the order their ``write`` calls started, and raise this for
    every batch behind a failed one: nothing of it was stored, and it is sent
    again after the earlier batch.
    """

    def __init__(self, exporter: str, message: str) -> None:
        super().__init__(exporter, message, error_type="aborted")


class HistoryError(InventoryError):
    """A history query could not be answered (missing or foreign database)."""
