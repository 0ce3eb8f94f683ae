"""The boto3 S3 client the exporter writes with: its timeouts, no retries, its pool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import boto3.session
from botocore.config import Config

from gpufleet.inventory.exporters.s3.settings import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["CONNECT_TIMEOUT_S", "MAX_PARALLEL_PUTS", "READ_TIMEOUT_S", "make_client"]

# Connection set-up must fail fast (an unreachable endpoint should not hold a
# delivery slot for a minute); a large put may legitimately take a while.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
# A controller batch spans many nodes; put their objects in parallel, bounded by
# the client's connection pool so threads never queue for a connection.
MAX_PARALLEL_PUTS = 8


def make_client(settings: S3Settings) -> S3Client:
    """A client of its own session for ``settings``; the pipeline, not botocore, retries."""
    addressing: Literal["auto", "path"] = "path" if settings.s3_force_path_style else "auto"
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        # The delivery pipeline retries with backoff and counts every failure;
        # botocore retrying underneath would hide outages and multiply delays.
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=MAX_PARALLEL_PUTS,
        s3={"addressing_style": addressing},
    )
    # A session of our own rather than boto3's module-level default session:
    # no hidden global, and its credential chain is resolved per exporter.
    session = boto3.session.Session(region_name=settings.s3_region)
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
