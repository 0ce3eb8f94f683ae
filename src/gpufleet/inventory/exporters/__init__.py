"""Inventory exporters: every sink sits behind the one ``Exporter`` interface.

- ``base.py``: the ``Exporter`` interface and ``make_exporter``, by name;
- ``stdout.py``: JSON lines on stdout, data only;
- ``sqlite.py``: the embedded store, readings and placements;
- ``http.py``: one POST of a JSON array per batch;
- ``postgres/``: gpuid's readings table and placements (the ``postgres`` extra);
- ``s3/``: JSON-lines objects under deterministic keys (the ``s3`` extra).
"""

from gpufleet.inventory.exporters.base import EXPORTER_TYPES, Exporter, ExporterType, make_exporter

__all__ = ["EXPORTER_TYPES", "Exporter", "ExporterType", "make_exporter"]
