"""Readings POSTed as a JSON array to an HTTP endpoint, one request per batch.

The exporter only *classifies* failures; the delivery pipeline does the retrying
(with backoff) and dead-letters what is permanent:

- 2xx: delivered.
- 5xx, 429, 408, 409, timeouts, refused or dropped connections: ``ExporterError``
  (retryable). 409 is what an Idempotency-Key server answers while the first
  copy of a request is still being processed, so trying again later is right.
- 401 and 403: ``ExporterError(error_type="auth")``, retryable, because a rotated
  token or a fixed policy makes the very same batch acceptable; dead-lettering
  every batch during a credentials incident would lose the whole outage.
- 3xx: ``ExporterConfigError``. Redirects are not followed, since
  clients turn a redirected POST into a GET and would report success for data
  that never arrived; the endpoint setting needs fixing, not the batch.
- 404 and 405: ``ExporterConfigError`` too. No such resource, or one that takes
  no POST, says ``HTTP_ENDPOINT`` is wrong, whatever the batch.
  A configuration error is never retried (see ``ExporterError.is_config``).
- 413 (the receiver's body limit): the batch is split in two and each half is
  POSTed (in order, each with its own Idempotency-Key), down to single
  readings. A reading still too large alone is refused for good; the rest
  of the batch is delivered, and ``PermanentExporterError.refused`` names the
  refused readings, so only they go to the dead-letter file. The halves of a
  batch are always the same, so a replay sends the same keys again.
- any other 4xx: ``PermanentExporterError``. The server read this batch and
  refused it; sending the same bytes again cannot help.

Every request carries ``Idempotency-Key: <batch_hash(batch)>``, identical on a
replay, so a receiver can drop the duplicates a retry after a lost response makes.
"""

from __future__ import annotations

import contextlib
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from pydantic import Field, SecretStr, field_validator

from gpufleet import __version__
from gpufleet.core.config import Duration, GpufleetSettings, HttpUrlText
from gpufleet.inventory.errors import ExporterConfigError, ExporterError, PermanentExporterError
from gpufleet.inventory.reading import Reading, batch_hash

__all__ = ["HttpExporter", "HttpSettings"]

# Enough of an error body to see what the server said, not enough to flood a log line.
BODY_EXCERPT_CHARS = 200
_BODY_READ_BYTES = 4096
_WHITESPACE = re.compile(r"\s+")

# 4xx answers that say "not now" rather than "not this batch".
_RETRYABLE_4XX = {408: "timeout", 409: "server", 429: "server"}
# 4xx answers that say "not this endpoint": HTTP_ENDPOINT needs fixing.
_CONFIG_4XX = {404, 405}


