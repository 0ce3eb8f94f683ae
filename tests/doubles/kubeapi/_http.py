"""The HTTP face of the double: routing, REST verbs, watch streams, exec, accounting.

kmock's ``KubernetesScaffold`` is the aiohttp handler (``_discovery.KmockHandler``):
it serves discovery (``/api``, ``/apis``, ``/version``) and answers every path
we do not serve with a 404 ``metav1.Status``. Requests for the resources we emulate are answered
here before kmock sees them, because kmock's reaction lookup walks every past
request (it keeps them all for assertions), which is quadratic over a
5,000-pod benchmark, and because its emulator has no resourceVersions.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.doubles.kubeapi._authz import Authorizer
from tests.doubles.kubeapi._exec import ExecHandler, ExecRequest, exec_target, serve_exec
from tests.doubles.kubeapi._objects import (
    PODS,
    SUBJECT_ACCESS_REVIEWS,
    ApiError,
    Cause,
    ResourceType,
    from_wire,
    status_body,
    to_wire,
)
from tests.doubles.kubeapi._patch import STRATEGIC_MERGE_PATCH, apply_patch
from tests.doubles.kubeapi._selectors import Selector
from tests.doubles.kubeapi._store import Store
from tests.doubles.kubeapi._watch import pump

_log = logging.getLogger(__name__)

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/(?:namespaces/(?P<ns>[^/]+)/)?(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?/?$"
)
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the double saw it; ``time`` is ``time.monotonic()`` at arrival.

    ``verb`` is the Kubernetes verb: get, list, watch, create, update, patch,
    delete or exec (for paths the double does not emulate, the HTTP method).
    """

    time: float
    method: str
    path: str
    verb: str
    resource: str | None
    namespace: str | None
    name: str | None
    subresource: str | None
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Route:
    resource: ResourceType
    """As served at the version the request names (the store keeps its storage version)."""
    namespace: str | None
    name: str | None
    subresource: str | None
    verb: str


def truthy(value: str | None) -> bool:
    """Query booleans: kubernetes_asyncio sends ``True``, Go clients send ``true``."""
    return (value or "").lower() in ("true", "1")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


