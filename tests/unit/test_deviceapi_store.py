"""The device API store: Kubernetes writes, list+watch consistency, eviction, durability."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpufleet.deviceapi.errors import (
    AlreadyExistsError,
    CapacityError,
    ConflictError,
    ExpiredError,
    InvalidError,
    NotFoundError,
    WatcherEvictedError,
)
from gpufleet.deviceapi.persistence import StateFileError
from gpufleet.deviceapi.store import GpuStore
from gpufleet.deviceapi.v1alpha1 import gpu_pb2 as pb
from gpufleet.deviceapi.watcher import Watcher, WatcherClosedError

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ADDED, MODIFIED, DELETED = pb.WatchEvent.ADDED, pb.WatchEvent.MODIFIED, pb.WatchEvent.DELETED


class Clock:
    """A settable clock: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def new_gpu(name: str = "gpu-0", labels: dict[str, str] | None = None) -> pb.Gpu:
    return pb.Gpu(
        metadata=pb.ObjectMeta(name=name, labels=labels or {}),
        spec=pb.GpuSpec(uuid=f"GPU-{name}", product="NVIDIA H100 80GB HBM3", node="node-a"),
    )


def condition(type_: str = "Healthy", status: str = "True", **kw: object) -> pb.Condition:
    return pb.Condition(type=type_, status=status, **kw)


def with_conditions(gpu: pb.Gpu, *conditions: pb.Condition) -> pb.Gpu:
    out = pb.Gpu()
    out.CopyFrom(gpu)
    del out.status.conditions[:]
    out.status.conditions.extend(conditions)
    return out


def relabel(gpu: pb.Gpu, **labels: str) -> pb.Gpu:
    out = pb.Gpu()
    out.CopyFrom(gpu)
    out.metadata.labels.clear()
    out.metadata.labels.update(labels)
    return out


def drain(watcher: Watcher) -> list[tuple[int, str]]:
    """Queued events as (type, name) without waiting."""
    out = []
    while watcher.pending:
        event = watcher._queue.popleft()[1]
        out.append((event.type, event.object.metadata.name))
    return out


async def take(watcher: Watcher) -> list[pb.WatchEvent]:
    events = []
    while (event := await watcher.get(timeout=0)) is not None:
        events.append(event)
    return events


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> GpuStore:
    return GpuStore(clock=clock)


# -- create / get / list -------------------------------------------------------


def test_create_sets_server_fields(store: GpuStore) -> None:
    created = store.create(new_gpu())
    meta = created.metadata
    assert (bool(meta.uid), meta.generation, meta.creation_timestamp.ToDatetime(UTC)) == (
        True,
        1,
        T0,
    )


def test_create_of_an_existing_name_is_already_exists(store: GpuStore) -> None:
    store.create(new_gpu())
    with pytest.raises(AlreadyExistsError):
        store.create(new_gpu())


def test_create_beyond_max_gpus_is_capacity(clock: Clock) -> None:
    store = GpuStore(max_gpus=1, clock=clock)
    store.create(new_gpu("gpu-0"))
    with pytest.raises(CapacityError):
        store.create(new_gpu("gpu-1"))


@pytest.mark.parametrize("name", ["", "GPU-0", "gpu_0", "-gpu", "gpu-", "g" * 64, "gpu.0"])
def test_invalid_name_is_refused_naming_the_field(store: GpuStore, name: str) -> None:
    with pytest.raises(InvalidError, match=r"metadata\.name"):
        store.create(new_gpu(name))


def test_create_requires_spec_uuid(store: GpuStore) -> None:
    gpu = new_gpu()
    gpu.spec.uuid = ""
    with pytest.raises(InvalidError, match=r"spec\.uuid"):
        store.create(gpu)


def test_invalid_label_is_refused(store: GpuStore) -> None:
    with pytest.raises(InvalidError, match=r"metadata\.labels"):
        store.create(new_gpu(labels={"zone": "not valid!"}))


def test_get_of_a_missing_name_is_not_found(store: GpuStore) -> None:
    with pytest.raises(NotFoundError):
        store.get("gpu-9")


def test_returned_objects_are_copies(store: GpuStore) -> None:
    created = store.create(new_gpu())
    created.spec.product = "mutated"
    store.get("gpu-0").spec.product = "mutated"
    store.list().items[0].spec.product = "mutated"
    assert store.get("gpu-0").spec.product == "NVIDIA H100 80GB HBM3"


