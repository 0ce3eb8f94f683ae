"""The kopf side of the operator: which watch events go where, and how kopf logs in.

Only ``@kopf.on.event`` handlers, on purpose. kopf's change handlers (create/update/resume,
timers, deletion handlers) persist their progress and a diff base on every object they
handle (``kopf.zalando.org/*`` annotations or ``status.kopf``), and put kopf's own
finalizer on it: writes on objects whose status belongs to GKM's schema, and a finalizer
name kopf fixes for all resources while GKM has one per kind. Event handlers write
nothing. Every decision rests on the objects themselves instead: ``metadata.generation``
against the resolution, the stored status against the wanted one, GKM's finalizers by
JSON patch (`controller.CacheController`). kopf still does what it is good at: the
list+watch of five resources with reconnects, per-object batching of event bursts, and
the login.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
from kubernetes_asyncio.client import Configuration

from gpufleet.kcache.cluster import CACHE_RESOURCES, GROUP, NODE_RESOURCES, VERSION
from gpufleet.kcache.operator.controller import CacheController

__all__ = ["build_registry", "connection_info", "operator_settings"]


async def connection_info(configuration: Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the `kubernetes_asyncio` configuration gpufleet connected with.

    One source of truth: ``KUBECONFIG`` or the in-cluster service account, read once by
    `gpufleet.kube.client.connect`, serve both clients.
    """
    header: Any = configuration.get_api_key_with_prefix("BearerToken") or (
        configuration.get_api_key_with_prefix("authorization")
    )
    if inspect.isawaitable(header):
        header = await header
    scheme, token = None, None
    if isinstance(header, str) and header:
        parts = header.split(" ", 1)
        scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        proxy_url=configuration.proxy,
    )


def operator_settings() -> kopf.OperatorSettings:
    """kopf's settings for this operator: standalone, quiet, no writes of its own."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True  # leader election is gpufleet's Lease, not kopf's peering
    settings.posting.enabled = False  # Events come from the controller, about decisions only
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    return settings


def build_registry(
    controller: CacheController, login: Callable[[], Awaitable[kopf.ConnectionInfo]]
) -> kopf.OperatorRegistry:
    """A fresh kopf registry whose handlers feed `controller` (no global registry)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def _login(**_: Any) -> kopf.ConnectionInfo:
        return await login()

    # Coroutines, not plain functions: kopf runs those in a thread, away from the loop.
    async def on_cache(event: kopf.RawEvent, **_: Any) -> None:
        controller.cache_event(event.get("type"), event["object"])

    async def on_node_object(event: kopf.RawEvent, **_: Any) -> None:
        controller.node_object_event(event.get("type"), event["object"])

    async def on_node(event: kopf.RawEvent, **_: Any) -> None:
        controller.node_event(event.get("type"), event["object"])

    for resource in CACHE_RESOURCES:
        kopf.on.event(GROUP, VERSION, resource.plural, registry=registry, id=resource.plural)(
            on_cache
        )
    for resource in NODE_RESOURCES:
        kopf.on.event(GROUP, VERSION, resource.plural, registry=registry, id=resource.plural)(
            on_node_object
        )
    kopf.on.event("v1", "nodes", registry=registry, id="nodes")(on_node)
    return registry
