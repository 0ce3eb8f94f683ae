"""Inventory exporters: every sink sits behind the one ``Exporter`` interface."""

from gpufleet.inventory.exporters.base import EXPORTER_TYPES, Exporter, ExporterType, make_exporter

__all__ = ["EXPORTER_TYPES", "Exporter", "ExporterType", "make_exporter"]
