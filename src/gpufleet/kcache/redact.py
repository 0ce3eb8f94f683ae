"""What of a registry conversation may reach a log: URLs without queries, no auth values.

An upload's query holds its ``_state`` token, a presigned storage URL its
signature, an ``Authorization`` header a password or a token. The registry
client logs through `loggable_url`; importing this module also puts a filter on
httpx's and httpcore's loggers that strips the same things from their lines.
See docs/kcache-oci.md.
"""

from __future__ import annotations

import logging
import re

import httpx

__all__ = ["loggable_url"]


def loggable_url(url: httpx.URL | str) -> str:
    """`url` without its query, fragment or user info: what a log line may show of it.

    An upload's query holds its ``_state`` token, a presigned storage URL its
    signature; neither may reach a log.
    """
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{parsed.path}"


# httpx logs whole request URLs (at info) and httpcore response headers such as an upload
# Location (at debug). core.logging holds both at warning; should anyone lower them, a
# filter on their loggers still strips every query and auth header value from the line.
_QUERY = re.compile(r"\?[^\s'\"<>]*")
_AUTH_VALUE = re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9._~+/=-]+")
_LIBRARY_LOGGERS = (
    "httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy",
    "httpcore.socks",
)  # fmt: skip


class _ScrubSecrets(logging.Filter):
    """Rewrite a library's record without URL queries or Authorization values."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Strip the record's message; keep the record."""
        message = record.getMessage()
        record.msg = _AUTH_VALUE.sub(r"\1 <redacted>", _QUERY.sub("", message))
        record.args = None
        return True


def _scrub_library_logs() -> None:
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ScrubSecrets) for f in logger.filters):
            logger.addFilter(_ScrubSecrets())


_scrub_library_logs()
