"""Readings as JSON-lines objects in S3 (or MinIO, or any on-prem S3) under deterministic keys.

One batch becomes one object per (cluster, node) in it, keyed by a hash of that
node's readings::

    <prefix>/<partition>/cluster=<c>/node=<n>/<YYYYMMDDTHHMMSS.mmmZ>-<hash16>.json[.gz]

A replayed batch is the same readings in the same order, so it overwrites
exactly the keys it wrote the first time. Modules: ``settings.py`` (``S3_*``
and the partition pattern's rules), ``objects.py`` (how a batch becomes
objects: grouping, keys, bodies), ``client.py`` (the boto3 client),
``errors.py`` (what a boto error means for delivery) and ``exporter.py``
(``S3Exporter``). boto3 comes with the ``s3`` extra; ``make_exporter``
imports this package only for ``EXPORTER_TYPE=s3``.
"""

from gpufleet.inventory.exporters.s3.exporter import S3Exporter
from gpufleet.inventory.exporters.s3.objects import object_key
from gpufleet.inventory.exporters.s3.settings import S3Settings

__all__ = ["S3Exporter", "S3Settings", "object_key"]
