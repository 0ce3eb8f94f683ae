"""Local exporters (stdout, SQLite) written straight through, behind the pipeline's face.

A local sink fails at once and for a local reason, so it has no spool, no
retry and no dead-letter file; it shows the scan the same ``Delivery`` face as
the spooled ``DeliveryPipeline`` (``delivery.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from gpufleet.inventory.errors import ExporterError
from gpufleet.inventory.exporters.base import Exporter
from gpufleet.inventory.outcomes import Refusal
from gpufleet.inventory.reading import Reading
from gpufleet.inventory.spool import SpoolStats

__all__ = ["DirectDelivery"]


class DirectDelivery:
    """A local exporter (stdout, SQLite) behind the pipeline's submit/drain face.

    A local sink fails at once and for a local reason (a closed pipe, a full
    disk), so spooling its readings would only hide the failure: ``submit``
    writes straight through and raises ``ExporterError``.

    Built with ``opening()``, the exporter is opened on the first ``submit``,
    in a worker thread: an SQLite file that cannot be opened, or waits on
    another process's lock, then fails (or waits) for this exporter alone,
    while the others already have their readings.
    """

    def __init__(
        self,
        exporter: Exporter | None = None,
        *,
        name: str = "",
        open_exporter: Callable[[], Exporter] | None = None,
    ) -> None:
        if exporter is None and (open_exporter is None or not name):
            raise ValueError("DirectDelivery needs an exporter, or a name and open_exporter")
        self._exporter = exporter
        self._open = open_exporter
        self._name = exporter.name if exporter is not None else name
        self.refused: list[Refusal] = []
        self.config_error: ExporterError | None = None
        self.interrupted = False

    @classmethod
    def opening(cls, name: str, open_exporter: Callable[[], Exporter]) -> DirectDelivery:
        """A delivery to the exporter ``name`` that ``open_exporter()`` builds when first needed."""
        return cls(name=name, open_exporter=open_exporter)

    @property
    def name(self) -> str:
        """The exporter type."""
        return self._name

    async def submit(self, readings: Sequence[Reading]) -> None:
        """Write the readings now (opening the exporter first if need be)."""
        if self._exporter is None:
            assert self._open is not None
            self._exporter = await asyncio.to_thread(self._open)
        await self._exporter.write(readings)

    async def drain(self, within: float) -> bool:
        """Nothing is ever held back."""
        return True

    def stop(self) -> None:
        """Nothing runs in the background."""

    def interrupt(self) -> None:
        """Nothing runs in the background."""
        self.interrupted = True

    def stats(self) -> SpoolStats:
        """Always empty: nothing waits."""
        return SpoolStats(0, 0, 0, 0, 0)

    async def close(self) -> None:
        """Close the exporter if it was opened."""
        if self._exporter is not None:
            await self._exporter.close()
