"""The PostgreSQL sink: gpuid's readings table, plus where each GPU has been.

The tables mirror the SQLite store (``exporters/sqlite.py``): ``readings`` keeps
every observation once, unique on its id (a function of the identifying
fields), and ``placements`` keeps one row per GPU per machine and node with its
first and last sighting. A batch is one transaction: ``COPY`` into a temporary
table, then ``INSERT … ON CONFLICT DO NOTHING`` into the readings and an upsert
of the placements from the same rows. See docs/postgres-exporter.md.

Connection parameters travel as keyword arguments and table names as
``psycopg.sql.Identifier``; nothing the user configures is ever pasted into
SQL or into a DSN string.

- ``exporter.py``: ``PostgresExporter``, the pool, a batch's split and transactions;
- ``schema.py``: the tables and the statements that write a batch;
- ``migration.py``: the tables made ready before the first batch, with ``gpuid.py``
  taking over gpuid's own table in place;
- ``ordering.py``: overlapping writes that commit in the order they were called;
- ``errors.py``: what a psycopg failure means, and how it is said;
- ``settings.py``: the ``POSTGRES_*`` settings;
- ``history.py``: ``inventory history --from postgres``.
"""

from gpufleet.inventory.exporters.postgres.exporter import PostgresExporter
from gpufleet.inventory.exporters.postgres.schema import SCHEMA_VERSION
from gpufleet.inventory.exporters.postgres.settings import PostgresSettings, SslMode

__all__ = ["SCHEMA_VERSION", "PostgresExporter", "PostgresSettings", "SslMode"]