class ApiFront:
    """Answers the emulated resources over HTTP from a ``Store``.

    ``served`` is every (resource, version) answered; a version not in it is
    left to kmock, which answers 404 as a server that does not serve it.
    """

    def __init__(
        self,
        store: Store,
        *,
        served: Iterable[ResourceType],
        exec_handler: Callable[[], ExecHandler],
        authorizer: Authorizer,
        bookmark_interval: float,
        stopping: asyncio.Event,
    ) -> None:
        self.store = store
        self._served = {(r.group, r.version, r.plural): r for r in served}
        self.requests: list[RecordedRequest] = []
        self.exec_by_uid: collections.Counter[str] = collections.Counter()
        self._exec_handler = exec_handler
        self._authorizer = authorizer
        self._bookmark_interval = bookmark_interval
        self._stopping = stopping

    def serve(self, resource: ResourceType) -> None:
        """Answer ``resource`` (at ``resource.version``) from now on."""
        self._served[(resource.group, resource.version, resource.plural)] = resource

    def served(self) -> list[ResourceType]:
        """Every (resource, version) answered now."""
        return list(self._served.values())

    def unserve(self, resource: ResourceType) -> None:
        """Stop answering ``resource`` at ``resource.version``: kmock answers 404."""
        self._served.pop((resource.group, resource.version, resource.plural), None)

    async def __call__(self, raw_request: web.BaseRequest) -> web.StreamResponse | None:
        """Record the request; answer it if it addresses an emulated resource."""
        route = _route(raw_request, self._served)
        self.requests.append(
            RecordedRequest(
                time=time.monotonic(),
                method=raw_request.method,
                path=raw_request.path,
                verb=route.verb if route else raw_request.method.lower(),
                resource=route.resource.plural if route else None,
                namespace=route.namespace if route else None,
                name=route.name if route else None,
                subresource=route.subresource if route else None,
                params=dict(raw_request.query),
            )
        )
        if route is None:
            return None
        try:
            return await self._serve(raw_request, route)
        except ApiError as err:
            return _json(err.status(), err.code)
        except Exception as exc:  # answer as the server would, and let the test see the log
            _log.exception("kube API double failed", extra={"path": raw_request.path})
            return _json(status_body(500, "InternalError", f"double failed: {exc!r}"), 500)

    async def _serve(self, raw: web.BaseRequest, route: _Route) -> web.StreamResponse:
        wire, namespace, name, sub = (
            route.resource,
            route.namespace,
            route.name,
            route.subresource,
        )
        # The store keeps one version of each resource; `wire` is the one asked for.
        resource = wire.stored
        params = raw.query
        if resource is SUBJECT_ACCESS_REVIEWS:
            if route.verb != "create" or name is not None:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            return _json(self._authorizer.review(_check_kind(wire, await _body(raw))), 201)
        if (resource.namespaced and name is not None and namespace is None) or (
            not resource.namespaced and namespace is not None
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub is not None and sub not in resource.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        store = self.store
        match route.verb:
            case "list":
                limit = _int(params.get("limit", "0"), "limit")
                store.check_list_version(
                    params.get("resourceVersion", ""),
                    params.get("resourceVersionMatch", ""),
                    continue_token=params.get("continue", ""),
                    limit=limit,
                )
                body = store.list_objects(
                    resource,
                    namespace,
                    _selector(resource, params),
                    limit=limit,
                    continue_token=params.get("continue", ""),
                )
                body["apiVersion"] = wire.api_version
                body["items"] = [to_wire(wire, obj) for obj in body["items"]]
                return _json(body)
            case "watch":
                return await self._watch(raw, resource, wire, namespace, name)
            case "get":
                assert name is not None
                return _json(to_wire(wire, store.require(resource, namespace, name)))
            case "create" if name is None:
                body = _check_kind(wire, await _body(raw))
                if resource.custom and "status" in resource.subresources:
                    body.pop("status", None)  # status is reset on create where it is its own
                created = store.create(resource, namespace, from_wire(wire, body))
                return _json(to_wire(wire, created), 201)
            case "update" if name is not None:
                body = from_wire(wire, _check_kind(wire, await _body(raw)))
                if resource.custom and not (body.get("metadata") or {}).get("resourceVersion"):
                    raise ApiError.invalid(  # custom resources allow no unconditional update
                        wire,
                        name,
                        [
                            Cause(
                                "metadata.resourceVersion",
                                "FieldValueInvalid",
                                "Invalid value: 0x0: must be specified for an update",
                            )
                        ],
                    )
                return _json(
                    to_wire(wire, store.replace(resource, namespace, name, body, subresource=sub))
                )
            case "patch" if name is not None:
                content_type = raw.headers.get("Content-Type", "")
                if resource.custom and content_type.startswith(STRATEGIC_MERGE_PATCH):
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types "
                        "include: application/json-patch+json, application/merge-patch+json, "
                        "application/apply-patch+yaml",
                    )
                patch = await raw.read()
                if wire == resource:
                    patched = store.patch(
                        resource, namespace, name, content_type, patch, subresource=sub
                    )
                else:  # the patch is written against the version the client speaks
                    current = to_wire(wire, store.require(resource, namespace, name))
                    body = from_wire(wire, apply_patch(content_type, current, patch))
                    patched = store.replace(resource, namespace, name, body, subresource=sub)
                return _json(to_wire(wire, patched))
            case "delete" if name is not None:
                options = await _body(raw, default={})
                preconditions = options.get("preconditions") if isinstance(options, dict) else None
                return _json(to_wire(wire, store.delete(resource, namespace, name, preconditions)))
            case "exec" if name is not None:
                return await self._exec(raw, namespace, name)
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )

    async def _watch(
        self,
        raw: web.BaseRequest,
        resource: ResourceType,
        wire: ResourceType,
        namespace: str | None,
        name: str | None,
    ) -> web.StreamResponse:
        params = raw.query
        selector = _selector(resource, params, name=name)
        timeout = params.get("timeoutSeconds")
        deadline = time.monotonic() + _int(timeout, "timeoutSeconds") if timeout else None
        bookmarks = truthy(params.get("allowWatchBookmarks"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        try:
            watcher = self.store.watch(
                resource, namespace, selector, params.get("resourceVersion", ""), wire=wire
            )
        except ApiError as err:  # the real server says 410 inside a 200 stream, then ends it
            await response.write(
                json.dumps({"type": "ERROR", "object": err.status()}).encode() + b"\n"
            )
            await response.write_eof()
            return response
        try:
            await pump(
                response,
                watcher,
                deadline=deadline,
                bookmark_interval=self._bookmark_interval if bookmarks else None,
                stopping=self._stopping,
                current_version=lambda: self.store.resource_version,
            )
            await response.write_eof()
        except ConnectionError:
            pass  # the client hung up
        finally:
            self.store.unwatch(watcher)
        return response

    async def _exec(
        self, raw: web.BaseRequest, namespace: str | None, name: str
    ) -> web.StreamResponse:
        pod = self.store.require(PODS, namespace, name)
        phase = pod.get("status", {}).get("phase", "")
        if phase in ("Succeeded", "Failed"):
            raise ApiError.bad_request(
                f"cannot exec into a container in a completed pod; current phase is {phase}"
            )
        node_name = pod.get("spec", {}).get("nodeName", "")
        if not node_name:
            raise ApiError.bad_request(f"pod {name} does not have a host assigned")
        try:
            container = exec_target(pod, raw.query)
        except ValueError as exc:
            raise ApiError.bad_request(str(exc)) from None
        command = raw.query.getall("command", [])
        if not command:
            raise ApiError.bad_request("you must specify at least 1 command")
        if not any(truthy(raw.query.get(s)) for s in ("stdin", "stdout", "stderr")):
            raise ApiError.bad_request("you must specify at least 1 of stdin, stdout, stderr")
        if raw.headers.get("Upgrade", "").lower() != "websocket":
            raise ApiError.bad_request("Upgrade request required")
        uid = pod["metadata"]["uid"]
        self.exec_by_uid[uid] += 1
        request = ExecRequest(
            namespace=namespace or "",
            pod=name,
            container=container,
            command=list(command),
            node_name=node_name,
            pod_uid=uid,
        )
        return await serve_exec(raw, request, self._exec_handler(), self._stopping)


def _route(
    raw: web.BaseRequest, served: Mapping[tuple[str, str, str], ResourceType]
) -> _Route | None:
    match = _PATH.match(raw.path)
    if match is None:
        return None
    group, version = ("", "v1") if match["core"] else (match["group"], match["version"])
    resource = served.get((group, version, match["plural"]))
    if resource is None:
        return None
    name, sub = match["name"], match["sub"]
    if sub == "exec":
        verb = "exec"
    elif raw.method == "GET":
        verb = "watch" if truthy(raw.query.get("watch")) else "list" if name is None else "get"
    else:
        verb = _VERBS.get(raw.method, raw.method.lower())
    return _Route(resource, match["ns"], name, sub, verb)


def _selector(
    resource: ResourceType, params: Mapping[str, str], *, name: str | None = None
) -> Selector:
    fields = params.get("fieldSelector", "")
    if name is not None:  # a watch on a named URL watches that one object
        fields = ",".join(f for f in (fields, f"metadata.name={name}") if f)
    return Selector.parse(resource.plural, params.get("labelSelector", ""), fields)


def _check_kind(wire: ResourceType, body: Any) -> Any:
    """400 for a body of another apiVersion or kind than the URL's, as the real server says."""
    if not isinstance(body, dict):
        raise ApiError.bad_request("the body of the request must be a JSON object")
    version, kind = body.get("apiVersion"), body.get("kind")
    if version not in (None, "", wire.api_version):
        raise ApiError.bad_request(
            f"the API version in the data ({version}) does not match the expected API "
            f"version ({wire.api_version})"
        )
    if kind not in (None, "", wire.kind):
        raise ApiError.bad_request(
            f"the kind in the data ({kind}) does not match the expected kind ({wire.kind})"
        )
    return body


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError.bad_request(f"{what}: Invalid value: {text!r}") from None


async def _body(raw: web.BaseRequest, default: Any = None) -> Any:
    data = await raw.read()
    if not data:
        if default is not None:
            return default
        raise ApiError.bad_request("the request has no body")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ApiError.bad_request(
            f"the body of the request was in an unknown format: {exc}"
        ) from None
