"""Connect to the Kubernetes API, with one rate limiter in front of every call.

`connect()` builds a `Kube`: the generated `kubernetes_asyncio` API objects
over two API clients (plain HTTP and websocket) that share one `TokenBucket`.
Both clients are subclasses overriding `request`, the method every call goes
through (REST, watch and the exec websocket alike), so no call can skip the
limiter, whichever API object or helper makes it.

Leader election gets a `Kube` of its own (`Kube.for_leader_election()`), with
its own limiter and connection pool, as kube-controller-manager gives its
elector its own client: a renewal must never queue behind the workers' execs,
or a busy leader loses its Lease to its own traffic.
"""

from __future__ import annotations

import json
import logging
import os
from types import TracebackType
from typing import Any

import yaml
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, CoordinationV1Api, CoreV1Api
from kubernetes_asyncio.client.configuration import Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.stream import WsApiClient

from gpufleet.core.errors import ConfigError
from gpufleet.kube.errors import KubeError
from gpufleet.kube.ratelimit import TokenBucket
from gpufleet.kube.settings import KubeSettings

__all__ = ["Kube", "KubeConfigError", "KubeSettings", "api_status", "call_json", "connect"]

log = logging.getLogger(__name__)

_DEFAULT_KUBECONFIG = "~/.kube/config"


class KubeConfigError(KubeError, ConfigError):
    """No usable kubeconfig and no in-cluster configuration: a configuration error (exit 2).

    The message is one line naming each kubeconfig file tried and what is wrong
    with it, and why the in-cluster service account was not used.
    """


class _Limited:
    """Mixed into an API client: every request first takes a token from the bucket.

    ``request()`` is the one method every REST call, watch and websocket
    connection of the generated client goes through.
    """

    _limiter: TokenBucket

    async def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        """Wait for the limiter, then make the request as the base client would."""
        await self._limiter.acquire()
        return await super().request(method, url, *args, **kwargs)  # type: ignore[misc]


class _LimitedApiClient(_Limited, ApiClient):
    """An `ApiClient` whose every HTTP request first takes a token from the bucket."""

    def __init__(self, configuration: Configuration, limiter: TokenBucket) -> None:
        super().__init__(configuration)
        self._limiter = limiter


class _LimitedWsApiClient(_Limited, WsApiClient):
    """A `WsApiClient` (exec, attach, port-forward) that takes a token per connection."""

    def __init__(self, configuration: Configuration, limiter: TokenBucket) -> None:
        super().__init__(configuration)
        self._limiter = limiter


class Kube:
    """A connection to one API server: the API objects, sharing one rate limiter.

    `core` and `coordination` speak HTTP; `ws_core` is a `CoreV1Api` over the
    websocket client, for `connect_get_namespaced_pod_exec`. Close it with
    `await kube.close()` or use it as an async context manager.
    """

    def __init__(self, configuration: Configuration, limiter: TokenBucket) -> None:
        self.configuration = configuration
        self.limiter = limiter
        """The token bucket every request of this connection takes from."""
        self.api_client: Any = _LimitedApiClient(configuration, limiter)
        self.ws_client: Any = _LimitedWsApiClient(configuration, limiter)
        self.core: Any = CoreV1Api(self.api_client)
        self.coordination: Any = CoordinationV1Api(self.api_client)
        self.ws_core: Any = CoreV1Api(self.ws_client)

    def for_leader_election(self) -> Kube:
        """A second connection to the same server for a `LeaderElector`, limited on its own.

        It has its own token bucket (the same `QPS`/`BURST`) and its own
        connection pool, so Lease renewals never wait behind the workers'
        requests: an elector makes at most two requests per retry period.
        The caller closes it.
        """
        return Kube(self.configuration, TokenBucket(self.limiter.qps, self.limiter.burst))

    async def close(self) -> None:
        """Close both clients' connection pools."""
        try:
            await self.api_client.close()
        finally:
            await self.ws_client.close()

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def connect(settings: KubeSettings, *, configuration: Configuration | None = None) -> Kube:
    """A `Kube` for the cluster `settings` point at, limited to `QPS`/`BURST`.

    With `configuration` (tests pass their API double's), it is used as is.
    Otherwise: in a pod and without `KUBECONFIG`, the pod's service account;
    else the kubeconfig (`KUBECONFIG` or `~/.kube/config`). Raises `KubeError`
    naming the source when the configuration cannot be loaded.
    """
    try:
        limiter = TokenBucket(settings.qps, settings.burst)
    except ValueError as exc:
        raise KubeError(f"invalid QPS/BURST: {exc}") from exc
    if configuration is None:
        configuration = await _load_configuration(settings)
    return Kube(configuration, limiter)


