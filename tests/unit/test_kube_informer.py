"""The informer's list/watch/relist logic against a scripted list function (no server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import pytest

from gpufleet.core.retry import Backoff
from gpufleet.kube.watch import Informer, KubeObject


def pod(name: str, rv: str, *, phase: str = "Running") -> KubeObject:
    return {
        "metadata": {"name": name, "namespace": "gpu", "resourceVersion": rv},
        "status": {"phase": phase},
    }


def event(kind: str, obj: KubeObject) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def bookmark(rv: str) -> bytes:
    return event("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": rv}})


def expired_event() -> bytes:
    status = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410}
    return event("ERROR", status)


class FakeContent:
    def __init__(self, lines: Iterable[bytes | BaseException]) -> None:
        self._lines = list(lines)

    async def readline(self) -> bytes:
        if not self._lines:
            return b""
        item = self._lines.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class FakeResponse:
    def __init__(self, status: int, body: bytes = b"", lines: Iterable[bytes | BaseException] = ()):
        self.status = status
        self.reason = "OK" if status == 200 else "Error"
        self._body = body
        self.content = FakeContent(lines)

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class ScriptedLister:
    """Answers lists from `lists` (the last one repeats) and watches from `watches`.

    When the watch script runs out, a watch blocks until the test ends, like
    a quiet server would.
    """

    __name__ = "list_namespaced_pod"

    def __init__(self) -> None:
        self.lists: list[tuple[list[KubeObject], str]] = []
        self.watches: list[FakeResponse] = []
        self.calls: list[dict[str, Any]] = []
        self.idle = asyncio.Event()

    def list_count(self) -> int:
        return sum(1 for call in self.calls if not call.get("watch"))

    def watch_versions(self) -> list[str | None]:
        return [call.get("resource_version") for call in self.calls if call.get("watch")]

    async def __call__(self, *args: Any, **kwargs: Any) -> FakeResponse:
        assert args == ("gpu",)
        self.calls.append(kwargs)
        if kwargs.get("watch"):
            if not self.watches:
                self.idle.set()
                await asyncio.Event().wait()
            return self.watches.pop(0)
        items, rv = self.lists.pop(0) if len(self.lists) > 1 else self.lists[0]
        body = {"kind": "PodList", "metadata": {"resourceVersion": rv}, "items": items}
        return FakeResponse(200, json.dumps(body).encode())


class Recorder:
    def __init__(self, informer: Informer) -> None:
        self.events: list[tuple[str, str, str]] = []
        informer.on_add(self.add)
        informer.on_update(self.update)
        informer.on_delete(self.delete)

    async def add(self, obj: KubeObject) -> None:
        self.events.append(("add", obj["metadata"]["name"], obj["metadata"]["resourceVersion"]))

    async def update(self, old: KubeObject, new: KubeObject) -> None:
        self.events.append(("update", new["metadata"]["name"], new["metadata"]["resourceVersion"]))

    async def delete(self, obj: KubeObject) -> None:
        self.events.append(("delete", obj["metadata"]["name"], obj["metadata"]["resourceVersion"]))


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def lister() -> ScriptedLister:
    return ScriptedLister()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def informer(lister: ScriptedLister, sleeps: Sleeps) -> Informer:
    return Informer(
        lister,
        namespace="gpu",
        label_selector="app=nvidia-device-plugin",
        backoff=Backoff(initial=0.5, jitter=0.0),
        sleep=sleeps,
    )


async def run_until_idle(informer: Informer, lister: ScriptedLister) -> None:
    """Run the informer until it has used up the watch script, then stop it."""
    task = asyncio.create_task(informer.run())
    try:
        async with asyncio.timeout(5):
            await lister.idle.wait()
    finally:
        await informer.stop()
        await task


async def test_first_list_fills_the_cache_and_announces_adds(
    informer: Informer, lister: ScriptedLister
) -> None:
    lister.lists = [([pod("a", "5"), pod("b", "6")], "10")]
    recorder = Recorder(informer)

    await run_until_idle(informer, lister)

    assert informer.synced.is_set()
    assert recorder.events == [("add", "a", "5"), ("add", "b", "6")]
    assert informer.get("gpu", "a") == pod("a", "5")


async def test_watch_starts_from_the_list_version_with_bookmarks(
    informer: Informer, lister: ScriptedLister
) -> None:
    lister.lists = [([], "10")]

    await run_until_idle(informer, lister)

    watch = next(call for call in lister.calls if call.get("watch"))
    assert watch["resource_version"] == "10"
    assert watch["allow_watch_bookmarks"] is True
    assert watch["timeout_seconds"] == 300
    assert watch["label_selector"] == "app=nvidia-device-plugin"


async def test_watch_events_update_the_cache_and_reach_handlers(
    informer: Informer, lister: ScriptedLister
) -> None:
    lister.lists = [([pod("a", "5")], "10")]
    lister.watches = [
        FakeResponse(
            200,
            lines=[
                event("ADDED", pod("b", "11")),
                event("MODIFIED", pod("a", "12", phase="Failed")),
                event("DELETED", pod("b", "13")),
            ],
        )
    ]
    recorder = Recorder(informer)

    await run_until_idle(informer, lister)

    assert recorder.events[1:] == [("add", "b", "11"), ("update", "a", "12"), ("delete", "b", "13")]
    assert [obj["metadata"]["name"] for obj in informer.items()] == ["a"]


async def test_a_dropped_stream_resumes_from_the_last_version_without_relisting(
    informer: Informer, lister: ScriptedLister
) -> None:
    lister.lists = [([], "10")]
    lister.watches = [
        FakeResponse(200, lines=[event("ADDED", pod("a", "11")), bookmark("15")]),
        FakeResponse(200, lines=[event("ADDED", pod("b", "16")), ConnectionResetError()]),
        FakeResponse(200, lines=[event("ADDED", pod("b", "16")), event("ADDED", pod("c", "17"))]),
    ]
    recorder = Recorder(informer)

    await run_until_idle(informer, lister)

    assert lister.list_count() == 1
    assert lister.watch_versions() == ["10", "15", "16", "17"]
    # The replayed ADDED for b at the same version is not announced twice.
    assert recorder.events == [("add", "a", "11"), ("add", "b", "16"), ("add", "c", "17")]


@pytest.mark.parametrize("how", ["error event", "http status"])
async def test_410_relists_and_announces_only_real_differences(
    informer: Informer, lister: ScriptedLister, how: str
) -> None:
    before = [pod("same", "5"), pod("changes", "6"), pod("goes", "7")]
    after = [pod("same", "5"), pod("changes", "20", phase="Failed"), pod("new", "21")]
    lister.lists = [(before, "10"), (after, "30")]
    gone = FakeResponse(200, lines=[expired_event()]) if how == "error event" else FakeResponse(410)
    lister.watches = [gone]
    recorder = Recorder(informer)

    await run_until_idle(informer, lister)

    assert recorder.events[3:] == [
        ("update", "changes", "20"),
        ("add", "new", "21"),
        ("delete", "goes", "7"),
    ]
    assert lister.watch_versions() == ["10", "30"]


async def test_other_errors_back_off_and_resume_from_the_same_version(
    informer: Informer, lister: ScriptedLister, sleeps: Sleeps
) -> None:
    lister.lists = [([], "10")]
    lister.watches = [FakeResponse(500), FakeResponse(500), FakeResponse(200)]

    await run_until_idle(informer, lister)

    assert sleeps.delays[:2] == [0.5, 1.0]
    assert lister.list_count() == 1
    assert set(lister.watch_versions()) == {"10"}


async def test_a_failing_handler_does_not_stop_the_informer(
    informer: Informer, lister: ScriptedLister
) -> None:
    lister.lists = [([pod("a", "5"), pod("b", "6")], "10")]
    seen: list[str] = []

    @informer.on_add
    async def explode_on_a(obj: KubeObject) -> None:
        if obj["metadata"]["name"] == "a":
            raise RuntimeError("boom")
        seen.append(obj["metadata"]["name"])

    await run_until_idle(informer, lister)

    assert seen == ["b"]


async def test_resync_reannounces_cached_objects_as_updates(lister: ScriptedLister) -> None:
    lister.lists = [([pod("a", "5")], "10")]
    informer = Informer(lister, namespace="gpu", resync=0.01)
    resynced = asyncio.Event()

    @informer.on_update
    async def updated(old: KubeObject, new: KubeObject) -> None:
        if old is new:
            resynced.set()

    task = asyncio.create_task(informer.run())
    async with asyncio.timeout(5):
        await resynced.wait()
    await informer.stop()
    await task


async def test_cancelling_run_propagates(informer: Informer, lister: ScriptedLister) -> None:
    lister.lists = [([], "10")]
    task = asyncio.create_task(informer.run())
    await lister.idle.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
