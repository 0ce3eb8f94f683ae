"""Discovery and kmock: the handler that answers the emulation first, then kmock.

kmock's ``KubernetesScaffold`` serves ``/api``, ``/apis``, ``/apis/<group>``
and ``/apis/<group>/<version>`` from the ``ResourceInfo`` the double declares
(`discovery_info`); `KmockHandler` orders each group's versions as the real
server does (GA, then beta, then alpha, newest first) so that clients such as
kopf pick the preferred version the real server would name.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import kmock
from aiohttp import web

from tests.doubles.kubeapi._objects import JsonObject, ResourceType


@attrs.define(kw_only=True)
class KmockHandler(kmock.KubernetesScaffold):
    """kmock's Kubernetes scaffold with our emulated resources answered first."""

    front: Callable[[web.BaseRequest], Awaitable[web.StreamResponse | None]]

    async def __call__(self, raw_request: web.BaseRequest) -> web.StreamResponse:
        """Serve from the emulation when it knows the path, else let kmock answer."""
        response = await self.front(raw_request)
        if response is not None:
            return response
        return await super().__call__(raw_request)

    async def _serve_apis(self, request: Any) -> Any:
        """``/apis``, each group's versions in the server's order of preference."""
        body = await super()._serve_apis(request)
        body["groups"] = [_preferring(group) for group in body["groups"]]
        return body

    async def _serve_group(self, request: Any) -> Any:
        """``/apis/<group>``, its versions in the server's order of preference."""
        return _preferring(await super()._serve_group(request))


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Sort key of Kubernetes' version priority: GA, then beta, then alpha, newest first.

    ``v10`` < ``v2`` < ``v1`` < ``v11beta2`` < ``v10beta3`` < ``v12alpha1`` < ``foo1``.
    """
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if match is None:
        return (3, 0, 0, version)
    stage = {None: 0, "beta": 1, "alpha": 2}[match[2]]
    return (stage, -int(match[1]), -int(match[3] or 0), version)


def _preferring(group: dict[str, Any]) -> dict[str, Any]:
    versions = sorted(group["versions"], key=lambda v: version_priority(v["version"]))
    return {**group, "versions": versions, "preferredVersion": versions[0]}


def discovery_info(resource: ResourceType, crd: JsonObject | None = None) -> kmock.ResourceInfo:
    """What discovery says of ``resource`` (names from its CRD, when it has one)."""
    names = (crd or {}).get("spec", {}).get("names", {})
    return kmock.ResourceInfo(
        kind=resource.kind,
        singular=names.get("singular") or resource.kind.lower(),
        namespaced=resource.namespaced,
        verbs=set(resource.verbs),
        shortnames=set(names.get("shortNames") or ()),
        categories=set(names.get("categories") or ()),
        subresources=set(resource.subresources),
    )
