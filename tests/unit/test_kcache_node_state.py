"""The node state: each digest's phase, the mounts folded in, what GC may not touch."""

from __future__ import annotations

from typing import Any

from gpufleet.kcache.cluster import CacheKey, PodInfo
from gpufleet.kcache.node.state import CacheSpec, NodeState, Phase, Use, cache_key_of

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
KEY = CacheKey("GKMCache", "team-a", "vector-add")
POD = PodInfo("team-a", "app", "uid-1", "default")


def cache(digest: str | None = D1, *, uid: str = "u1", deleting: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "vector-add", "namespace": "team-a", "uid": uid}
    metadata["generation"] = 2
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    status = {} if digest is None else {
        "resolvedDigest": digest, "resolvedImage": f"reg.example/c@{digest}",
    }  # fmt: skip
    return {"metadata": metadata, "spec": {"image": "reg.example/c:v1"}, "status": status}


def extracted(state: NodeState, digest: str = D1) -> None:
    state.update(KEY, digest, phase=Phase.EXTRACTED, mount_root="/cache")


def test_a_cluster_cache_object_has_a_key_without_namespace() -> None:
    key = cache_key_of({"metadata": {"name": "shared"}})
    assert key == CacheKey("ClusterGKMCache", None, "shared")


def test_a_cache_without_a_resolved_digest_pulls_nothing() -> None:
    state = NodeState()
    assert state.set_cache(CacheSpec.from_object(cache(None))) is None
    assert state.label(KEY) is None


def test_a_new_resolved_digest_is_pulled_once() -> None:
    state = NodeState()
    assert state.set_cache(CacheSpec.from_object(cache())) == D1
    assert state.set_cache(CacheSpec.from_object(cache())) is None
    assert state.phase(KEY, D1) is Phase.PENDING


def test_an_extracted_digest_is_running_while_mounted_and_labels_the_node_ready() -> None:
    state = NodeState()
    state.set_cache(CacheSpec.from_object(cache()))
    extracted(state)
    assert (state.phase(KEY, D1), state.label(KEY)) == (Phase.EXTRACTED, "ready")
    state.add_use(Use("vol-1", KEY, D1, "/kernels", POD))
    assert state.phase(KEY, D1) is Phase.RUNNING
    state.remove_use("vol-1")
    assert state.phase(KEY, D1) is Phase.EXTRACTED


def test_a_moved_tag_keeps_the_mounted_old_digest_as_outdated_until_unmounted() -> None:
    state = NodeState()
    state.set_cache(CacheSpec.from_object(cache(D1)))
    extracted(state)
    state.add_use(Use("vol-1", KEY, D1, "/cache", POD))

    assert state.set_cache(CacheSpec.from_object(cache(D2))) == D2

    assert state.phase(KEY, D1) is Phase.OUTDATED
    assert state.label(KEY) is None  # the new digest is not pulled yet
    assert state.wanted() == {D2}
    assert state.in_use() == {(D1, "/cache")}
    state.remove_use("vol-1")
    assert state.digest_state(KEY, D1) is None


def test_a_mounted_digest_whose_own_entry_was_collected_is_still_outdated() -> None:
    # The pod mounts an entry derived for its path; GC took the image's own entry of the old
    # digest (not mounted), and the agent set that pull back to Pending. The mount is live.
    state = NodeState()
    state.set_cache(CacheSpec.from_object(cache(D1)))
    extracted(state)
    state.add_use(Use("vol-1", KEY, D1, "/mnt/kernels", POD))
    state.set_cache(CacheSpec.from_object(cache(D2)))

    state.update(KEY, D1, phase=Phase.PENDING, path=None)

    assert state.phase(KEY, D1) is Phase.OUTDATED


def test_an_unmounted_old_digest_is_dropped_at_once() -> None:
    state = NodeState()
    state.set_cache(CacheSpec.from_object(cache(D1)))
    extracted(state)
    state.set_cache(CacheSpec.from_object(cache(D2)))
    assert state.digest_state(KEY, D1) is None


def test_an_incompatible_digest_labels_the_node_incompatible() -> None:
    state = NodeState()
    state.set_cache(CacheSpec.from_object(cache()))
    state.update(KEY, D1, phase=Phase.INCOMPATIBLE, message="no GPU matches")
    assert state.label(KEY) == "incompatible"


def test_a_deleting_cache_wants_nothing_and_has_no_label() -> None:
    state = NodeState()
    state.set_cache(CacheSpec.from_object(cache()))
    extracted(state)
    state.set_cache(CacheSpec.from_object(cache(deleting=True)))
    assert state.wanted() == set()
    assert state.label(KEY) is None
    assert state.keys() == [KEY]


def test_a_cache_created_again_under_its_name_starts_over() -> None:
    state = NodeState()
    state.set_cache(CacheSpec.from_object(cache()))
    extracted(state)
    assert state.set_cache(CacheSpec.from_object(cache(uid="u2"))) == D1
    assert state.phase(KEY, D1) is Phase.PENDING


def test_a_reservation_keeps_a_prepared_entry_in_use_until_it_expires() -> None:
    now = [0.0]
    state = NodeState(clock=lambda: now[0])
    state.reserve(D1, "/kernels")
    assert state.in_use() == {(D1, "/kernels")}
    now[0] = 10_000.0
    assert state.in_use() == set()


def test_every_change_is_announced_with_its_cache() -> None:
    state = NodeState()
    seen: list[CacheKey] = []
    state.on_change(seen.append)
    state.set_cache(CacheSpec.from_object(cache()))
    extracted(state)
    extracted(state)  # no change: not announced
    assert seen == [KEY, KEY]
