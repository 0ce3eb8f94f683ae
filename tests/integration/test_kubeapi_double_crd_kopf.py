"""A tiny real kopf 1.45 operator against ``KubeApiDouble``: what kopf sends is served.

``kopf.operator(standalone=True, clusterwide=True)`` runs in a thread with its
own loop, as ``kopf.testing.KopfRunner`` runs it (kopf cancels every task of
its loop that it did not find there when it started, the test's teardown
included), logged in to the double through a login handler, with handlers on a
custom resource. Each test is one thing an operator relies on: discovery and the CRD
watch, kopf's finalizer, its JSON and merge patches of the object and of
``/status``, its progress annotations, and the Events it posts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
import pytest
from kubernetes_asyncio.client import ApiClient, CustomObjectsApi

from tests.doubles.kubeapi import KubeApiDouble
from tests.integration.kubeapi_double_support import GROUP, VERSION, cache, cache_crd
from tests.polling import eventually

pytestmark = pytest.mark.integration

NS = "team-a"
KIND = f"gkmcaches.{GROUP}"
DIGEST = "sha256:" + "d" * 64
MERGE = "application/merge-patch+json"
LIMIT = 20.0
"""Seconds before a wait fails as a hang (kopf starts, lists, watches, patches)."""


@dataclass
class Operator:
    """The running operator: what its handlers saw, and the API to the double."""

    api: KubeApiDouble
    custom: CustomObjectsApi
    calls: list[tuple[str, Any]] = field(default_factory=list)
    failures_left: int = 0
    annotations_on_retry: list[dict[str, str]] = field(default_factory=list)
    """The annotations kopf's retry saw: they came back to it through the watch."""
    crashed: list[BaseException] = field(default_factory=list)


async def until(check: Callable[[], bool]) -> None:
    """Wait for ``check()``; fails as a hang after `LIMIT` seconds."""
    await eventually(check, limit=LIMIT)


def resolved(op: Operator, name: str) -> bool:
    """Whether the object's status carries the digest the create handler writes."""
    return stored(op, name).get("status", {}).get("resolvedDigest") == DIGEST


def registry_for(state: Operator) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    api = state.api

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=api.url, insecure=True, default_namespace="kcache")

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.server_timeout = 30
        settings.posting.level = 0

    @kopf.on.create(GROUP, VERSION, "gkmcaches", id="resolve", registry=registry)
    def resolve(body: Any, spec: Any, patch: Any, retry: int, **_: Any) -> None:
        if state.failures_left > 0:
            state.failures_left -= 1
            raise kopf.TemporaryError("registry down", delay=0.1)
        if retry:
            state.annotations_on_retry.append(dict(body["metadata"]["annotations"]))
        state.calls.append(("create", spec["image"]))
        patch.status["resolvedDigest"] = DIGEST
        patch.metadata.annotations["gkm.io/resolvedDigest"] = DIGEST
        kopf.info(body, reason="Resolved", message=f"{spec['image']} is {DIGEST}")

    # Without field="spec" the handler would also run for the annotation written above:
    # kopf diffs labels and annotations too.
    @kopf.on.update(GROUP, VERSION, "gkmcaches", field="spec", id="reresolve", registry=registry)
    def reresolve(meta: Any, **_: Any) -> None:
        state.calls.append(("update", meta["generation"]))

    @kopf.on.delete(GROUP, VERSION, "gkmcaches", id="release", registry=registry)
    def release(name: str, **_: Any) -> None:
        state.calls.append(("delete", name))

    return registry


@contextlib.asynccontextmanager
async def running_operator(
    *, namespaces: tuple[str, ...] = (), before: Callable[[KubeApiDouble], None] = lambda _: None
) -> AsyncIterator[Operator]:
    """A double with the cache CRD and kopf running against it (cluster-wide by default)."""
    async with (
        KubeApiDouble(bookmark_interval=0.5) as api,
        ApiClient(api.client_configuration()) as client,
    ):
        api.add_crd(cache_crd())
        before(api)
        state = Operator(api, CustomObjectsApi(client))
        registry = registry_for(state)
        stop = threading.Event()

        def run() -> None:
            try:
                asyncio.run(
                    kopf.operator(
                        registry=registry,
                        standalone=True,
                        clusterwide=not namespaces,
                        namespaces=namespaces,
                        stop_flag=stop,
                    )
                )
            except BaseException as exc:  # the test sees it in state.crashed
                state.crashed.append(exc)

        thread = threading.Thread(target=run, name="kopf", daemon=True)
        thread.start()
        try:
            await until(lambda: api.count(verb="watch", resource="gkmcaches") > 0)
            yield state
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 20)
        assert not thread.is_alive()
        assert state.crashed == []


