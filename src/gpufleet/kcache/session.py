"""One registry's HTTP: its origin, its deadline, redirects, and at most one auth challenge.

`RegistrySession` is what the registry client (`kcache.oci`) sends every
request through. It keeps credentials to the registry's own origin (an upload
Location or a storage redirect elsewhere gets none), follows redirects only
where asked and never from HTTPS to HTTP, answers one 401 through
`kcache.auth`, bounds every body read by the client's overall deadline, and
keeps a bounded log of the requests sent. See docs/kcache-oci.md.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TypeAlias

import httpx

from gpufleet.kcache.auth import DEFAULT_PORTS, RegistryAuth, TokenQuery, origin
from gpufleet.kcache.errors import AuthError, NotFoundError, RegistryError
from gpufleet.kcache.redact import loggable_url
from gpufleet.kcache.responses import DeadlineStream, error_detail, read_small

__all__ = [
    "DEFAULT_DEADLINE",
    "MAX_REDIRECTS",
    "REQUEST_LOG_SIZE",
    "Content",
    "RegistrySession",
]

# The client's logger, as it was before the session had a module of its own.
_log = logging.getLogger("gpufleet.kcache.oci")

# Blob GETs may be redirected to storage, a few hops at most; nothing else is redirected.
MAX_REDIRECTS = 10
# The whole life of a client (one pull or push), whatever the per-read timeout lets through.
DEFAULT_DEADLINE = 30 * 60.0
REQUEST_LOG_SIZE = 10_000

Content: TypeAlias = bytes | Callable[[], Iterable[bytes]] | None
"""A request body: bytes, or a factory of byte chunks (so it can be sent again), or none."""


class RegistrySession:
    """The HTTP of one registry at ``base`` (``scheme://host[:port]``), over one pool.

    ``timeout`` bounds each connect and read; ``deadline`` (seconds, None for
    none) bounds everything from the session's creation on.
    """

    def __init__(
        self,
        registry: str,
        base: str,
        auth: RegistryAuth,
        *,
        timeout: float,
        deadline: float | None,
        transport: httpx.BaseTransport | None,
    ) -> None:
        self.registry = registry
        self.deadline = deadline
        self._deadline_at = None if deadline is None else time.monotonic() + deadline
        self._timeout = timeout
        self._base = base
        self._origin = origin(httpx.URL(base))
        self.auth = auth
        # Bounded: a long-lived client (the node agent) must not grow without end.
        self._requests: deque[tuple[str, str]] = deque(maxlen=REQUEST_LOG_SIZE)
        self._http = httpx.Client(
            transport=transport,
            timeout=timeout,
            event_hooks={"request": [self._record], "response": [self._log_response]},
            headers={"User-Agent": "gpufleet-kcache"},
        )

    def _record(self, request: httpx.Request) -> None:
        # The path only: a query may hold an upload's _state or a presigned signature.
        self._requests.append((request.method, request.url.raw_path.split(b"?")[0].decode()))

    @staticmethod
    def _log_response(response: httpx.Response) -> None:
        # One line a request, at debug only; the query never: it holds upload state tokens.
        request = response.request
        _log.debug(
            "registry request",
            extra={
                "method": request.method,
                "url": loggable_url(request.url),
                "status": response.status_code,
            },
        )

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path without its query) of each HTTP request sent, oldest first.

        Token requests and redirect hops included; the last `REQUEST_LOG_SIZE` are kept.
        """
        return list(self._requests)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def url(self, path: str) -> str:
        """The URL of ``/v2/<path>`` on the registry."""
        return f"{self._base}/v2/{path}"

    def _ours(self, url: httpx.URL) -> bool:
        """Whether `url` is on the registry's own origin: only there do credentials go."""
        return origin(url) == self._origin

    def _check_deadline(self, what: str) -> float:
        """The seconds left before the deadline; `RegistryError` once it has passed."""
        if self._deadline_at is None:
            return self._timeout
        left = self._deadline_at - time.monotonic()
        if left <= 0:
            raise RegistryError(
                f"{what} at {self.registry}: not done within the {self.deadline:g} s deadline "
                "(raise it with --deadline or KCACHE_DEADLINE)"
            )
        return left

    def _request_timeout(self, what: str) -> httpx.Timeout:
        return httpx.Timeout(min(self._timeout, self._check_deadline(what)))

    def _open(self, request: httpx.Request, what: str) -> httpx.Response:
        """Send `request`, streamed, follow nothing; its body checks the deadline as it reads."""
        response = self._http.send(request, stream=True, follow_redirects=False)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = DeadlineStream(response.stream, lambda: self._check_deadline(what))
        return response

    def _request_token(
        self, realm: httpx.URL, query: TokenQuery, auth: httpx.BasicAuth | None, what: str
    ) -> httpx.Response:
        """A token request for `kcache.auth`: its answer, body read within bounds."""
        request = self._http.build_request(
            "GET", realm, params=query, timeout=self._request_timeout(what)
        )
        if auth is not None:
            request = next(auth.auth_flow(request))
        return read_small(self._open(request, what))

    def refuse_downgrade(self, source: httpx.URL, target: httpx.URL, what: str) -> None:
        """`RegistryError` when `target` leaves HTTPS (or HTTP for another scheme)."""
        if target.scheme not in DEFAULT_PORTS or (
            source.scheme == "https" and target.scheme != "https"
        ):
            raise RegistryError(
                f"registry {self.registry} sent {what} from {source.scheme} to "
                f"{loggable_url(target)}; refusing plain HTTP (or another scheme) after HTTPS"
            )

    def _exchange(
        self,
        method: str,
        url: httpx.URL,
        *,
        scopes: tuple[str, ...],
        what: str,
        headers: dict[str, str] | None,
        content: Content,
        follow: bool,
    ) -> httpx.Response:
        """One request, and with `follow` its redirects; credentials only to our origin."""
        for _ in range(MAX_REDIRECTS + 1):
            body = content() if callable(content) else content
            auth = self.auth.headers(scopes) if self._ours(url) else {}
            request = self._http.build_request(
                method, url, headers={**(headers or {}), **auth}, content=body,
                timeout=self._request_timeout(what),
            )  # fmt: skip
            try:
                response = self._open(request, what)
            except httpx.HTTPError as exc:
                raise RegistryError(f"{method} {what} at {self.registry}: {exc}") from exc
            if not (follow and response.is_redirect):
                return response
            response.close()
            target = response.url.join(response.headers["Location"])
            self.refuse_downgrade(response.url, target, what)
            url = target
        raise RegistryError(
            f"registry {self.registry} redirected {what} more than {MAX_REDIRECTS} times"
        )

    def send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        scopes: tuple[str, ...],
        what: str,
        headers: dict[str, str] | None = None,
        content: Content = None,
        stream: bool = False,
        follow: bool = False,
    ) -> httpx.Response:
        """Send one request, answering at most one auth challenge; ``what`` names it in errors.

        ``content`` is bytes or a factory of byte chunks, so a body can be sent
        again after a challenge without holding a file in memory. Without
        ``stream`` the answer's body is read, up to `MAX_ERROR_BODY` (answers
        that are not streamed carry nothing but an error). ``follow``: follow
        redirects (blob GETs, which registries send to storage); never from
        HTTPS to HTTP, at most `MAX_REDIRECTS`.
        """
        for attempt in (1, 2):
            response = self._exchange(
                method, httpx.URL(url), scopes=scopes, what=what, headers=headers,
                content=content, follow=follow,
            )  # fmt: skip
            # A 401 from another origin (storage, after a redirect) is a plain failure:
            # answering it would send our credentials to a realm the registry never named.
            if response.status_code != 401 or not self._ours(response.url):
                return response if stream else read_small(response)
            response = read_small(response)
            challenge = response.headers.get("WWW-Authenticate")
            if attempt == 2 or not challenge:
                # Still 401 after answering the challenge: what we sent was not enough.
                raise self.auth.still_refused(what, response)
            self.auth.answer(challenge, scopes, what, self._request_token)
        raise AssertionError("unreachable")

    def fail(self, response: httpx.Response, what: str) -> RegistryError:
        """The error a failed answer stands for: not found, denied, or the registry's own."""
        detail = error_detail(response)
        response.close()
        if response.status_code == 404:
            return NotFoundError(f"{what} not found in {self.registry} ({detail})")
        if response.status_code == 403:
            return AuthError(f"registry {self.registry} denied {what} ({detail})")
        return RegistryError(f"registry {self.registry} failed {what}: {detail}")
