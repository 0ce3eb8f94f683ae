"""``inventory history --from postgres``: where GPUs have been, from the fleet's own database.

The same questions as ``inventory.history.History`` asks of the SQLite store,
asked of the placements table the PostgreSQL exporter keeps, with the same
answers in the same order: times in ``format_time``'s form, ties broken by the
same columns (both stores compare text byte by byte: SQLite's ``BINARY``,
PostgreSQL's ``COLLATE "C"``). Times are truncated to milliseconds before they
are ordered, as the SQLite store keeps them.

Every query reads the placements table only (one row per GPU per place, so as
big as the fleet's history of moves, not as its readings), through its indexes
(``gpu``, ``uuid``, ``machine``, ``node``, and the key for ``--moved``), in a
read-only session with a statement timeout.
"""

from __future__ import annotations

from typing import Any, Literal, LiteralString

import psycopg
from psycopg import sql

from gpufleet.core.errors import ConfigError
from gpufleet.inventory.errors import HistoryError
from gpufleet.inventory.exporters.postgres.errors import error_type, first_line
from gpufleet.inventory.exporters.postgres.schema import PLACEMENT_COLUMNS
from gpufleet.inventory.exporters.postgres.settings import PostgresSettings
from gpufleet.inventory.history import ORDER_BY_GPU_TRAIL, ORDER_BY_TIME, Placement
from gpufleet.inventory.reading import format_time

__all__ = ["STATEMENT_TIMEOUT_S", "PostgresHistory", "Question"]

STATEMENT_TIMEOUT_S = 60
"""The longest one history query may run on the server."""

_COLUMNS = ("cluster", "gpu", "uuid", "machine", "node", "first_seen", "last_seen")

Question = Literal["gpu", "machine", "node", "moved"]

# Each question: its WHERE ({table} is the placements table), how many times
# it takes the value, and its order.
_QUESTIONS: dict[str, tuple[LiteralString, int, tuple[str, ...]]] = {
    "gpu": ("WHERE gpu = %s OR uuid = %s", 2, ORDER_BY_TIME),
    "machine": ("WHERE machine = %s", 1, ORDER_BY_TIME),
    "node": ("WHERE node = %s", 1, ORDER_BY_TIME),
    "moved": (
        "WHERE (cluster, gpu) IN (SELECT cluster, gpu FROM {table}"
        " GROUP BY cluster, gpu HAVING count(DISTINCT machine) > 1)",
        0,
        ORDER_BY_GPU_TRAIL,
    ),
}


def _order(columns: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("date_trunc('milliseconds', {})").format(sql.Identifier(c))
        if c in {"first_seen", "last_seen"}
        else sql.Identifier(c)
        for c in columns
    )


class PostgresHistory:
    """Read-only queries over the placements table ``PostgresExporter`` writes."""

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self._table = sql.Identifier(settings.postgres_placements_table)
        where = f"{settings.target} table {settings.postgres_placements_table}"
        self._where = where
        kwargs = settings.connection_kwargs()
        kwargs["application_name"] = "gpufleet-history"
        kwargs["options"] = (
            f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000} -c default_transaction_read_only=on"
        )
        try:
            self._conn: psycopg.Connection[Any] = psycopg.connect(**kwargs, autocommit=True)
        except psycopg.Error as exc:
            raise self._error("cannot connect", exc) from exc
        try:
            cur = self._conn.execute(
                "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) "
                "AND a.attnum > 0 AND NOT a.attisdropped",
                [self._table.as_string(self._conn)],
            )
            found = {row[0] for row in cur.fetchall()}
        except psycopg.Error as exc:
            self._conn.close()
            raise self._error("cannot read the catalog", exc) from exc
        if not found >= PLACEMENT_COLUMNS:
            self._conn.close()
            what = "no placements table" if not found else "not a gpufleet placements table"
            raise HistoryError(f"{where}: {what} (POSTGRES_PLACEMENTS_TABLE)")

    def _error(self, doing: str, exc: BaseException) -> Exception:
        message = f"{doing} at {self._where}: {first_line(exc)}"
        if error_type(exc) == "config":
            return ConfigError(f"{message} (POSTGRES_SSLMODE={self._settings.postgres_sslmode})")
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return HistoryError(f"{message} (longer than {STATEMENT_TIMEOUT_S}s)")
        return HistoryError(message)

    def _statement(
        self, question: Question, value: str = ""
    ) -> tuple[sql.Composed, tuple[str, ...]]:
        """The query that answers ``question`` about ``value``, and its parameters."""
        where, params, order = _QUESTIONS[question]
        query = sql.SQL("SELECT {columns} FROM {table} {where} ORDER BY {order}").format(
            columns=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
            table=self._table,
            where=sql.SQL(where).format(table=self._table),
            order=_order(order),
        )
        return query, (value,) * params

    def _query(self, question: Question, value: str = "") -> list[Placement]:
        query, params = self._statement(question, value)
        try:
            rows = self._conn.execute(query, params).fetchall()
        except psycopg.Error as exc:
            raise self._error("cannot query", exc) from exc
        return [
            Placement(cluster, gpu, uuid, machine, node, format_time(first), format_time(last))
            for cluster, gpu, uuid, machine, node, first, last in rows
        ]

    def explain(self, question: Question, value: str = "") -> str:
        """The server's plan for a question (``EXPLAIN``), to check which indexes serve it."""
        query, params = self._statement(question, value)
        try:
            rows = self._conn.execute(sql.SQL("EXPLAIN ") + query, params).fetchall()
        except psycopg.Error as exc:
            raise self._error("cannot explain", exc) from exc
        return "\n".join(row[0] for row in rows)

    def gpu(self, serial_or_uuid: str) -> list[Placement]:
        """Where this GPU (by serial, or by UUID) has been, oldest first."""
        return self._query("gpu", serial_or_uuid)

    def machine(self, machine: str) -> list[Placement]:
        """Which GPUs this machine has had."""
        return self._query("machine", machine)

    def node(self, node: str) -> list[Placement]:
        """Which GPUs this node has had."""
        return self._query("node", node)

    def moved(self) -> list[Placement]:
        """Placements of every GPU seen in more than one machine (see ``History.moved``)."""
        return self._query("moved")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
