"""Where and how the S3 exporter writes (``S3_*``), and the rules of a partition pattern."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field, field_validator

from gpufleet.core.config import GpufleetSettings, HttpUrlText

__all__ = ["DEFAULT_PARTITION_PATTERN", "S3Settings", "render_partition"]

DEFAULT_PARTITION_PATTERN = "year=%Y/month=%m/day=%d/hour=%H"

# A fixed, non-padded-looking moment used only to check that a pattern renders.
_PROBE_TIME = datetime(2026, 11, 24, 23, 59, 58, tzinfo=UTC)


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
