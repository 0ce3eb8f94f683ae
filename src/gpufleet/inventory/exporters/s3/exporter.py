"""``S3Exporter``: each batch as one JSON-lines object per (cluster, node), put in parallel.

boto3 blocks, so every call runs in a worker thread. Keys and bodies come
from ``objects.py``; what a failed put means, from ``errors.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.s3.client import MAX_PARALLEL_PUTS, make_client
from gpufleet.inventory.exporters.s3.errors import REJECTED, classify, client_error_code
from gpufleet.inventory.exporters.s3.objects import encode_body, group_by_node, object_key
from gpufleet.inventory.exporters.s3.settings import S3Settings
from gpufleet.inventory.reading import Reading

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3Exporter"]


class S3Exporter:
    """Writes each batch as one JSON-lines object per (cluster, node) under deterministic keys.

    ``client`` may be given (a preconfigured boto3 S3 client); it then belongs to
    the caller and ``close()`` leaves it open. A put S3 refuses for its own
    content (a 400 such as ``KeyTooLongError`` or ``InvalidArgument``: a node
    name that makes the key too long, say) is a ``PermanentExporterError``, so
    the batch goes to the dead-letter file. Refusals an operator fixes (bucket,
    policy, credentials, region: 403 ``AccessDenied`` among them) stay
    retryable ``ExporterError``s, so the batch waits in the spool; if they hit
    this batch alone (a policy denying one prefix), the pipeline's retry limits
    move it aside once the batch behind it is taken.
    """

    name = "s3"

    def __init__(self, settings: S3Settings, *, client: S3Client | None = None) -> None:
        self.settings = settings
        self._owns_client = client is None
        if client is None:
            try:
                client = make_client(settings)
            except (BotoCoreError, ValueError) as exc:  # a malformed endpoint or region
                raise ExporterError(
                    self.name, f"bad client settings: {exc}", error_type="config"
                ) from exc
        self.client: S3Client = client
        """The boto3 S3 client (its ``meta.events`` accept hooks, e.g. for tracing)."""

    @property
    def endpoint(self) -> str:
        """The endpoint URL requests go to (the custom one, or AWS's regional one)."""
        return str(self.client.meta.endpoint_url)

    async def write(self, batch: Sequence[Reading]) -> None:
        """Put one object per (cluster, node) in ``batch``; a replay overwrites the same keys.

        Raises ``ExporterError`` naming the bucket, endpoint and key of the first
        failed put (and how many failed) when any put fails.
        """
        groups = group_by_node(batch)
        if not groups:
            return
        limit = asyncio.Semaphore(MAX_PARALLEL_PUTS)

        async def put(group: list[Reading]) -> None:
            async with limit:
                await asyncio.to_thread(self._put, group)

        results = await asyncio.gather(*(put(g) for g in groups), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            return
        first = failures[0]
        if not isinstance(first, ExporterError):
            raise first
        # Refused for good only if every failed put was: otherwise a retry may
        # still deliver the rest, and the same keys are overwritten.
        permanent = all(isinstance(f, PermanentExporterError) for f in failures)
        if len(failures) > 1:
            message = (
                f"{len(failures)} of {len(groups)} objects failed; first: "
                f"{str(first).removeprefix(f'exporter {self.name}: ')}"
            )
            if permanent:
                raise PermanentExporterError(self.name, message) from first
            error_type = "other" if first.error_type == "rejected" else first.error_type
            raise ExporterError(self.name, message, error_type=error_type) from first
        raise first

    def _put(self, group: list[Reading]) -> None:
        key = object_key(self.settings, group)
        body = encode_body(group, self.settings.s3_compress)
        where = f"s3://{self.settings.s3_bucket}/{key} at {self.endpoint}"
        try:
            if self.settings.s3_compress == "gzip":
                self.client.put_object(
                    Bucket=self.settings.s3_bucket, Key=key, Body=body,
                    ContentType="application/x-ndjson", ContentEncoding="gzip",
                )  # fmt: skip
            else:
                self.client.put_object(
                    Bucket=self.settings.s3_bucket, Key=key, Body=body,
                    ContentType="application/x-ndjson",
                )  # fmt: skip
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"cannot put {where}", exc) from exc

    async def health(self) -> None:
        """HeadBucket: the bucket exists at the endpoint and our credentials may use it."""
        await asyncio.to_thread(self._head_bucket)

    def _head_bucket(self) -> None:
        bucket = self.settings.s3_bucket
        try:
            self.client.head_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as exc:
            code, status = client_error_code(exc)
            # HeadBucket has no body, so S3 says only "404" or "403": spell it out.
            if status == 404 or code in {"404", "NoSuchBucket"}:
                raise ExporterError(
                    self.name, f"bucket '{bucket}' does not exist at {self.endpoint}",
                    error_type="config",
                ) from exc  # fmt: skip
            if status == 403 or code == "403":
                raise ExporterError(
                    self.name,
                    f"access to bucket '{bucket}' at {self.endpoint} is denied "
                    "(check the AWS credentials and the bucket policy)",
                    error_type="auth",
                ) from exc
            if status == 301 or code == "301":
                raise ExporterError(
                    self.name, f"bucket '{bucket}' is in another region than {self.endpoint}",
                    error_type="config",
                ) from exc  # fmt: skip
            raise self._error(f"cannot reach bucket '{bucket}' at {self.endpoint}", exc) from exc

    def _error(self, context: str, exc: Exception) -> ExporterError:
        error_type, detail = classify(exc)
        if error_type == REJECTED:
            return PermanentExporterError(self.name, f"{context}: {detail}")
        return ExporterError(self.name, f"{context}: {detail}", error_type=error_type)

    async def close(self) -> None:
        """Close the connection pool of a client we created; later writes reconnect."""
        if self._owns_client:
            await asyncio.to_thread(self.client.close)
