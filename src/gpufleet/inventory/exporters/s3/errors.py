"""What a boto error means for delivery: an ``error_type``, and a line fit for logs.

S3 refusing a put for its own content (``REJECTED``) is the only failure that
dead-letters a batch; refusals an operator fixes (bucket, policy, credentials,
region) and anything transient stay retryable.
"""

from __future__ import annotations

import re

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from gpufleet.inventory.exporters.s3.client import CONNECT_TIMEOUT_S, READ_TIMEOUT_S

__all__ = ["REJECTED", "classify", "client_error_code"]

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


def client_error_code(exc: BaseException) -> tuple[str, int | None]:
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
        code, status = client_error_code(exc)
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
