"""Answers "where has this GPU been" from a store's placements.

``History`` reads the SQLite store; ``exporters.postgres.history.PostgresHistory``
asks the PostgreSQL exporter's tables the same questions. Both give the same
rows in the same order for the same readings (see ``ORDER_BY_TIME``).
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from gpufleet.inventory.errors import HistoryError

_COLUMNS = "cluster, gpu, uuid, machine, node, first_seen, last_seen"

ORDER_BY_TIME = ("first_seen", "gpu", "uuid", "machine", "node", "cluster")
"""The order of ``--gpu``, ``--machine`` and ``--node`` answers: oldest placement first.

It names every key column, so no two placements tie and every store answers
in the same order.
"""
ORDER_BY_GPU_TRAIL = ("cluster", "gpu", "uuid", "first_seen", "machine", "node")
"""The order of ``--moved``: each GPU's trail together, oldest placement first."""


@dataclass(frozen=True, slots=True)
class Placement:
    """One GPU seen in one machine (and node) between two times."""

    cluster: str
    gpu: str
    uuid: str
    machine: str
    node: str
    first_seen: str
    last_seen: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape."""
        return asdict(self)


class PlacementStore(Protocol):
    """What ``inventory history`` asks of a store."""

    def gpu(self, serial_or_uuid: str) -> list[Placement]:
        """Where this GPU (by serial, or by UUID) has been, oldest first."""

    def machine(self, machine: str) -> list[Placement]:
        """Which GPUs this machine has had."""

    def node(self, node: str) -> list[Placement]:
        """Which GPUs this node has had."""

    def moved(self) -> list[Placement]:
        """Placements of every GPU seen in more than one machine."""

    def close(self) -> None:
        """Release the store."""


class History:
    """Read-only queries over an inventory database written by ``SqliteExporter``."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise HistoryError(f"no inventory database at {path}")
        try:
            self._conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            tables = {
                row[0]
                for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"{path} is not an inventory database: {exc}") from exc
        if "placements" not in tables:
            self._conn.close()
            raise HistoryError(f"{path} has no placements table; is it a gpufleet inventory?")

    def _query(
        self, where: str, params: tuple[str, ...], order: tuple[str, ...] = ORDER_BY_TIME
    ) -> list[Placement]:
        sql = f"SELECT {_COLUMNS} FROM placements {where} ORDER BY {', '.join(order)}"
        return [Placement(*row) for row in self._conn.execute(sql, params)]

    def gpu(self, serial_or_uuid: str) -> list[Placement]:
        """Where this GPU (by serial, or by UUID) has been, oldest first."""
        return self._query("WHERE gpu = ? OR uuid = ?", (serial_or_uuid, serial_or_uuid))

    def machine(self, machine: str) -> list[Placement]:
        """Which GPUs this machine has had."""
        return self._query("WHERE machine = ?", (machine,))

    def node(self, node: str) -> list[Placement]:
        """Which GPUs this node has had."""
        return self._query("WHERE node = ?", (node,))

    def moved(self) -> list[Placement]:
        """Placements of every GPU seen in more than one machine.

        A GPU is its board serial within a cluster; the UUID is not used to group,
        so both dies of a moved GB200 board count as one moved GPU.
        """
        return self._query(
            "WHERE (cluster, gpu) IN (SELECT cluster, gpu FROM placements"
            " GROUP BY cluster, gpu HAVING COUNT(DISTINCT machine) > 1)",
            (),
            order=ORDER_BY_GPU_TRAIL,
        )

    def close(self) -> None:
        """Close the database."""
        self._conn.close()