async def _load_configuration(settings: KubeSettings) -> Configuration:
    configuration = Configuration()
    if settings.kubeconfig is None and settings.kubernetes_service_host:
        try:
            load_incluster: Any = kube_config.load_incluster_config  # untyped upstream
            load_incluster(client_configuration=configuration)
        except kube_config.ConfigException as exc:
            raise KubeError(f"in-cluster configuration: {exc}") from exc
        log.debug("using the in-cluster service account")
        return configuration
    path = settings.kubeconfig or _DEFAULT_KUBECONFIG
    expanded = _usable_kubeconfigs(settings, path)
    try:
        # persist_config=False: never rewrite the user's kubeconfig (token
        # refreshes), and the root filesystem may be read-only anyway.
        await kube_config.load_kube_config(
            config_file=expanded, client_configuration=configuration, persist_config=False
        )
    except (kube_config.ConfigException, OSError, ValueError, TypeError) as exc:
        raise KubeError(f"kubeconfig {path}: {exc}") from exc
    log.debug("using kubeconfig", extra={"kubeconfig": path})
    return configuration


def _usable_kubeconfigs(settings: KubeSettings, path: str) -> str:
    """The `:`-joined files of `path` that exist, once one of them names a current context.

    kubectl skips the missing entries of a `KUBECONFIG` list and takes the
    first `current-context` it finds. When no file would give one, this raises
    `KubeConfigError` naming every file tried and what is wrong with each,
    rather than letting the library say `Expected key current-context` (after
    logging its own "Config not found" warning). Only existing files are
    passed on, so the library never logs that warning.
    """
    entries = [part for part in path.split(":") if part]
    found: list[str] = []
    problems: list[str] = []
    has_context = False
    for entry in entries or [_DEFAULT_KUBECONFIG]:
        expanded = os.path.expanduser(entry)
        problem = _kubeconfig_problem(expanded)
        if problem == "missing":
            problems.append(f"{expanded} (missing)")
            continue
        found.append(expanded)
        if problem is None:
            has_context = True
        else:
            problems.append(f"{expanded} ({problem})")
    if has_context:
        return ":".join(found)
    if settings.kubernetes_service_host:
        why = "the in-cluster service account is not used because KUBECONFIG is set"
    else:
        why = "no in-cluster configuration either: KUBERNETES_SERVICE_HOST is unset"
    tried = "kubeconfig " if len(problems) == 1 else "kubeconfigs "
    raise KubeConfigError(f"no usable {tried}{', '.join(problems)}; {why}")


def _kubeconfig_problem(path: str) -> str | None:
    """What keeps the kubeconfig at `path` from giving a context, or None if it names one."""
    if not os.path.exists(path):
        return "missing"
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except IsADirectoryError:
        return "a directory, not a file"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    except (yaml.YAMLError, UnicodeDecodeError):
        return "not YAML"
    if document is None:
        return "empty"
    if not isinstance(document, dict):
        return "not a YAML mapping"
    if not document.get("current-context"):
        return "no current-context"
    return None


async def call_json(method: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Call a generated API method and return the decoded JSON body.

    The generated models are skipped (`_preload_content=False`): callers get
    the API's own JSON (camelCase keys), which is cheaper to build and what
    the informer caches. A non-2xx answer raises `ApiException` with `status`
    and `body` set, like the generated client does.
    """
    response = await method(*args, _preload_content=False, **kwargs)
    try:
        body = await response.read()
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        error = ApiException(status=response.status, reason=response.reason)
        error.body = body.decode("utf-8", errors="replace")
        raise error
    return json.loads(body)


def api_status(error: BaseException) -> int | None:
    """The HTTP status of an `ApiException` (None for anything else, or no status)."""
    if isinstance(error, ApiException) and isinstance(error.status, int):
        return error.status
    return None
