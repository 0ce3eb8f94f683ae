"""A small OCI distribution client: blobs and manifests, verified against their digests.

Synchronous, on httpx. It speaks the parts of the distribution API that kernel
cache images need: HEAD before upload, cross-repository mount, monolithic and
chunked uploads, manifests by tag or digest, and the anonymous, Basic and
Bearer-token auth flows. Every byte read from a registry is hashed while it
streams and checked against the digest that named it; see docs/kcache-oci.md.
Image references live in `kcache.reference` and docker ``config.json``
credentials in `kcache.credentials`; both are re-exported here.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self, TypeAlias

import httpx

from gpufleet.kcache.credentials import Credentials, docker_credentials
from gpufleet.kcache.errors import (
    AuthError,
    DigestMismatchError,
    KcacheError,
    NotFoundError,
    RegistryError,
)
from gpufleet.kcache.reference import (
    DOCKER_HUB,
    Reference,
    check_digest,
    check_repository,
    check_tag,
    is_digest,
)

__all__ = [
    "DEFAULT_DEADLINE",
    "DOCKER_HUB",
    "DOCKER_MANIFEST",
    "MANIFEST_TYPES",
    "MAX_ERROR_BODY",
    "MAX_MANIFEST_BYTES",
    "MAX_REDIRECTS",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "OCTET_STREAM",
    "REQUEST_LOG_SIZE",
    "Content",
    "Credentials",
    "Descriptor",
    "Reference",
    "RegistryClient",
    "check_plain_http",
    "docker_credentials",
    "is_loopback",
    "loggable_url",
    "sha256_digest",
]

_log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCTET_STREAM = "application/octet-stream"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST)
# Manifests are read whole; real ones are kilobytes, so a bigger one is an attack.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Error, 401 and token bodies: read this much at most, whatever the peer sends.
MAX_ERROR_BODY = 64 * 1024
# Blob GETs may be redirected to storage, a few hops at most; nothing else is redirected.
MAX_REDIRECTS = 10
# The whole life of a client (one pull or push), whatever the per-read timeout lets through.
DEFAULT_DEADLINE = 30 * 60.0
_READ_SIZE = 1024 * 1024
REQUEST_LOG_SIZE = 10_000
_DEFAULT_PORTS = {"http": 80, "https": 443}

_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


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


def sha256_digest(data: bytes) -> str:
    """The OCI digest (``sha256:<hex>``) of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What a manifest says about a blob: its media type, digest and size."""

    media_type: str
    digest: str
    size: int


def _host(registry: str) -> str:
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def is_loopback(registry: str) -> bool:
    """Whether ``registry`` (host[:port]) names this machine: localhost, 127.0.0.0/8 or ::1."""
    host = _host(registry)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plain_http(registry: str, forced: bool) -> None:
    """Refuse plain HTTP to a registry off this machine unless the user forced it."""
    if not forced and not is_loopback(registry):
        raise KcacheError(
            f"refusing plain HTTP to {registry}: it is not a loopback address, so credentials "
            "and images would cross the network unencrypted and unauthenticated; "
            "use --force-plain-http if you really mean it"
        )


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    """Scheme, host and port: what must match before credentials go to a URL."""
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 0)


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


def _small_body(response: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
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


def _error_detail(response: httpx.Response) -> str:
    """The registry's ``errors[0]`` code and message, or the HTTP status."""
    detail = f"HTTP {response.status_code}"
    if response.is_redirect:
        return f"{detail}, a redirect, which is not followed here"
    try:
        errors = json.loads(_small_body(response)).get("errors")
        first = errors[0]
        return f"{detail} {first.get('code', '?')}: {first.get('message', '')}".rstrip(": ")
    except (ValueError, AttributeError, LookupError, TypeError, RecursionError):
        return detail


def _merge_scopes(scopes: Iterable[str]) -> list[str]:
    """``type:name:actions`` scopes with one entry per resource and its actions united."""
    merged: dict[str, list[str]] = {}
    for scope in scopes:
        resource, _, actions = scope.rpartition(":")
        known = merged.setdefault(resource, [])
        known += [action for action in actions.split(",") if action and action not in known]
    return [f"{resource}:{','.join(actions)}" for resource, actions in merged.items()]


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m[1].lower(): m[2] or m[3] for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