def test_list_filters_by_label_selector(store: GpuStore) -> None:
    store.create(new_gpu("gpu-0", {"zone": "a"}))
    store.create(new_gpu("gpu-1", {"zone": "b"}))
    assert [g.metadata.name for g in store.list("zone=b").items] == ["gpu-1"]


def test_list_carries_the_current_resource_version(store: GpuStore) -> None:
    store.create(new_gpu("gpu-0"))
    store.create(new_gpu("gpu-1"))
    assert store.list().resource_version == str(store.resource_version)


def test_list_with_a_malformed_selector_is_invalid(store: GpuStore) -> None:
    with pytest.raises(InvalidError, match="label selector"):
        store.list("zone in (a")


# -- resourceVersions and optimistic concurrency ---------------------------------


def test_every_write_gets_a_higher_resource_version(store: GpuStore) -> None:
    first = store.create(new_gpu("gpu-0"))
    second = store.create(new_gpu("gpu-1"))
    updated = store.update_status(with_conditions(first, condition()))
    deleted = store.delete("gpu-1")
    rvs = [int(o.metadata.resource_version) for o in (first, second, updated, deleted)]
    assert sorted(set(rvs)) == rvs  # strictly increasing across all kinds of write


def test_stale_update_is_a_conflict_naming_the_current_rv(store: GpuStore) -> None:
    stale = store.create(new_gpu())
    current = store.update_status(with_conditions(stale, condition()))
    with pytest.raises(
        ConflictError, match=f"current resourceVersion is {current.metadata.resource_version}"
    ):
        store.update_status(with_conditions(stale, condition(status="False")))


