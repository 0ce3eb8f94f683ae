"""The registry auth flow: which credentials go where, and how a 401 is answered.

Anonymous, Basic and Bearer-token auth as the distribution spec and docker do
them: a ``WWW-Authenticate`` challenge is parsed, Basic is then sent up front,
or a token is fetched from the challenge's realm for the request's scopes and
cached per scope set. Credentials belong to one origin (scheme, host, port):
`origin` says what must match before they go to a URL, `is_loopback` and
`check_plain_http` where plain HTTP may carry them. The HTTP itself is the
session's (`kcache.session`); see docs/kcache-oci.md.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from typing import TypeAlias

import httpx

from gpufleet.kcache.credentials import Credentials
from gpufleet.kcache.errors import AuthError, KcacheError
from gpufleet.kcache.redact import loggable_url
from gpufleet.kcache.responses import error_detail

__all__ = [
    "DEFAULT_PORTS",
    "RegistryAuth",
    "TokenQuery",
    "TokenRequest",
    "check_plain_http",
    "is_loopback",
    "merge_scopes",
    "origin",
    "parse_challenge",
    "pull_scopes",
    "push_scopes",
]

DEFAULT_PORTS = {"http": 80, "https": 443}
"""The schemes a registry, a redirect or an upload Location may use, and their ports."""

_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


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


def origin(url: httpx.URL) -> tuple[str, str, int]:
    """Scheme, host and port: what must match before credentials go to a URL."""
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme, 0)


def pull_scopes(repository: str) -> tuple[str, ...]:
    """The token scopes a read of `repository` needs."""
    return (f"repository:{repository}:pull",)


def push_scopes(repository: str) -> tuple[str, ...]:
    """The token scopes a write to `repository` needs (a push reads too: HEAD first)."""
    return (f"repository:{repository}:pull,push",)


def merge_scopes(scopes: Iterable[str]) -> list[str]:
    """``type:name:actions`` scopes with one entry per resource and its actions united."""
    merged: dict[str, list[str]] = {}
    for scope in scopes:
        resource, _, actions = scope.rpartition(":")
        known = merged.setdefault(resource, [])
        known += [action for action in actions.split(",") if action and action not in known]
    return [f"{resource}:{','.join(actions)}" for resource, actions in merged.items()]


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """A ``WWW-Authenticate`` value as its scheme (lower case) and its parameters."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m[1].lower(): m[2] or m[3] for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


TokenQuery: TypeAlias = dict[str, str | list[str]]
"""The query of a token request: ``scope`` (a list) and ``service``."""
TokenRequest: TypeAlias = Callable[
    [httpx.URL, TokenQuery, httpx.BasicAuth | None, str], httpx.Response
]
"""Send ``GET realm?query`` (with the Basic auth, if any) for the request named by the
last argument; answer the response with its body read (bounded), or raise `httpx.HTTPError`."""


class RegistryAuth:
    """One registry's credentials and what its challenges taught: Basic up front, or tokens.

    ``credentials``: a `Credentials`, or a string saying why there are none that
    can be used (a docker credential helper), or None for anonymous access.
    """

    def __init__(self, registry: str, credentials: Credentials | str | None) -> None:
        self.registry = registry
        self.credentials = credentials
        self._tokens: dict[tuple[str, ...], str] = {}
        self._basic = False  # set once the registry asked for Basic: then send it up front

    def headers(self, scopes: tuple[str, ...]) -> dict[str, str]:
        """The ``Authorization`` header, if any, for a request to the registry's own origin."""
        token = self._tokens.get(scopes)
        if token is not None:
            return {"Authorization": f"Bearer {token}"}
        if self._basic and isinstance(self.credentials, Credentials):
            return {"Authorization": self._basic_header(self.credentials)}
        return {}

    @staticmethod
    def _basic_header(credentials: Credentials) -> str:
        pair = f"{credentials.username}:{credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def missing_credentials(self, what: str) -> AuthError:
        """The error for a registry that wants credentials we do not have."""
        if isinstance(self.credentials, str):
            return AuthError(
                f"registry {self.registry} requires credentials for {what}: {self.credentials}"
            )
        return AuthError(
            f"registry {self.registry} requires credentials for {what} and none were given "
            "(pass a username and password, or log in so docker config.json has them)"
        )

    def refused(self, what: str, response: httpx.Response) -> AuthError:
        """The error for a registry (or token service) that refused what we sent."""
        who = (
            f"user {self.credentials.username!r} from {self.credentials.source}"
            if isinstance(self.credentials, Credentials)
            else "anonymous access"
        )
        return AuthError(
            f"registry {self.registry} refused {who} for {what} ({error_detail(response)})"
        )

    def still_refused(self, what: str, response: httpx.Response) -> AuthError:
        """The error for a 401 after the challenge was answered (or one without a challenge)."""
        if isinstance(self.credentials, Credentials):
            return self.refused(what, response)
        return self.missing_credentials(what)

    def answer(
        self, challenge: str, scopes: tuple[str, ...], what: str, request_token: TokenRequest
    ) -> None:
        """Learn how to authenticate from a 401's ``WWW-Authenticate``; raise if we cannot."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not isinstance(self.credentials, Credentials):
                raise self.missing_credentials(what)
            self._basic = True
        elif scheme == "bearer" and params.get("realm"):
            self._tokens[scopes] = self._fetch_token(params, scopes, what, request_token)
        else:
            raise AuthError(f"registry {self.registry} sent an unusable challenge {challenge!r}")

    def _fetch_token(
        self,
        params: dict[str, str],
        scopes: tuple[str, ...],
        what: str,
        request_token: TokenRequest,
    ) -> str:
        # Our scopes, not only the challenge's: a mount needs pull on the source as well.
        wanted = merge_scopes([*scopes, *params.get("scope", "").split()])
        query: TokenQuery = {"scope": wanted}
        if params.get("service"):
            query["service"] = params["service"]
        realm = httpx.URL(params["realm"])
        service = loggable_url(realm)
        auth = None
        if isinstance(self.credentials, Credentials):
            # The realm comes from the registry; never let it pull our password into clear
            # text. Plain HTTP is for this machine only (a port-forward), whatever the registry.
            if realm.scheme != "https" and not is_loopback(realm.host):
                raise AuthError(
                    f"registry {self.registry} sends us to token service {service} over plain "
                    "HTTP off this machine; refusing to send credentials there"
                )
            auth = httpx.BasicAuth(self.credentials.username, self.credentials.password)
        try:
            response = request_token(realm, query, auth, what)
        except httpx.HTTPError as exc:
            raise AuthError(f"token service {service} for {self.registry}: {exc}") from exc
        body = response.content
        if response.status_code in (401, 403):
            if auth is None:
                raise self.missing_credentials(what)
            raise self.refused(what, response)
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