class HttpSettings(GpufleetSettings):
    """Where the HTTP exporter POSTs (``HTTP_*``)."""

    http_endpoint: HttpUrlText = Field(
        description="http:// or https:// URL to POST batches to (required)"
    )
    http_timeout: Duration = Field(default=10.0, description="per-request time limit, e.g. 10s")
    http_auth_token: SecretStr | None = Field(
        default=None, description="sent as `Authorization: Bearer <token>` when set"
    )

    @field_validator("http_timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("expected a duration above zero")
        return value

    @field_validator("http_auth_token")
    @classmethod
    def _empty_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # `HTTP_AUTH_TOKEN=` in a manifest means "no token", not "Bearer ".
        if value is None or not value.get_secret_value().strip():
            return None
        return value


class _TooLarge(PermanentExporterError):
    """HTTP 413 for one POST: the body of ``size`` bytes is over the receiver's limit."""

    def __init__(self, exporter: str, message: str, size: int) -> None:
        super().__init__(exporter, message.removeprefix(f"exporter {exporter}: "))
        self.size = size


def redacted_url(url: str) -> str:
    """``url`` without user info, query or fragment: the parts that may hold secrets."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal needs its brackets back
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class HttpExporter:
    """POSTs each batch as a JSON array of readings, with an Idempotency-Key.

    One ``aiohttp.ClientSession`` is created on first use, inside the running
    event loop (a session binds to the loop it is made in), and closed by
    ``close()``; a later call makes a new one.
    """

    name = "http"

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._where = redacted_url(settings.http_endpoint)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.http_timeout),
                headers={"User-Agent": f"gpufleet/{__version__}"},
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        headers = {}
        if self.settings.http_auth_token is not None:
            token = self.settings.http_auth_token.get_secret_value()
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def write(self, batch: Sequence[Reading]) -> None:
        """POST the batch; raise ``ExporterError`` to retry or ``PermanentExporterError``.

        An empty batch sends nothing: there is nothing for the receiver to store.
        A 413 splits the batch (see the module notes); readings too large even
        alone are raised as ``PermanentExporterError`` with ``refused`` set,
        after every other reading was delivered.
        """
        if not batch:
            return
        refused: list[tuple[Reading, _TooLarge]] = []
        await self._post_splitting(batch, refused)
        if not refused:
            return
        first = refused[0][1]
        detail = str(first).removeprefix(f"exporter {self.name}: ")
        raise PermanentExporterError(
            self.name,
            f"{len(refused)} of {len(batch)} reading(s) over the receiver's body limit even "
            f"alone (first: gpu {refused[0][0].gpu} on node {refused[0][0].node}, "
            f"{first.size} bytes): {detail}",
            refused=[reading for reading, _ in refused],
        )

    async def _post_splitting(
        self, batch: Sequence[Reading], refused: list[tuple[Reading, _TooLarge]]
    ) -> None:
        try:
            await self._post(batch)
        except _TooLarge as exc:
            if len(batch) == 1:
                refused.append((batch[0], exc))
                return
            middle = len(batch) // 2
            await self._post_splitting(batch[:middle], refused)
            await self._post_splitting(batch[middle:], refused)

    async def _post(self, batch: Sequence[Reading]) -> None:
        body = json.dumps([r.to_dict() for r in batch], separators=(",", ":")).encode()
        headers = self._headers()
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = batch_hash(batch)
        what = f"POST {self._where} ({len(batch)} readings)"
        with self._transport_errors(what):
            async with self._client().post(
                self.settings.http_endpoint, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return
                error = await self._status_error(what, response)
                if response.status == 413:
                    raise _TooLarge(self.name, str(error), len(body))
                raise error

    async def _status_error(self, what: str, response: aiohttp.ClientResponse) -> ExporterError:
        status = response.status
        detail = f"{what}: HTTP {status} {response.reason or ''}".rstrip()
        excerpt = await _body_excerpt(response)
        if excerpt:
            detail += f": {excerpt}"
        if status in {401, 403}:
            return ExporterError(self.name, detail, error_type="auth")
        if status in _RETRYABLE_4XX:
            retry_after = response.headers.get("Retry-After")
            if retry_after:
                detail += f" (Retry-After: {retry_after[:40]})"
            return ExporterError(self.name, detail, error_type=_RETRYABLE_4XX[status])
        if 300 <= status < 400:
            location = redacted_url(response.headers.get("Location", "")) or "nowhere"
            detail += f" (redirects to {location}; set HTTP_ENDPOINT to the final URL)"
            return ExporterConfigError(self.name, detail)
        if status in _CONFIG_4XX:
            return ExporterConfigError(self.name, f"{detail} (check HTTP_ENDPOINT)")
        if 400 <= status < 500:
            return PermanentExporterError(self.name, detail)
        if status >= 500:
            return ExporterError(self.name, detail, error_type="server")
        return ExporterError(self.name, detail)

    @contextlib.contextmanager
    def _transport_errors(self, what: str) -> Iterator[None]:
        """Timeouts and aiohttp failures of one request, as `ExporterError`s naming it."""
        try:
            yield
        except TimeoutError as exc:
            # aiohttp's connect and read timeouts are TimeoutError subclasses too.
            raise ExporterError(
                self.name, f"{what}: no answer within {self.settings.http_timeout:g}s",
                error_type="timeout",
            ) from exc  # fmt: skip
        except aiohttp.ClientError as exc:
            reason = _WHITESPACE.sub(" ", str(exc) or type(exc).__name__)
            if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
                # Refused, unresolvable, TLS failures, and servers hanging up mid-answer.
                raise ExporterError(
                    self.name, f"{what}: {reason}", error_type="connection"
                ) from exc
            raise ExporterError(self.name, f"{what}: {reason}") from exc

    async def health(self) -> None:
        """OPTIONS the endpoint: any answer below 500 except 401/403 means reachable.

        OPTIONS changes nothing on the server. A POST-only receiver answers it
        with 405, which still proves the endpoint listens; 401/403 means our
        token is refused, which would fail every write, so that is unhealthy.
        """
        what = f"OPTIONS {self._where}"
        with self._transport_errors(what):
            async with self._client().options(
                self.settings.http_endpoint, headers=self._headers(), allow_redirects=False
            ) as response:
                if response.status in {401, 403}:
                    raise ExporterError(
                        self.name, f"{what}: HTTP {response.status}: the token is refused",
                        error_type="auth",
                    )  # fmt: skip
                if response.status >= 500:
                    detail = f"{what}: HTTP {response.status}"
                    excerpt = await _body_excerpt(response)
                    if excerpt:
                        detail += f": {excerpt}"
                    raise ExporterError(self.name, detail, error_type="server")

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _body_excerpt(response: aiohttp.ClientResponse) -> str:
    """At most ``BODY_EXCERPT_CHARS`` of the response body on one line; "" if unreadable."""
    try:
        raw = await response.content.read(_BODY_READ_BYTES)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    text = _escape_controls(_WHITESPACE.sub(" ", raw.decode("utf-8", errors="replace")).strip())
    if len(text) > BODY_EXCERPT_CHARS:
        return text[: BODY_EXCERPT_CHARS - 1] + "…"
    return text


def _escape_controls(text: str) -> str:
    """Control and format characters as ``\\xNN``/``\\uNNNN``: a body must not drive a terminal."""
    return "".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in {"Cc", "Cf"} else c
        for c in text
    )
