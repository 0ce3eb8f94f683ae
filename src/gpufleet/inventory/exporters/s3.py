"""Readings as JSON-lines objects in S3 (or MinIO, or any on-prem S3) under deterministic keys.

One batch becomes one object per (cluster, node) in it, keyed by a hash of that
node's readings::

    <prefix>/<partition>/cluster=<c>/node=<n>/<YYYYMMDDTHHMMSS.mmmZ>-<hash16>.json[.gz]

The partition and the time come from the group's first ``read_time`` in UTC. A
replayed batch is the same readings in the same order, so it overwrites exactly
the keys it wrote the first time instead of adding objects (gpuid's time-only
keys collided between nodes and never deduplicated).

boto3 blocks, so every call runs in a worker thread. boto3 comes with the
``s3`` extra; ``make_exporter`` imports this module only for ``EXPORTER_TYPE=s3``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

import boto3.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import Field, field_validator

from gpufleet.core.config import GpufleetSettings, HttpUrlText
from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.reading import Reading, batch_hash

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3Exporter", "S3Settings", "object_key"]

DEFAULT_PARTITION_PATTERN = "year=%Y/month=%m/day=%d/hour=%H"

# Connection set-up must fail fast (an unreachable endpoint should not hold a
# delivery slot for a minute); a large put may legitimately take a while.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
# A controller batch spans many nodes; put their objects in parallel, bounded by
# the client's connection pool so threads never queue for a connection.
MAX_PARALLEL_PUTS = 8

# A fixed, non-padded-looking moment used only to check that a pattern renders.
_PROBE_TIME = datetime(2026, 11, 24, 23, 59, 58, tzinfo=UTC)

# Key segments keep these as they are; anything else (a `/` in a cluster name,
# spaces, `=`) is percent-encoded so one value always stays one key segment.
_SAFE_SEGMENT_CHARS = "-._~"

_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
    }
)
_CONFIG_CODES = frozenset(
    {
        "NoSuchBucket",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",  # signed for the wrong region
        "IllegalLocationConstraintException",
        "InvalidBucketName",
    }
)
_THROTTLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"})
# 4xx answers about this request's timing or transport, not its content:
# the same put can succeed later.
_TRANSIENT_CODES = frozenset(
    {"IncompleteBody", "OperationAborted", "RequestTimeTooSkewed", "TooManyRequests"}
)
# 4xx statuses S3 gives a put whose key, body or headers it will never take
# (KeyTooLongError, InvalidArgument, EntityTooLarge, InvalidDigest, BadDigest,
# MalformedXML, MetadataTooLarge, InvalidRequest, MissingContentLength...).
_PERMANENT_STATUSES = frozenset({400, 411, 413, 414})


class S3Settings(GpufleetSettings):
    """Where and how the S3 exporter writes (``S3_*``).

    Credentials are deliberately not settings: boto3's standard chain (the
    ``AWS_*`` variables, profiles, instance roles, IRSA) finds them, so they
    never pass through our configuration or our logs.
    """

    s3_bucket: str = Field(description="the bucket to write to (required)")
    s3_prefix: str = Field(default="", description="key prefix; surrounding slashes are dropped")
    s3_region: str | None = Field(default=None, description="region; default: the AWS chain's")
    s3_partition_pattern: str = Field(
        default=DEFAULT_PARTITION_PATTERN,
        description="strftime pattern of the partition path, rendered in UTC",
    )
    s3_endpoint_url: HttpUrlText | None = Field(
        default=None, description="custom endpoint (MinIO, on-prem), http:// or https://"
    )
    s3_force_path_style: bool = Field(
        default=False, description="address buckets as /<bucket>/<key> on the endpoint host"
    )
    s3_compress: Literal["none", "gzip"] = Field(default="none", description="none or gzip")

    @field_validator("s3_bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        value = value.strip()
        if not value or "/" in value or any(ch.isspace() for ch in value):
            raise ValueError("expected a bucket name without slashes or spaces")
        return value

    @field_validator("s3_prefix")
    @classmethod
    def _strip_prefix(cls, value: str) -> str:
        value = value.strip().strip("/")
        if ".." in value.split("/"):
            raise ValueError("must not contain '..' segments")
        return value

    @field_validator("s3_region")
    @classmethod
    def _empty_region_is_none(cls, value: str | None) -> str | None:
        # `S3_REGION=` in a manifest means "not set", not a region named "".
        if value is None or not value.strip():
            return None
        return value.strip()

    @field_validator("s3_partition_pattern")
    @classmethod
    def _check_partition_pattern(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        render_partition(value, _PROBE_TIME)
        return value

    @field_validator("s3_endpoint_url", mode="before")
    @classmethod
    def _empty_endpoint_is_none(cls, value: object) -> object:
        # `S3_ENDPOINT_URL=` in a manifest means "the AWS endpoint", not a URL "".
        if isinstance(value, str) and not value.strip():
            return None
        return value


def render_partition(pattern: str, at: datetime) -> str:
    """Render ``pattern`` with strftime at ``at`` in UTC, refusing paths that escape.

    Raises ValueError (a message fit for ``S3_PARTITION_PATTERN``) when the
    pattern does not render, starts with ``/``, has an empty, ``.`` or ``..``
    segment, or leaves a ``%`` behind (an unknown strftime code).
    """
    if pattern.startswith("/"):
        raise ValueError("must not start with '/'")
    if not pattern:
        return ""
    try:
        rendered = at.astimezone(UTC).strftime(pattern)
    except ValueError as exc:
        raise ValueError(f"does not render with strftime: {exc}") from None
    if "%" in rendered:
        raise ValueError("has an unknown strftime code (a '%' is left after rendering)")
    if rendered.startswith("/"):
        raise ValueError("must not render to a path starting with '/'")
    for segment in rendered.split("/"):
        if segment in {"", ".", ".."} or ".." in segment:
            raise ValueError(f"renders to a path with a bad segment {segment!r}")
    return rendered


def _compact_time(at: datetime) -> str:
    utc = at.astimezone(UTC)
    return utc.strftime("%Y%m%dT%H%M%S.") + f"{utc.microsecond // 1000:03d}Z"


def _segment(value: str) -> str:
    return quote(value, safe=_SAFE_SEGMENT_CHARS)


def object_key(settings: S3Settings, group: Sequence[Reading]) -> str:
    """The key of the object holding ``group``: readings of one (cluster, node).

    Deterministic: the same readings in the same order always give the same key.
    """
    if not group:
        raise ValueError("an object holds at least one reading")
    first = group[0]
    name = f"{_compact_time(first.read_time)}-{batch_hash(group)[:16]}.json"
    if settings.s3_compress == "gzip":
        name += ".gz"
    parts = [
        settings.s3_prefix,
        render_partition(settings.s3_partition_pattern, first.read_time),
        f"cluster={_segment(first.cluster)}",
        f"node={_segment(first.node)}",
        name,
    ]
    return "/".join(part for part in parts if part)


def group_by_node(batch: Sequence[Reading]) -> list[list[Reading]]:
    """Split a batch into per-(cluster, node) groups, keeping first-seen and reading order."""
    groups: dict[tuple[str, str], list[Reading]] = {}
    for reading in batch:
        groups.setdefault((reading.cluster, reading.node), []).append(reading)
    return list(groups.values())


def encode_body(group: Sequence[Reading], compress: Literal["none", "gzip"]) -> bytes:
    """JSON lines of ``to_dict()``; gzip with a zero mtime so replays are byte-identical."""
    text = "".join(json.dumps(r.to_dict(), separators=(",", ":")) + "\n" for r in group)
    data = text.encode()
    return gzip.compress(data, mtime=0) if compress == "gzip" else data


def _make_client(settings: S3Settings) -> S3Client:
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
                client = _make_client(settings)
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
            code, status = _client_error_code(exc)
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


def _client_error_code(exc: BaseException) -> tuple[str, int | None]:
    """The S3 error code and HTTP status of a botocore ClientError, else ("", None)."""
    if not isinstance(exc, ClientError):
        return "", None
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code", "")), status


_WHITESPACE = re.compile(r"\s+")


REJECTED = "rejected"
"""The ``error_type`` of a put S3 refuses for its content: a ``PermanentExporterError``."""


def classify(exc: BaseException) -> tuple[str, str]:
    """An ``ExporterError.error_type`` and a one-line, credential-free detail for a boto error.

    ``rejected`` (``REJECTED``) means S3 will never take this put.
    """
    if isinstance(exc, ClientError):
        code, status = _client_error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        # Built from code and message only: S3's full error body can echo the
        # string-to-sign and access key id, which have no place in our logs.
        detail = _WHITESPACE.sub(" ", f"{code or status} {message}").strip()[:200]
        if code in _AUTH_CODES or status in {401, 403}:
            return "auth", detail
        if code in _CONFIG_CODES or status in {301, 404}:
            return "config", detail
        if code in _THROTTLE_CODES or (status is not None and status >= 500):
            return "server", detail
        if code in _TRANSIENT_CODES:
            return "other", detail
        if status in _PERMANENT_STATUSES:
            return REJECTED, detail
        return "other", detail
    if isinstance(exc, ReadTimeoutError):
        return "timeout", f"no response within {READ_TIMEOUT_S:g}s"
    if isinstance(exc, ConnectTimeoutError):
        return "connection", f"no connection within {CONNECT_TIMEOUT_S:g}s"
    if isinstance(exc, EndpointConnectionError | BotoConnectionError | ConnectionClosedError):
        # botocore's own text repeats the full URL the caller already names; the
        # underlying socket error ("Connection refused") is what says something.
        cause = getattr(exc, "kwargs", {}).get("error") or exc
        text = str(cause)
        if text.startswith("AWSHTTP"):  # "AWSHTTPConnection(host=..., port=...): <reason>"
            text = text.split("): ", 1)[-1]
        return "connection", _WHITESPACE.sub(" ", text)[:300]
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "auth", f"no usable AWS credentials in the standard chain ({type(exc).__name__})"
    return "other", _WHITESPACE.sub(" ", f"{type(exc).__name__}: {exc}")[:300]
