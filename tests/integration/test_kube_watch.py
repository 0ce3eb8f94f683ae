"""The informer against the Kubernetes API double, through the real client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest
from aiohttp import web
from kubernetes_asyncio.client import Configuration

from gpufleet.core.retry import Backoff
from gpufleet.kube.client import Kube, KubeSettings, connect
from gpufleet.kube.identity import machine_id
from gpufleet.kube.watch import Informer, KubeObject
from tests.doubles.kubeapi import KubeApiDouble
from tests.polling import eventually

pytestmark = pytest.mark.integration

NS = "gpu-operator"
SELECTOR = "app=nvidia-device-plugin-daemonset"
LABELS = {"app": "nvidia-device-plugin-daemonset"}


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble(bookmark_interval=0.2) as double:
        yield double


class Events:
    """Every event an informer announced, as (kind, name, resourceVersion)."""

    def __init__(self, informer: Informer) -> None:
        self.seen: list[tuple[str, str, str]] = []
        informer.on_add(self._add)
        informer.on_update(self._update)
        informer.on_delete(self._delete)

    def _record(self, kind: str, obj: KubeObject) -> None:
        meta = obj["metadata"]
        self.seen.append((kind, meta["name"], meta["resourceVersion"]))

    async def _add(self, obj: KubeObject) -> None:
        self._record("add", obj)

    async def _update(self, old: KubeObject, new: KubeObject) -> None:
        self._record("update", new)

    async def _delete(self, obj: KubeObject) -> None:
        self._record("delete", obj)

    def names(self, kind: str) -> list[str]:
        return [name for seen_kind, name, _ in self.seen if seen_kind == kind]


KubeFactory = Callable[[web.Application], AbstractAsyncContextManager[Kube]]


@pytest.fixture
def kube_of() -> KubeFactory:
    """Serve an aiohttp app on loopback (a hostile API server) and connect a `Kube` to it."""

    @contextlib.asynccontextmanager
    async def serve(app: web.Application) -> AsyncIterator[Kube]:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        configuration = Configuration(host=f"http://127.0.0.1:{port}")
        try:
            kube = await connect(KubeSettings(qps=1000, burst=1000), configuration=configuration)
            async with kube:
                yield kube
        finally:
            await runner.cleanup()

    return serve


@pytest.fixture
async def informer(kube: Kube) -> AsyncIterator[Informer]:
    pods = Informer(
        kube.core.list_namespaced_pod,
        namespace=NS,
        label_selector=SELECTOR,
        backoff=Backoff(initial=0.05, cap=0.5),
    )
    task = asyncio.create_task(pods.run())
    yield pods
    await pods.stop()
    await task


def add_pod(api: KubeApiDouble, name: str) -> KubeObject:
    return api.add_pod(NS, name, node_name="node-1", labels=LABELS)


async def stream_is_live(api: KubeApiDouble, informer: Informer, probe: str) -> None:
    """Return once the informer's watch stream is open and delivering.

    `synced` only means the list is in; a fault injected before the watch
    connects would hit nothing. A new pod arriving proves the stream is live.
    """
    add_pod(api, probe)
    await eventually(lambda: informer.get(NS, probe) is not None)


async def test_informer_sees_adds_updates_and_deletes(
    api: KubeApiDouble, informer: Informer
) -> None:
    add_pod(api, "plugin-a")
    events = Events(informer)
    await informer.synced.wait()

    add_pod(api, "plugin-b")
    api.add_pod(NS, "unrelated", node_name="node-1", labels={"app": "other"})
    api.set_pod_ready(NS, "plugin-a", False)
    api.delete_pod(NS, "plugin-b")
    await eventually(lambda: events.names("delete") == ["plugin-b"])

    assert [(kind, name) for kind, name, _ in events.seen] == [
        ("add", "plugin-a"),
        ("add", "plugin-b"),
        ("update", "plugin-a"),
        ("delete", "plugin-b"),
    ]
    assert informer.get(NS, "plugin-b") is None
    cached = informer.get(NS, "plugin-a")
    assert cached is not None
    assert cached == api.get("pods", NS, "plugin-a")


async def test_resume_after_dropped_watches_misses_and_repeats_nothing(
    api: KubeApiDouble, informer: Informer
) -> None:
    add_pod(api, "plugin-a")
    events = Events(informer)
    await informer.synced.wait()

    for round_number in range(3):
        await stream_is_live(api, informer, f"probe-{round_number}")
        api.drop_watches()
        add_pod(api, f"plugin-{round_number}")
        api.set_pod_ready(NS, "plugin-a", round_number % 2 == 0)
        await eventually(lambda n=round_number: f"plugin-{n}" in events.names("add"))
    api.delete_pod(NS, "plugin-0")
    await eventually(lambda: events.names("delete") == ["plugin-0"])

    assert [name for name in events.names("add") if not name.startswith("probe")] == [
        "plugin-a",
        "plugin-0",
        "plugin-1",
        "plugin-2",
    ]
    assert events.names("update") == ["plugin-a"] * 3
    assert len(events.seen) == len(set(events.seen))
    assert api.count(verb="list", resource="pods") == 1
    assert api.count(verb="watch", resource="pods") >= 4


async def test_relist_after_410_announces_only_real_differences(
    api: KubeApiDouble, informer: Informer
) -> None:
    for name in ("same", "changes", "goes"):
        add_pod(api, name)
    await informer.synced.wait()
    await stream_is_live(api, informer, "probe")
    events = Events(informer)

    # All before the informer's task runs again: the stream ends, the changes
    # happen while it is away, and then their history is compacted, so
    # resuming answers 410 and only a relist can reveal them.
    api.drop_watches()
    changed = api.set_pod_ready(NS, "changes", False)
    new = add_pod(api, "new")
    api.delete_pod(NS, "goes")
    api.expire_history()
    # Three lists: the first, the one at the compacted version (410), the consistent one.
    await eventually(lambda: api.count(verb="list", resource="pods") == 3 and len(events.seen) == 3)
    await asyncio.sleep(0.2)  # room for any wrong extra announcement to show up

    assert sorted(events.seen) == sorted(
        [
            ("update", "changes", changed["metadata"]["resourceVersion"]),
            ("add", "new", new["metadata"]["resourceVersion"]),
            ("delete", "goes", events.seen[-1][2]),
        ]
    )
    names = {obj["metadata"]["name"] for obj in informer.items()}
    assert names == {"same", "changes", "new", "probe"}


async def test_bookmarks_advance_the_resume_version(api: KubeApiDouble, informer: Informer) -> None:
    add_pod(api, "plugin-a")
    await informer.synced.wait()
    listed = informer.resource_version
    api.add_node("unrelated-node")  # moves the server's version, not our pods

    await eventually(lambda: informer.resource_version != listed)

    assert int(informer.resource_version or 0) >= api.resource_version


async def test_a_node_informer_feeds_machine_identity(api: KubeApiDouble, kube: Kube) -> None:
    api.add_node("gpu-node-1", provider_id="aws:///us-east-1a/i-0abc1234def567890")
    api.add_node("kind-worker", provider_id="kind://docker/kind/kind-worker", system_uuid="ABC-1")
    nodes = Informer(kube.core.list_node)
    task = asyncio.create_task(nodes.run())
    await nodes.synced.wait()
    await nodes.stop()
    await task

    machines = {obj["metadata"]["name"]: machine_id(obj) for obj in nodes.items()}

    assert machines == {"gpu-node-1": "i-0abc1234def567890", "kind-worker": "abc-1"}


def pod_lists(api: KubeApiDouble) -> list[dict[str, str]]:
    """The parameters of every first page of a pod list, in order."""
    return [
        dict(r.params)
        for r in api.requests
        if r.verb == "list" and r.resource == "pods" and not r.params.get("continue")
    ]


async def test_the_first_list_is_served_from_the_watch_cache(
    api: KubeApiDouble, kube: Kube
) -> None:
    for n in range(5):
        add_pod(api, f"plugin-{n}")
    pods = Informer(
        kube.core.list_namespaced_pod, namespace=NS, label_selector=SELECTOR, page_size=2
    )
    task = asyncio.create_task(pods.run())
    try:
        await asyncio.wait_for(pods.synced.wait(), 10)
    finally:
        await pods.stop()
        await task
    assert len(pods) == 5
    assert [p.get("resourceVersion") for p in pod_lists(api)] == ["0"]
    assert api.etcd_list_count("pods") == 0  # every page came from the cache, none from etcd
    assert api.count(verb="list", resource="pods") == 3  # pages of 2: the limit still holds


async def test_a_relist_after_410_never_goes_back_to_version_0(
    api: KubeApiDouble, informer: Informer
) -> None:
    add_pod(api, "plugin-a")
    await informer.synced.wait()
    await stream_is_live(api, informer, "probe")
    held = informer.resource_version

    api.drop_watches()
    add_pod(api, "plugin-b")
    api.expire_history()
    await eventually(lambda: informer.get(NS, "plugin-b") is not None)

    # client-go's order: list at the version held (at least that fresh); that
    # read is compacted away (410), so a consistent read; never "0" again.
    versions = [p.get("resourceVersion", "") for p in pod_lists(api)]
    assert versions == ["0", held, ""]


async def test_a_pod_replaced_under_its_name_during_a_watch_gap_is_a_delete_and_an_add(
    api: KubeApiDouble, informer: Informer
) -> None:
    old = add_pod(api, "plugin-a")
    await informer.synced.wait()
    await stream_is_live(api, informer, "probe")
    by_uid: dict[str, str] = {}  # what a consumer keyed by UID (the exporter's PodIndex) holds

    async def added(obj: KubeObject) -> None:
        by_uid[obj["metadata"]["uid"]] = obj["metadata"]["name"]

    async def updated(before: KubeObject, after: KubeObject) -> None:
        by_uid[after["metadata"]["uid"]] = after["metadata"]["name"]

    async def deleted(obj: KubeObject) -> None:
        by_uid.pop(obj["metadata"]["uid"], None)

    informer.add_handlers(on_add=added, on_update=updated, on_delete=deleted)
    by_uid.update({obj["metadata"]["uid"]: obj["metadata"]["name"] for obj in informer.items()})
    events = Events(informer)

    # While the watch is away the pod is deleted and created again under its
    # name; the history is compacted, so only the relist shows the new UID.
    api.drop_watches()
    api.delete_pod(NS, "plugin-a")
    new = add_pod(api, "plugin-a")
    api.expire_history()
    await eventually(lambda: api.count(verb="list", resource="pods") == 3)  # the relist is in
    await asyncio.sleep(0.2)  # room for a wrong extra announcement

    assert [(kind, name) for kind, name, _ in events.seen] == [
        ("delete", "plugin-a"),
        ("add", "plugin-a"),
    ]
    assert old["metadata"]["uid"] not in by_uid
    assert by_uid[new["metadata"]["uid"]] == "plugin-a"
    cached = informer.get(NS, "plugin-a")
    assert cached is not None
    assert cached["metadata"]["uid"] == new["metadata"]["uid"]


async def test_an_etcd_restore_is_noticed_and_the_cache_becomes_the_restored_state(
    api: KubeApiDouble, informer: Informer, caplog: pytest.LogCaptureFixture
) -> None:
    add_pod(api, "kept")
    add_pod(api, "changed")
    backup = api.backup()
    await informer.synced.wait()
    api.set_pod_ready(NS, "changed", False)
    add_pod(api, "lost")  # written after the backup: the restore takes it away
    await eventually(lambda: informer.get(NS, "lost") is not None)
    events = Events(informer)

    api.restore(backup)  # versions go back; the watch held one the server never saw
    await eventually(lambda: informer.versions_went_back == 1 and informer.ready)
    add_pod(api, "after")  # gets a version the lost pod had
    await eventually(lambda: informer.get(NS, "after") is not None)

    assert {obj["metadata"]["name"] for obj in informer.items()} == {"kept", "changed", "after"}
    assert events.names("delete") == ["lost"]
    assert sorted(events.names("update")) == ["changed", "kept"]  # every object, to be sure
    assert informer.get(NS, "changed") == api.get("pods", NS, "changed")
    assert pod_lists(api)[-1].get("resourceVersion") is None  # a consistent read
    assert [r.levelname for r in caplog.records if "went backwards" in r.getMessage()] == [
        "WARNING"
    ]


async def test_an_informer_is_not_ready_while_it_relists_after_versions_went_backwards(
    kube_of: KubeFactory,
) -> None:
    """A hostile server: the watch's bookmark is older than the list, and the relist hangs."""
    relist = asyncio.Event()
    release = asyncio.Event()
    lists = 0

    async def pods(request: web.Request) -> web.StreamResponse:
        nonlocal lists
        if request.query.get("watch"):
            response = web.StreamResponse()
            await response.prepare(request)
            bookmark = {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                        "metadata": {"resourceVersion": "50"}}}  # fmt: skip
            await response.write(json.dumps(bookmark).encode() + b"\n")
            await release.wait()
            return response
        lists += 1
        if lists > 1:
            relist.set()
            await release.wait()
        body = {"kind": "PodList", "apiVersion": "v1", "items": [],
                "metadata": {"resourceVersion": "100" if lists == 1 else "50"}}  # fmt: skip
        return web.json_response(body)

    app = web.Application()
    app.router.add_get(f"/api/v1/namespaces/{NS}/pods", pods)
    async with kube_of(app) as kube:
        informer = Informer(kube.core.list_namespaced_pod, namespace=NS)
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(relist.wait(), 10)
            during = (informer.synced.is_set(), informer.ready)
            release.set()
            await eventually(lambda: informer.ready)
        finally:
            release.set()
            await informer.stop()
            await task
    assert during == (True, False)
    assert informer.versions_went_back == 1