def test_update_without_resource_version_is_a_conflict(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    gpu.metadata.resource_version = ""
    gpu.spec.serial = "1650123456789"
    with pytest.raises(ConflictError, match="required"):
        store.update(gpu)


def test_non_decimal_resource_version_is_invalid(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    gpu.metadata.resource_version = "+1"
    with pytest.raises(InvalidError, match="resource_version"):
        store.update(gpu)


def test_update_of_a_missing_gpu_is_not_found(store: GpuStore) -> None:
    gpu = new_gpu()
    gpu.metadata.resource_version = "1"
    with pytest.raises(NotFoundError):
        store.update(gpu)


def test_update_with_another_uid_is_a_conflict(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    gpu.metadata.uid = "someone-else"
    gpu.spec.serial = "1650123456789"
    with pytest.raises(ConflictError, match="uid"):
        store.update(gpu)


# -- update vs update_status -----------------------------------------------------


def test_spec_change_increments_generation(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    gpu.spec.serial = "1650123456789"
    assert store.update(gpu).metadata.generation == 2


def test_label_change_keeps_generation(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    assert store.update(relabel(gpu, zone="a")).metadata.generation == 1


def test_status_change_keeps_generation(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    assert store.update_status(with_conditions(gpu, condition())).metadata.generation == 1


def test_update_ignores_status(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    gpu.spec.serial = "1650123456789"
    gpu.status.recommended_action = "RebootNode"
    assert store.update(gpu).status.recommended_action == ""


def test_update_status_ignores_spec_and_metadata(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    gpu.spec.product = "changed"
    gpu.metadata.labels["zone"] = "a"
    gpu.status.recommended_action = "ResetGpu"
    updated = store.update_status(gpu)
    assert (
        updated.spec.product,
        dict(updated.metadata.labels),
        updated.status.recommended_action,
    ) == (
        "NVIDIA H100 80GB HBM3",
        {},
        "ResetGpu",
    )


def test_uid_and_creation_timestamp_are_immutable(store: GpuStore, clock: Clock) -> None:
    gpu = store.create(new_gpu())
    before = (gpu.metadata.uid, gpu.metadata.creation_timestamp.seconds)
    gpu.metadata.creation_timestamp.seconds = 1
    gpu.spec.serial = "1650123456789"
    updated = store.update(gpu)
    assert (updated.metadata.uid, updated.metadata.creation_timestamp.seconds) == before


def test_no_op_update_keeps_the_resource_version(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    assert store.update(gpu).metadata.resource_version == gpu.metadata.resource_version


def test_no_op_status_update_emits_no_event(store: GpuStore) -> None:
    gpu = store.update_status(with_conditions(store.create(new_gpu()), condition()))
    watcher = store.watch(gpu.metadata.resource_version)
    store.update_status(gpu)
    assert watcher.pending == 0


# -- conditions ----------------------------------------------------------------


def test_last_transition_time_is_kept_when_status_is_unchanged(
    store: GpuStore, clock: Clock
) -> None:
    gpu = store.update_status(with_conditions(store.create(new_gpu()), condition(reason="Ok")))
    clock.now = T0 + timedelta(hours=1)
    later = store.update_status(with_conditions(gpu, condition(reason="StillOk", message="fine")))
    assert later.status.conditions[0].last_transition_time.ToDatetime(UTC) == T0


def test_last_transition_time_moves_when_status_changes(store: GpuStore, clock: Clock) -> None:
    gpu = store.update_status(with_conditions(store.create(new_gpu()), condition()))
    clock.now = T0 + timedelta(hours=1)
    later = store.update_status(with_conditions(gpu, condition(status="False")))
    assert later.status.conditions[0].last_transition_time.ToDatetime(UTC) == clock.now


def test_client_supplied_transition_time_is_kept_for_a_new_condition(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    sent = condition()
    sent.last_transition_time.FromDatetime(T0 - timedelta(days=1))
    updated = store.update_status(with_conditions(gpu, sent))
    assert updated.status.conditions[0].last_transition_time.ToDatetime(UTC) == T0 - timedelta(
        days=1
    )


def test_too_many_conditions_are_refused_on_update_status(clock: Clock) -> None:
    store = GpuStore(max_conditions=2, clock=clock)
    gpu = store.create(new_gpu())
    conditions = [condition(f"Check{i}") for i in range(3)]
    with pytest.raises(InvalidError, match="more than the 2"):
        store.update_status(with_conditions(gpu, *conditions))


def test_too_many_conditions_are_refused_on_create(clock: Clock) -> None:
    store = GpuStore(max_conditions=2, clock=clock)
    conditions = [condition(f"Check{i}") for i in range(3)]
    with pytest.raises(InvalidError, match="more than the 2"):
        store.create(with_conditions(new_gpu(), *conditions))


def test_duplicate_condition_types_are_refused(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    with pytest.raises(InvalidError, match="duplicate"):
        store.update_status(with_conditions(gpu, condition(), condition(status="False")))


def test_condition_status_must_be_true_false_or_unknown(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    with pytest.raises(InvalidError, match="not one of"):
        store.update_status(with_conditions(gpu, condition(status="Yes")))


# -- delete --------------------------------------------------------------------


def test_delete_carries_the_deletions_resource_version(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    deleted = store.delete("gpu-0")
    assert int(deleted.metadata.resource_version) == int(gpu.metadata.resource_version) + 1


def test_delete_with_a_stale_rv_precondition_is_a_conflict(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    store.update(relabel(gpu, zone="a"))
    with pytest.raises(ConflictError, match="precondition"):
        store.delete("gpu-0", resource_version=gpu.metadata.resource_version)


def test_delete_with_another_uid_is_a_conflict(store: GpuStore) -> None:
    store.create(new_gpu())
    with pytest.raises(ConflictError, match="uid"):
        store.delete("gpu-0", uid="not-the-uid")


def test_delete_of_a_missing_gpu_is_not_found(store: GpuStore) -> None:
    with pytest.raises(NotFoundError):
        store.delete("gpu-0")


def test_deleted_event_carries_the_deletions_resource_version(store: GpuStore) -> None:
    store.create(new_gpu())
    watcher = store.watch(str(store.resource_version))
    deleted = store.delete("gpu-0")
    assert (
        watcher._queue[0][1].object.metadata.resource_version == deleted.metadata.resource_version
    )


# -- watch -----------------------------------------------------------------------


async def test_watch_from_list_rv_sees_the_create_in_between(store: GpuStore) -> None:
    listed = store.list()
    store.create(new_gpu("gpu-0"))
    watcher = store.watch(listed.resource_version)
    events = await take(watcher)
    assert [(e.type, e.object.metadata.name) for e in events] == [(ADDED, "gpu-0")]


async def test_watch_replays_exactly_the_missed_events_in_order(store: GpuStore) -> None:
    gpu = store.create(new_gpu("gpu-0"))
    listed = store.list()
    store.create(new_gpu("gpu-1"))
    store.update(relabel(gpu, zone="a"))
    store.delete("gpu-1")
    events = await take(store.watch(listed.resource_version))
    rvs = [int(e.object.metadata.resource_version) for e in events]
    assert ([(e.type, e.object.metadata.name) for e in events], rvs) == (
        [(ADDED, "gpu-1"), (MODIFIED, "gpu-0"), (DELETED, "gpu-1")],
        list(range(int(listed.resource_version) + 1, store.resource_version + 1)),
    )


async def test_watch_then_live_events_follow_the_replay(store: GpuStore) -> None:
    listed = store.list()
    store.create(new_gpu("gpu-0"))
    watcher = store.watch(listed.resource_version)
    store.create(new_gpu("gpu-1"))
    names = [e.object.metadata.name for e in await take(watcher)]
    assert names == ["gpu-0", "gpu-1"]


@pytest.mark.parametrize("rv", ["", "0"])
async def test_watch_from_zero_sends_added_for_the_current_state(store: GpuStore, rv: str) -> None:
    store.create(new_gpu("gpu-1"))
    store.create(new_gpu("gpu-0"))
    events = await take(store.watch(rv))
    assert [(e.type, e.object.metadata.name) for e in events] == [
        (ADDED, "gpu-1"),
        (ADDED, "gpu-0"),
    ]


async def test_watch_at_the_current_rv_with_empty_history_replays_nothing(store: GpuStore) -> None:
    watcher = store.watch(str(store.resource_version))
    assert await watcher.get(timeout=0) is None


def test_watch_from_an_rv_older_than_the_window_is_expired(clock: Clock) -> None:
    store = GpuStore(history=2, clock=clock)
    listed = store.list()
    for i in range(3):
        store.create(new_gpu(f"gpu-{i}"))
    with pytest.raises(ExpiredError, match="too old"):
        store.watch(listed.resource_version)


async def test_watch_from_the_oldest_rv_still_covered_replays(clock: Clock) -> None:
    store = GpuStore(history=2, clock=clock)
    store.create(new_gpu("gpu-0"))
    after_first = str(store.resource_version)
    store.create(new_gpu("gpu-1"))
    store.create(new_gpu("gpu-2"))
    names = [e.object.metadata.name for e in await take(store.watch(after_first))]
    assert names == ["gpu-1", "gpu-2"]


def test_watch_from_an_rv_newer_than_the_store_is_expired(store: GpuStore) -> None:
    with pytest.raises(ExpiredError, match="newer"):
        store.watch(str(store.resource_version + 5))


def test_watch_with_non_decimal_rv_is_invalid(store: GpuStore) -> None:
    with pytest.raises(InvalidError, match="resource_version"):
        store.watch("abc")


async def test_watch_get_times_out_with_none(store: GpuStore) -> None:
    watcher = store.watch()
    assert await watcher.get(timeout=0.01) is None


async def test_selector_watch_sees_added_when_an_object_starts_matching(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    watcher = store.watch(str(store.resource_version), "zone=a")
    store.update(relabel(gpu, zone="a"))
    assert drain(watcher) == [(ADDED, "gpu-0")]


async def test_selector_watch_sees_deleted_when_an_object_stops_matching(store: GpuStore) -> None:
    gpu = store.create(new_gpu(labels={"zone": "a"}))
    watcher = store.watch(str(store.resource_version), "zone=a")
    moved = store.update(relabel(gpu, zone="b"))
    event = watcher._queue[0][1]
    assert (event.type, event.object.metadata.resource_version) == (
        DELETED,
        moved.metadata.resource_version,
    )


def test_selector_watch_ignores_objects_that_never_match(store: GpuStore) -> None:
    watcher = store.watch("", "zone=a")
    store.create(new_gpu(labels={"zone": "b"}))
    assert watcher.pending == 0


def test_selector_replay_applies_the_transitions(store: GpuStore) -> None:
    gpu = store.create(new_gpu())
    since = str(store.resource_version)
    gpu = store.update(relabel(gpu, zone="a"))
    store.update(relabel(gpu, zone="b"))
    assert drain(store.watch(since, "zone=a")) == [(ADDED, "gpu-0"), (DELETED, "gpu-0")]


def test_stalled_watcher_is_evicted_and_writer_finishes(clock: Clock) -> None:
    store = GpuStore(watch_queue=10, clock=clock)
    stalled = store.watch()
    for i in range(50):
        store.create(new_gpu(f"gpu-{i}"))
    assert (store.gpu_count, stalled.evicted, store.evicted_total, store.watcher_count) == (
        50,
        True,
        1,
        0,
    )


async def test_evicted_watcher_get_raises_and_delivers_nothing_more(clock: Clock) -> None:
    store = GpuStore(watch_queue=2, clock=clock)
    watcher = store.watch()
    for i in range(3):
        store.create(new_gpu(f"gpu-{i}"))
    with pytest.raises(WatcherEvictedError):
        await watcher.get(timeout=0)


async def test_initial_burst_does_not_count_against_the_queue(clock: Clock) -> None:
    store = GpuStore(watch_queue=2, clock=clock)
    for i in range(5):
        store.create(new_gpu(f"gpu-{i}"))
    watcher = store.watch("0")
    store.create(new_gpu("gpu-5"))
    assert len(await take(watcher)) == 6


async def test_reader_waiting_in_get_is_woken_by_a_write(store: GpuStore) -> None:
    watcher = store.watch()
    waiting = asyncio.ensure_future(watcher.get())
    await asyncio.sleep(0)
    store.create(new_gpu())
    event = await asyncio.wait_for(waiting, 5)
    assert getattr(event, "object", None) == store.get("gpu-0")


async def test_closed_watcher_leaves_the_fan_out(store: GpuStore) -> None:
    watcher = store.watch()
    watcher.close()
    store.create(new_gpu())
    with pytest.raises(WatcherClosedError):
        await watcher.get(timeout=0)
    assert store.watcher_count == 0


def test_bookmark_when_caught_up_is_the_store_rv(store: GpuStore) -> None:
    watcher = store.watch()
    store.create(new_gpu())
    watcher._queue.clear()
    assert watcher.bookmark().object.metadata.resource_version == str(store.resource_version)


async def test_bookmark_while_the_initial_backlog_is_queued_is_refused(store: GpuStore) -> None:
    for i in range(3):
        store.create(new_gpu(f"gpu-{i}"))
    watcher = store.watch()
    # No resourceVersion is a safe resume point before the whole initial state is delivered.
    with pytest.raises(RuntimeError, match="initial"):
        watcher.bookmark()
    await watcher.get(timeout=0)
    with pytest.raises(RuntimeError, match="initial"):
        watcher.bookmark()


async def test_bookmark_after_the_initial_backlog_resumes_exactly_after_the_watch_start(
    store: GpuStore,
) -> None:
    for i in range(3):
        store.create(new_gpu(f"gpu-{i}"))
    store.delete("gpu-1")  # the store's RV is now past every object's
    watcher = store.watch()
    start = store.resource_version
    live = store.create(new_gpu("gpu-9"))
    initial = [await watcher.get(timeout=0) for _ in range(2)]
    assert [e.object.metadata.name for e in initial if e is not None] == ["gpu-0", "gpu-2"]
    bookmark = watcher.bookmark().object.metadata.resource_version
    assert bookmark == str(start)
    resumed = store.watch(resource_version=bookmark)
    replay = await resumed.get(timeout=0)
    assert replay is not None
    assert replay.object == live
    assert resumed.pending == 0


async def test_bookmark_after_an_initial_backlog_taken_in_a_batch_is_the_watch_start(
    store: GpuStore,
) -> None:
    store.create(new_gpu("gpu-0"))
    store.create(new_gpu("gpu-1"))
    store.delete("gpu-0")
    watcher = store.watch()
    start = store.resource_version
    store.create(new_gpu("gpu-2"))
    assert len(await watcher.take(1, 1 << 20, timeout=0)) == 1
    assert watcher.bookmark().object.metadata.resource_version == str(start)


def test_object_bytes_follow_every_write_and_the_cap_refuses_only_growth(clock: Clock) -> None:
    store = GpuStore(max_object_bytes=8192, max_store_bytes=3 * 8192, clock=clock)
    big = "m" * 7000
    gpus = [
        store.create(with_conditions(new_gpu(f"gpu-{i}"), condition(message=big)))
        for i in (0, 1, 2)
    ]
    assert store.object_bytes == sum(g.ByteSize() for g in gpus)
    with pytest.raises(CapacityError, match="MAX_STORE_BYTES"):
        store.create(with_conditions(new_gpu("gpu-3"), condition(message=big)))
    smaller = store.update_status(with_conditions(gpus[0], condition(message="ok")))
    assert store.object_bytes == smaller.ByteSize() + gpus[1].ByteSize() + gpus[2].ByteSize()
    for name in ("gpu-0", "gpu-1", "gpu-2"):
        store.delete(name)
    assert store.object_bytes == 0


def test_history_keeps_at_most_its_byte_bound_and_expires_what_left(clock: Clock) -> None:
    store = GpuStore(history=1000, history_bytes=64 * 1024, clock=clock)
    gpu = store.create(new_gpu())
    first = gpu.metadata.resource_version
    for i in range(50):
        gpu = store.update_status(
            with_conditions(gpu, condition(reason=f"R{i}", message="m" * 4000))
        )
    assert 0 < store.history_bytes <= 64 * 1024
    assert store.history_length < 50
    with pytest.raises(ExpiredError):
        store.watch(resource_version=first)


def test_events_do_not_alias_the_store(store: GpuStore) -> None:
    watcher = store.watch()
    store.create(new_gpu())
    watcher._queue[0][1].object.spec.product = "mutated"
    assert store.get("gpu-0").spec.product == "NVIDIA H100 80GB HBM3"


# -- durability ------------------------------------------------------------------


def test_restart_keeps_objects_and_conditions(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "state.db"
    store = GpuStore(state_file=state, clock=clock)
    gpu = store.create(new_gpu())
    saved = store.update_status(
        with_conditions(gpu, condition(status="False", reason="XidCritical"))
    )
    store.close()
    assert GpuStore(state_file=state, clock=clock).get("gpu-0") == saved


def test_restart_never_moves_the_resource_version_back(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "state.db"
    store = GpuStore(state_file=state, clock=clock)
    store.create(new_gpu("gpu-0"))
    store.create(new_gpu("gpu-1"))
    store.delete("gpu-1")  # the counter is now above every stored object's RV
    before = store.resource_version
    store.close()
    again = GpuStore(state_file=state, clock=clock)
    assert int(again.create(new_gpu("gpu-2")).metadata.resource_version) > before


def test_restart_keeps_deletions(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "state.db"
    store = GpuStore(state_file=state, clock=clock)
    store.create(new_gpu("gpu-0"))
    store.delete("gpu-0")
    store.close()
    assert GpuStore(state_file=state, clock=clock).gpu_count == 0


def test_resume_across_a_restart_is_expired(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "state.db"
    store = GpuStore(state_file=state, clock=clock)
    listed = store.list()
    store.create(new_gpu())
    store.close()
    with pytest.raises(ExpiredError):
        GpuStore(state_file=state, clock=clock).watch(listed.resource_version)


async def test_watch_at_the_loaded_rv_after_a_restart_is_fine(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "state.db"
    store = GpuStore(state_file=state, clock=clock)
    store.create(new_gpu())
    store.close()
    again = GpuStore(state_file=state, clock=clock)
    assert await again.watch(str(again.resource_version)).get(timeout=0) is None


def test_restart_without_state_never_reuses_resource_versions(clock: Clock) -> None:
    first = GpuStore(clock=clock)
    rv = first.create(new_gpu()).metadata.resource_version
    clock.now = T0 + timedelta(seconds=1)
    with pytest.raises(ExpiredError):
        GpuStore(clock=clock).watch(rv)


def test_a_file_that_is_not_sqlite_is_refused_naming_it(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "state.db"
    state.write_bytes(b"this is not a database, just some text " * 100)
    with pytest.raises(StateFileError, match=str(state)):
        GpuStore(state_file=state, clock=clock)


def test_a_foreign_sqlite_file_is_refused_naming_it(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "other.db"
    with sqlite3.connect(state) as conn:
        conn.execute("CREATE TABLE readings (id TEXT)")
    conn.close()
    with pytest.raises(StateFileError, match="did not write"):
        GpuStore(state_file=state, clock=clock)


def test_a_corrupt_object_row_is_refused_naming_the_file(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "state.db"
    store = GpuStore(state_file=state, clock=clock)
    store.create(new_gpu())
    store.close()
    with sqlite3.connect(state) as conn:
        conn.execute("UPDATE gpus SET object = x'ffffffff'")
    conn.close()
    with pytest.raises(StateFileError, match=f"{state}.*gpu-0"):
        GpuStore(state_file=state, clock=clock)