ProgressCallback: TypeAlias = Callable[[int], None]
"""Told the bytes of a blob sent so far (again from 0 when a body is sent again)."""
Content: TypeAlias = bytes | Callable[[], Iterable[bytes]] | None


class _DeadlineStream(httpx.SyncByteStream):
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
        self._inner.close()


class RegistryClient:
    """One registry, over one HTTP connection pool; use as a context manager or ``close()``.

    ``plain_http``: None picks HTTP for loopback hosts and HTTPS otherwise; True
    forces HTTP (check it first with `check_plain_http`); False forces HTTPS.
    Credentials: ``username``/``password``, else docker ``config.json``, else none;
    they go only to the registry's own scheme, host and port.
    ``timeout`` bounds each connect and read; ``deadline`` (seconds, None for
    none) bounds everything the client does from its creation on, so make one
    client per pull or push, as the CLI does.
    """

    def __init__(
        self,
        registry: str,
        *,
        plain_http: bool | None = None,
        docker_config: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 60.0,
        deadline: float | None = DEFAULT_DEADLINE,
        chunk_size: int = 8 * 1024 * 1024,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise KcacheError(f"credentials for {registry}: a username needs a password")
        if chunk_size <= 0:
            raise KcacheError(f"chunk_size must be positive, not {chunk_size}")
        if deadline is not None and not deadline > 0:
            raise KcacheError(f"the deadline must be a positive number of seconds, not {deadline}")
        self.deadline = deadline
        self._deadline_at = None if deadline is None else time.monotonic() + deadline
        self._timeout = timeout
        self.registry = registry
        self.chunk_size = chunk_size
        scheme = (
            "http" if (is_loopback(registry) if plain_http is None else plain_http) else "https"
        )
        self._base = f"{scheme}://{registry}"
        self._origin = _origin(httpx.URL(self._base))
        self._credentials: Credentials | str | None
        if username is not None and password is not None:
            self._credentials = Credentials(username, password, "the given username/password")
        else:
            self._credentials = docker_credentials(registry, docker_config)
        # Bounded: a long-lived client (the node agent) must not grow without end.
        self._requests: deque[tuple[str, str]] = deque(maxlen=REQUEST_LOG_SIZE)
        self._tokens: dict[tuple[str, ...], str] = {}
        self._basic = False  # set once the registry asked for Basic: then send it up front
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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- auth -------------------------------------------------------------------------------

    def _auth_headers(self, scopes: tuple[str, ...]) -> dict[str, str]:
        token = self._tokens.get(scopes)
        if token is not None:
            return {"Authorization": f"Bearer {token}"}
        if self._basic and isinstance(self._credentials, Credentials):
            return {"Authorization": self._basic_header(self._credentials)}
        return {}

    @staticmethod
    def _basic_header(credentials: Credentials) -> str:
        pair = f"{credentials.username}:{credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def _missing_credentials(self, what: str) -> AuthError:
        if isinstance(self._credentials, str):
            return AuthError(
                f"registry {self.registry} requires credentials for {what}: {self._credentials}"
            )
        return AuthError(
            f"registry {self.registry} requires credentials for {what} and none were given "
            "(pass a username and password, or log in so docker config.json has them)"
        )

    def _refused(self, what: str, response: httpx.Response) -> AuthError:
        who = (
            f"user {self._credentials.username!r} from {self._credentials.source}"
            if isinstance(self._credentials, Credentials)
            else "anonymous access"
        )
        return AuthError(
            f"registry {self.registry} refused {who} for {what} ({_error_detail(response)})"
        )

    def _answer(self, challenge: str, scopes: tuple[str, ...], what: str) -> None:
        """Learn how to authenticate from a 401's ``WWW-Authenticate``; raise if we cannot."""
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if not isinstance(self._credentials, Credentials):
                raise self._missing_credentials(what)
            self._basic = True
        elif scheme == "bearer" and params.get("realm"):
            self._tokens[scopes] = self._fetch_token(params, scopes, what)
        else:
            raise AuthError(f"registry {self.registry} sent an unusable challenge {challenge!r}")

    def _fetch_token(self, params: dict[str, str], scopes: tuple[str, ...], what: str) -> str:
        # Our scopes, not only the challenge's: a mount needs pull on the source as well.
        wanted = _merge_scopes([*scopes, *params.get("scope", "").split()])
        query: dict[str, str | list[str]] = {"scope": wanted}
        if params.get("service"):
            query["service"] = params["service"]
        realm = httpx.URL(params["realm"])
        service = loggable_url(realm)
        auth = None
        if isinstance(self._credentials, Credentials):
            # The realm comes from the registry; never let it pull our password into clear
            # text. Plain HTTP is for this machine only (a port-forward), whatever the registry.
            if realm.scheme != "https" and not is_loopback(realm.host):
                raise AuthError(
                    f"registry {self.registry} sends us to token service {service} over plain "
                    "HTTP off this machine; refusing to send credentials there"
                )
            auth = httpx.BasicAuth(self._credentials.username, self._credentials.password)
        request = self._http.build_request(
            "GET", realm, params=query, timeout=self._request_timeout(what)
        )
        if auth is not None:
            request = next(auth.auth_flow(request))
        try:
            response = self._open(request, what)
        except httpx.HTTPError as exc:
            raise AuthError(f"token service {service} for {self.registry}: {exc}") from exc
        response = self._read_small(response)
        body = response.content
        if response.status_code in (401, 403):
            if auth is None:
                raise self._missing_credentials(what)
            raise self._refused(what, response)
        if response.status_code != 200:
            raise AuthError(
                f"token service {service} for {self.registry} answered HTTP {response.status_code}"
            )
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"token service {service} for {self.registry} sent no token")
        return token

    # -- transport --------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self._base}/v2/{path}"

    def _ours(self, url: httpx.URL) -> bool:
        """Whether `url` is on the registry's own origin: only there do credentials go."""
        return _origin(url) == self._origin

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
        response.stream = _DeadlineStream(response.stream, lambda: self._check_deadline(what))
        return response

    def _refuse_downgrade(self, source: httpx.URL, target: httpx.URL, what: str) -> None:
        if target.scheme not in _DEFAULT_PORTS or (
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
            auth = self._auth_headers(scopes) if self._ours(url) else {}
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
            self._refuse_downgrade(response.url, target, what)
            url = target
        raise RegistryError(
            f"registry {self.registry} redirected {what} more than {MAX_REDIRECTS} times"
        )

    def _send(
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
                return response if stream else self._read_small(response)
            response = self._read_small(response)
            challenge = response.headers.get("WWW-Authenticate")
            if attempt == 2 or not challenge:
                # Still 401 after answering the challenge: what we sent was not enough.
                if isinstance(self._credentials, Credentials):
                    raise self._refused(what, response)
                raise self._missing_credentials(what)
            self._answer(challenge, scopes, what)
        raise AssertionError("unreachable")

    @staticmethod
    def _read_small(response: httpx.Response) -> httpx.Response:
        """`response` with at most `MAX_ERROR_BODY` of its body read, and closed."""
        body = _small_body(response)
        headers = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=headers, content=body, request=response.request
        )

    def _fail(self, response: httpx.Response, what: str) -> RegistryError:
        detail = _error_detail(response)
        response.close()
        if response.status_code == 404:
            return NotFoundError(f"{what} not found in {self.registry} ({detail})")
        if response.status_code == 403:
            return AuthError(f"registry {self.registry} denied {what} ({detail})")
        return RegistryError(f"registry {self.registry} failed {what}: {detail}")

    @staticmethod
    def _pull(repository: str) -> tuple[str, ...]:
        return (f"repository:{repository}:pull",)

    @staticmethod
    def _push(repository: str) -> tuple[str, ...]:
        return (f"repository:{repository}:pull,push",)

    # -- blobs ------------------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether ``repository`` has blob ``digest`` (a HEAD request)."""
        return self._blob_exists(repository, digest, self._pull(check_repository(repository)))

    def _blob_exists(self, repository: str, digest: str, scopes: tuple[str, ...]) -> bool:
        what = f"blob {check_digest(digest)} in {repository}"
        url = self._url(f"{repository}/blobs/{digest}")
        response = self._send("HEAD", url, scopes=scopes, what=what)
        response.close()
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._fail(response, what)

    def push_blob(
        self,
        repository: str,
        data: bytes | Path,
        digest: str | None = None,
        *,
        mount_from: str | None = None,
        chunked: bool | None = None,
        media_type: str = OCTET_STREAM,
        progress: ProgressCallback | None = None,
    ) -> Descriptor:
        """Upload a blob unless ``repository`` has it; returns its descriptor.

        HEAD first; then a cross-repository mount from ``mount_from`` when given;
        then a monolithic PUT, or PATCH chunks of ``chunk_size`` when the blob is
        larger (or ``chunked``). A file is streamed, never read whole; without
        ``digest`` it is hashed in one extra pass. The registry's
        ``Docker-Content-Digest`` must match. ``progress`` is told the bytes
        sent so far as the upload goes (all of them when none need sending).
        """
        tell: ProgressCallback = progress or (lambda _: None)
        check_repository(repository)
        if isinstance(data, Path):
            size = data.stat().st_size
            if digest is None:
                digest = _file_digest(data)
        else:
            size = len(data)
            actual = sha256_digest(data)
            if digest is not None and digest != actual:
                raise DigestMismatchError(
                    f"blob for {repository} claims {digest} but its content hashes to {actual}"
                )
            digest = actual
        check_digest(digest)
        descriptor = Descriptor(media_type, digest, size)
        what = f"upload of blob {digest} to {repository}"
        scopes = self._push(repository)
        if self._blob_exists(repository, digest, scopes):
            tell(size)
            return descriptor
        params: dict[str, str] = {}
        if mount_from is not None and mount_from != repository:
            scopes += self._pull(check_repository(mount_from))
            params = {"mount": digest, "from": mount_from}
        response = self._send(
            "POST", httpx.URL(self._url(f"{repository}/blobs/uploads/"), params=params),
            scopes=scopes, what=what,
        )  # fmt: skip
        response.close()
        if response.status_code == 201 and params:
            self._check_stored(response, digest, what)
            tell(size)
            return descriptor
        # 202 also answers a mount the registry would not do: it opened an upload instead.
        if response.status_code != 202:
            raise self._fail(response, what)
        location = self._location(response, what)
        if chunked or (chunked is None and size > self.chunk_size):
            location = self._upload_chunks(location, data, size, scopes, what, tell)
            final: Content = None
            headers = {"Content-Length": "0"}
        else:
            final = (
                data
                if isinstance(data, bytes)
                else (lambda: _told(_read_file(data, 0, size), tell))
            )
            headers = {"Content-Type": OCTET_STREAM, "Content-Length": str(size)}
        put_url = location.copy_merge_params({"digest": digest})
        response = self._send(
            "PUT", put_url, scopes=scopes, what=what, headers=headers, content=final
        )
        response.close()
        if response.status_code != 201:
            raise self._fail(response, what)
        self._check_stored(response, digest, what)
        tell(size)
        return descriptor

    def _upload_chunks(
        self,
        location: httpx.URL,
        data: bytes | Path,
        size: int,
        scopes: tuple[str, ...],
        what: str,
        tell: ProgressCallback,
    ) -> httpx.URL:
        offset = 0
        while offset < size:
            end = min(offset + self.chunk_size, size)
            # One chunk in memory at a time (chunk_size bounds it), so it can be resent.
            chunk = data[offset:end] if isinstance(data, bytes) else _read_range(data, offset, end)
            headers = {
                "Content-Type": OCTET_STREAM,
                "Content-Length": str(end - offset),
                "Content-Range": f"{offset}-{end - 1}",
            }
            response = self._send(
                "PATCH", location, scopes=scopes, what=what, headers=headers, content=chunk
            )
            response.close()
            if response.status_code != 202:
                raise self._fail(response, what)
            location = self._location(response, what)
            offset = end
            tell(offset)
        return location

    def _location(self, response: httpx.Response, what: str) -> httpx.URL:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.registry} sent no upload Location for {what}")
        # Another origin gets the upload but no credentials (see _send); HTTP after HTTPS,
        # nothing at all.
        target = response.url.join(location)
        self._refuse_downgrade(response.url, target, f"the upload session for {what}")
        return target

    def _check_stored(self, response: httpx.Response, digest: str, what: str) -> None:
        stored = response.headers.get("Docker-Content-Digest")
        if stored is not None and stored != digest:
            raise DigestMismatchError(
                f"registry {self.registry} stored {stored} for {what}, not {digest}"
            )

    def iter_blob(
        self, repository: str, digest: str, *, size: int | None = None
    ) -> Iterator[bytes]:
        """Stream blob ``digest``; after the last chunk, raise `DigestMismatchError` if it lied.

        With ``size`` (the descriptor's), a ``Content-Length`` over it is refused
        before the body is read, and reading stops at the first chunk that would
        pass it: at most ``size`` bytes are handed on, and at most one socket
        read (64 KiB) more is taken from the registry. A body shorter than
        ``size`` is refused too. Whatever a caller did with the chunks is
        garbage when an error comes.
        """
        what = f"blob {check_digest(digest)} in {check_repository(repository)}"
        if size is not None and size < 0:
            raise RegistryError(f"{what}: a negative size {size} in its descriptor")
        url = self._url(f"{repository}/blobs/{digest}")
        # Identity: the digest names the raw bytes, and a compressed body is a decompression bomb.
        response = self._send(
            "GET", url, scopes=self._pull(repository), what=what,
            headers={"Accept-Encoding": "identity"}, stream=True, follow=True,
        )  # fmt: skip
        received = 0
        try:
            if response.status_code != 200:
                raise self._fail(response, what)
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RegistryError(
                    f"{what} at {self.registry}: sent with Content-Encoding {encoding!r}, "
                    "which was not asked for"
                )
            if size is not None:
                self._check_length(response, size, what)
            hasher = hashlib.sha256()
            # Raw: chunks as the socket gives them, so a size check stops within one read.
            # (An in-memory transport hands over a body httpx has read already.)
            chunks = (
                iter((response.content,)) if response.is_stream_consumed else (response.iter_raw())
            )
            for chunk in chunks:
                received += len(chunk)
                if size is not None and received > size:
                    raise RegistryError(
                        f"{what} at {self.registry} is longer than its descriptor says: "
                        f"more than the {size} bytes declared"
                    )
                hasher.update(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            raise RegistryError(f"reading {what} from {self.registry}: {exc}") from exc
        finally:
            response.close()
        if size is not None and received != size:
            raise DigestMismatchError(
                f"{what} at {self.registry} ended after {received} of the {size} bytes "
                "its descriptor declares"
            )
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatchError(
                f"{what} at {self.registry} is corrupt or tampered with: "
                f"its content hashes to {actual}"
            )

    def _check_length(self, response: httpx.Response, size: int, what: str) -> None:
        """Refuse, before reading the body, a ``Content-Length`` that is not the descriptor's."""
        length = response.headers.get("Content-Length")
        if length is None:
            return
        if not length.isascii() or not length.isdigit() or int(length) != size:
            raise RegistryError(
                f"{what} at {self.registry}: Content-Length {length[:40]!r} is not "
                f"the {size} bytes its descriptor declares"
            )

    def pull_blob(
        self, repository: str, digest: str, sink: BinaryIO, *, size: int | None = None
    ) -> int:
        """Stream blob ``digest`` into ``sink``; returns the bytes written.

        ``size`` bounds it as in `iter_blob`: no more than ``size`` bytes reach
        ``sink``. Raises `DigestMismatchError` at the end when the content does
        not match: the caller must then treat what it wrote as garbage.
        """
        written = 0
        for chunk in self.iter_blob(repository, digest, size=size):
            sink.write(chunk)
            written += len(chunk)
        return written

    # -- manifests --------------------------------------------------------------------------

    def push_manifest(
        self, repository: str, reference: str, manifest: bytes, media_type: str
    ) -> str:
        """Put ``manifest`` under ``reference`` (a tag or its digest); returns its digest."""
        digest = sha256_digest(manifest)
        what = f"manifest {reference} in {check_repository(repository)}"
        if reference.startswith("sha256:") and reference != digest:
            raise DigestMismatchError(f"{what}: the manifest's content hashes to {digest}")
        response = self._send(
            "PUT", self._url(f"{repository}/manifests/{self._reference(reference)}"),
            scopes=self._push(repository), what=what,
            headers={"Content-Type": media_type}, content=manifest,
        )  # fmt: skip
        response.close()
        if response.status_code != 201:
            raise self._fail(response, what)
        self._check_stored(response, digest, what)
        return digest

    def get_manifest(
        self, repository: str, reference: str, *, accept: tuple[str, ...] = MANIFEST_TYPES
    ) -> tuple[bytes, str, str]:
        """Fetch a manifest by tag or digest: (bytes, media type, digest).

        By digest, the bytes must hash to it; by tag, to the registry's
        ``Docker-Content-Digest`` when it sends one. Else `DigestMismatchError`.
        """
        what = f"manifest {reference} in {check_repository(repository)}"
        response = self._send(
            "GET", self._url(f"{repository}/manifests/{self._reference(reference)}"),
            scopes=self._pull(repository), what=what,
            headers={"Accept": ", ".join(accept)}, stream=True,
        )  # fmt: skip
        data = self._read_manifest(response, what)
        digest = sha256_digest(data)
        expected: str | None = response.headers.get("Docker-Content-Digest")
        if reference.startswith("sha256:"):
            expected = reference
        if expected is not None and expected != digest:
            raise DigestMismatchError(
                f"{what} at {self.registry} should be {expected} but its content hashes to {digest}"
            )
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in accept:
            media_type = _declared_media_type(data) or media_type
        return data, media_type, digest

    def _read_manifest(self, response: httpx.Response, what: str) -> bytes:
        """The body of a 200 answer, at most `MAX_MANIFEST_BYTES`; else the error it is."""
        try:
            if response.status_code != 200:
                raise self._fail(response, what)
            body = bytearray()
            for chunk in response.iter_bytes(_READ_SIZE):
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise RegistryError(
                        f"{what} at {self.registry} is larger than {MAX_MANIFEST_BYTES} bytes"
                    )
        except httpx.HTTPError as exc:
            raise RegistryError(f"reading {what} from {self.registry}: {exc}") from exc
        finally:
            response.close()
        return bytes(body)

    def get_referrers(
        self, repository: str, digest: str, *, artifact_type: str | None = None
    ) -> bytes | None:
        """The OCI 1.1 referrers index of manifest ``digest`` (bytes, bounded like a manifest).

        None when the registry answers 404 (the distribution spec's way of
        saying it has no referrers API; 400 and 405, which some registries send
        for an endpoint they do not know, count too): then the referrers tag
        schema applies (`kcache.referrers`). ``artifact_type`` asks the registry
        to filter; it may not, so filter what comes back.
        """
        what = f"referrers of {check_digest(digest)} in {check_repository(repository)}"
        params = {} if artifact_type is None else {"artifactType": artifact_type}
        response = self._send(
            "GET", httpx.URL(self._url(f"{repository}/referrers/{digest}"), params=params),
            scopes=self._pull(repository), what=what, headers={"Accept": OCI_INDEX}, stream=True,
        )  # fmt: skip
        if response.status_code in (400, 404, 405):
            response.close()
            return None
        return self._read_manifest(response, what)

    def resolve(self, repository: str, reference: str) -> str | None:
        """The digest ``reference`` (a tag or digest) points at; None when absent."""
        what = f"manifest {reference} in {check_repository(repository)}"
        response = self._send(
            "HEAD", self._url(f"{repository}/manifests/{self._reference(reference)}"),
            scopes=self._pull(repository), what=what, headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )  # fmt: skip
        response.close()
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, what)
        digest: str | None = response.headers.get("Docker-Content-Digest")
        if digest is None or not is_digest(digest):
            # Not every registry names the digest on HEAD: hash the manifest itself.
            try:
                return self.get_manifest(repository, reference)[2]
            except NotFoundError:
                return None
        return digest

    def delete_manifest(self, repository: str, digest: str) -> None:
        """Delete the manifest ``digest`` (and so every tag pointing at it)."""
        what = f"manifest {check_digest(digest)} in {check_repository(repository)}"
        response = self._send(
            "DELETE", self._url(f"{repository}/manifests/{digest}"),
            scopes=(f"repository:{repository}:delete", *self._push(repository)), what=what,
        )  # fmt: skip
        response.close()
        if response.status_code not in (200, 202):
            raise self._fail(response, what)

    @staticmethod
    def _reference(reference: str) -> str:
        if reference.startswith("sha256:"):
            return check_digest(reference)
        return check_tag(reference)


def _declared_media_type(data: bytes) -> str | None:
    try:
        declared = json.loads(data).get("mediaType")
    except (ValueError, AttributeError, RecursionError):
        return None
    return declared if isinstance(declared, str) else None


def _told(chunks: Iterator[bytes], tell: ProgressCallback) -> Iterator[bytes]:
    """`chunks`, telling `tell` the bytes handed on so far after each one."""
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        tell(done)


def _read_file(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        file.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = file.read(min(_READ_SIZE, remaining))
            if not chunk:
                raise KcacheError(f"{path} shrank while it was being uploaded")
            remaining -= len(chunk)
            yield chunk


def _read_range(path: Path, start: int, end: int) -> bytes:
    return b"".join(_read_file(path, start, end))


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_READ_SIZE):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()