@pytest.fixture
async def operator() -> AsyncIterator[Operator]:
    async with running_operator() as state:
        yield state


async def create(op: Operator, name: str) -> None:
    await op.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "gkmcaches", cache(name))


def stored(op: Operator, name: str) -> dict[str, Any]:
    return op.api.get(KIND, NS, name) or {}


async def test_kopf_discovers_the_crd_and_watches_it_cluster_wide(operator: Operator) -> None:
    api = operator.api
    watches = [r for r in api.requests if r.verb == "watch"]

    assert {r.resource for r in watches} >= {"gkmcaches", "customresourcedefinitions"}
    assert all(r.params.get("allowWatchBookmarks") == "true" for r in watches)
    assert all(r.namespace is None for r in watches)
    assert api.count(verb="list", resource="namespaces") == 0  # clusterwide: none needed


async def test_a_create_handler_runs_and_its_status_patch_lands(operator: Operator) -> None:
    await create(operator, "c1")
    await until(lambda: resolved(operator, "c1"))
    await until(lambda: bool(operator.api.events(NS)))

    obj = stored(operator, "c1")
    assert operator.calls == [("create", cache("c1")["spec"]["image"])]  # no update for it
    assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
    assert obj["metadata"]["annotations"]["gkm.io/resolvedDigest"] == DIGEST
    assert "kopf.zalando.org/last-handled-configuration" in obj["metadata"]["annotations"]
    assert operator.api.count(verb="patch", resource="gkmcaches", subresource="status") >= 1
    event = operator.api.events(NS)[0]
    assert (event["reason"], event["involvedObject"]["name"]) == ("Resolved", "c1")
    assert event["involvedObject"]["uid"] == obj["metadata"]["uid"]


async def test_an_update_handler_sees_the_generation_bump(operator: Operator) -> None:
    await create(operator, "c1")
    await until(lambda: ("create", cache("c1")["spec"]["image"]) in operator.calls)
    await until(
        lambda: (
            "kopf.zalando.org/last-handled-configuration"
            in stored(operator, "c1")["metadata"].get("annotations", {})
        ),
    )
    await operator.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        "gkmcaches",
        "c1",
        {"spec": {"image": "registry.example/caches/vector-add:v2"}},
        _content_type=MERGE,
    )
    await until(lambda: any(c[0] == "update" for c in operator.calls))

    assert ("update", 2) in operator.calls


async def test_a_finalizer_holds_the_object_until_the_delete_handler_ran(
    operator: Operator,
) -> None:
    await create(operator, "c1")
    await until(lambda: bool(stored(operator, "c1")["metadata"].get("finalizers")))
    deleted = await operator.custom.delete_namespaced_custom_object(
        GROUP, VERSION, NS, "gkmcaches", "c1"
    )
    await until(lambda: operator.api.get(KIND, NS, "c1") is None)

    assert deleted["metadata"]["deletionTimestamp"]
    assert ("delete", "c1") in operator.calls


async def test_a_retried_handler_leaves_progress_annotations_then_purges_them(
    operator: Operator,
) -> None:
    operator.failures_left = 1
    await create(operator, "c1")
    await until(lambda: bool(operator.annotations_on_retry))
    await until(lambda: resolved(operator, "c1"))
    await until(
        lambda: "kopf.zalando.org/resolve" not in stored(operator, "c1")["metadata"]["annotations"],
    )

    during = operator.annotations_on_retry[0]
    assert '"retries":1' in during["kopf.zalando.org/resolve"]
    assert '"message":"registry down"' in during["kopf.zalando.org/resolve"]


async def test_kopf_with_namespace_patterns_lists_and_watches_namespaces() -> None:
    def namespaces(api: KubeApiDouble) -> None:
        api.add_namespace(NS)
        api.add_namespace("other")

    async with running_operator(namespaces=("team-*",), before=namespaces) as op:
        await op.custom.create_namespaced_custom_object(
            GROUP, VERSION, "other", "gkmcaches", cache("elsewhere")
        )
        await create(op, "c1")
        await until(lambda: resolved(op, "c1"))
        api = op.api
        watched = {
            r.namespace for r in api.requests if r.verb == "watch" and r.resource == "gkmcaches"
        }

        assert api.count(verb="list", resource="namespaces") >= 1
        assert api.count(verb="watch", resource="namespaces") >= 1
        assert watched == {NS}
        assert [c[0] for c in op.calls] == ["create"]
