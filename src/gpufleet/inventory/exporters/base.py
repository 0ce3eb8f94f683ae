"""The ``Exporter`` interface and the factory that builds one by name.

Like httpx's ``BaseTransport``, one small interface lets the scan, the controller
and the delivery pipeline drive any sink the same way, and lets tests swap in a
real local sink (SQLite) for a remote one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal, Protocol, get_args

from gpufleet.inventory.reading import Reading

ExporterType = Literal["stdout", "sqlite", "postgres", "s3", "http"]
EXPORTER_TYPES: tuple[str, ...] = get_args(ExporterType)

REMOTE_EXPORTERS = frozenset({"postgres", "s3", "http"})
"""Sinks across a network: they can be down, so readings reach them through the spool."""


class Exporter(Protocol):
    """A sink for inventory readings.

    An exporter may also offer lines of ordered writes: ``max_in_flight`` (an
    int) and ``line()``, which returns an object with the same ``write``. Up
    to ``max_in_flight`` writes of one line may be in flight at once; they
    must commit in the order they were called, and once one of them has
    failed, every later write of that line must store nothing and fail
    (``EarlierWriteFailed``, unless it failed for a reason of its own first).
    The delivery pipeline then sends that many batches at once, and starts a
    new line whenever it sends batches again.
    """

    name: str

    async def write(self, batch: Sequence[Reading]) -> None:
        """Write a batch; idempotent per reading id.

        Raises ``ExporterError`` when retrying may help,
        ``PermanentExporterError`` when the sink refuses this batch for good,
        and ``ExporterConfigError`` (any ``ExporterError`` of type ``config``)
        when the settings or the sink's setup are wrong: never retried.
        """
        ...

    async def health(self) -> None:
        """Check the sink is reachable and usable. Raises ``ExporterError``."""
        ...

    async def close(self) -> None:
        """Flush and release the sink."""
        ...


def make_exporter(kind: str, *, sqlite_path: Path, stdout: IO[str] | None = None) -> Exporter:
    """Build the exporter named ``kind`` (one of ``EXPORTER_TYPES``).

    Remote exporters read their own settings (``POSTGRES_*``, ``S3_*``,
    ``HTTP_*``) from the environment; an invalid one raises ``ConfigError``.
    """
    # Imported here so a process pays only for the sinks it uses.
    from gpufleet.core.config import load_settings

    if kind == "stdout":
        from gpufleet.inventory.exporters.stdout import StdoutExporter

        return StdoutExporter(stdout)
    if kind == "sqlite":
        from gpufleet.inventory.exporters.sqlite import SqliteExporter

        return SqliteExporter(sqlite_path)
    if kind == "postgres":
        from gpufleet.inventory.exporters.postgres import PostgresExporter, PostgresSettings

        return PostgresExporter(load_settings(PostgresSettings))
    if kind == "s3":
        from gpufleet.inventory.exporters.s3 import S3Exporter, S3Settings

        return S3Exporter(load_settings(S3Settings))
    if kind == "http":
        from gpufleet.inventory.exporters.http import HttpExporter, HttpSettings

        return HttpExporter(load_settings(HttpSettings))
    raise ValueError(f"unknown exporter {kind!r}; expected one of {', '.join(EXPORTER_TYPES)}")
