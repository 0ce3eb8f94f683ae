"""Reading a registry's answers within bounds: of size, of encoding and of time.

A hostile or broken registry may send an endless error body, a compression
bomb, or a body one byte at a time. What is read whole here (error, 401 and
token bodies) is read raw and cut at `MAX_ERROR_BODY`; a streamed body checks
the client's overall deadline after every socket read (`DeadlineStream`).
See docs/kcache-oci.md and docs/limits.md.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator

import httpx

__all__ = ["MAX_ERROR_BODY", "DeadlineStream", "error_detail", "read_small", "small_body"]

# Error, 401 and token bodies: read this much at most, whatever the peer sends.
MAX_ERROR_BODY = 64 * 1024


def _decoded(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` decoded per its ``Content-Encoding``, never to more than `limit` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw[:limit]
    if encoding not in ("gzip", "deflate"):
        return b""
    try:
        # 32 + 15: a gzip or a zlib header, whichever it is; max_length bounds a bomb.
        return zlib.decompressobj(47).decompress(raw, limit)
    except zlib.error:
        return b""


def small_body(response: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
    """At most `limit` bytes of `response`'s body; the response is closed after.

    A body still on the wire is read raw, so a compressed one cannot expand past
    `limit` either; what does not arrive in one piece is simply cut off.
    """
    try:
        return response.content[:limit]
    except httpx.ResponseNotRead:
        pass
    raw = bytearray()
    try:
        for chunk in response.iter_raw():
            raw += chunk
            if len(raw) >= limit:
                break
    except httpx.HTTPError:
        pass  # what arrived is all the detail there is
    finally:
        response.close()
    return _decoded(bytes(raw[:limit]), response.headers.get("Content-Encoding", ""), limit)


def read_small(response: httpx.Response) -> httpx.Response:
    """`response` with at most `MAX_ERROR_BODY` of its body read, and closed."""
    body = small_body(response)
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=body, request=response.request
    )


def error_detail(response: httpx.Response) -> str:
    """The registry's ``errors[0]`` code and message, or the HTTP status."""
    detail = f"HTTP {response.status_code}"
    if response.is_redirect:
        return f"{detail}, a redirect, which is not followed here"
    try:
        errors = json.loads(small_body(response)).get("errors")
        first = errors[0]
        return f"{detail} {first.get('code', '?')}: {first.get('message', '')}".rstrip(": ")
    except (ValueError, AttributeError, LookupError, TypeError, RecursionError):
        return detail


class DeadlineStream(httpx.SyncByteStream):
    """A response body that calls `check` after every read from the socket.

    httpx's timeout is per read, so a peer that trickles a byte at a time never
    trips it; `check` raises once the client's overall deadline has passed.
    """

    def __init__(self, inner: httpx.SyncByteStream, check: Callable[[], object]) -> None:
        self._inner = inner
        self._check = check

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._check()
            yield chunk

    def close(self) -> None:
        """Close the body underneath."""
        self._inner.close()
