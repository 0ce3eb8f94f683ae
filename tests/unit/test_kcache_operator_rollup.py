"""The operator's pure parts: node objects → counts/ready/Ready, and the status diff."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gpufleet.kcache.cluster import CacheKey, node_label_key
from gpufleet.kcache.errors import (
    SignatureError,
    SignedDigestMismatchError,
    UnsignedError,
    UntrustedSignatureError,
)
from gpufleet.kcache.objects import CacheObject, NodeObject, status_dict
from gpufleet.kcache.operator.resolve import refusal_reason
from gpufleet.kcache.operator.rollup import Verdict, roll_up
from gpufleet.kcache.operator.status import Resolution, status_patch, wanted_status
from gpufleet.kcache.operator.versions import merge_listing

OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
KEY = CacheKey("GKMCache", "team-a", "vector-add")
T0 = datetime(2026, 12, 7, 10, tzinfo=UTC)
T1 = datetime(2026, 12, 7, 11, tzinfo=UTC)


def node_object(node: str, entries: dict[str, tuple[str, int]], message: str = "") -> NodeObject:
    """A node object reporting `entries`: digest → (state, pods mounting it)."""
    return NodeObject.from_api({
        "metadata": {
            "name": f"vector-add-{node}",
            "namespace": "team-a",
            "labels": {"kubernetes.io/hostname": node, "gkm.io/cache": "vector-add"},
        },
        "status": {
            "nodeName": node,
            "caches": {
                "vector-add": {
                    digest: {
                        "conditions": [
                            {"type": state, "status": "True", "reason": state, "message": message,
                             "lastTransitionTime": "2026-12-07T09:00:00Z"}
                        ],
                        "pods": [
                            {"podNamespace": "team-a", "podName": f"p{i}", "volumeId": f"v{i}"}
                            for i in range(pods)
                        ],
                    }
                    for digest, (state, pods) in entries.items()
                }
            },
        },
    })  # fmt: skip


def resolution(digest: str | None = NEW) -> Resolution:
    return Resolution(
        generation=2,
        digest=digest,
        resolved_image=None if digest is None else f"reg/caches/vector-add@{digest}",
        resolved=Verdict("Resolved", True, "Resolved", "v1 is " + str(digest)),
        verified=Verdict("Verified", True, "NotRequired", "no key is configured"),
    )


def cache(
    status: dict[str, Any] | None = None, *, key: CacheKey = KEY, generation: int = 2
) -> CacheObject:
    metadata: dict[str, Any] = {"name": key.name, "generation": generation}
    if key.namespace:
        metadata["namespace"] = key.namespace
    return CacheObject.from_api(
        {"metadata": metadata, "spec": {"image": "reg.example/caches/vector-add:v1"},
         "status": status or {}}
    )  # fmt: skip


def test_counts_and_ready_column_leave_incompatible_nodes_out() -> None:
    rollup = roll_up(
        [
            node_object("n1", {NEW: ("Running", 2)}),
            node_object("n2", {NEW: ("Extracted", 0)}),
            node_object("n3", {NEW: ("Downloading", 0)}),
            node_object("n4", {NEW: ("Incompatible", 0)}, "GPU is cuda/80/32"),
        ],
        "vector-add",
        NEW,
    )
    assert rollup.ready == "2/3"
    assert rollup.counts == {
        "nodeCnt": 4, "nodeReadyCnt": 2, "nodeIncompatibleCnt": 1, "nodeInUseCnt": 1,
        "nodeNotInUseCnt": 3, "nodeErrorCnt": 0, "podRunningCnt": 2, "podOutdatedCnt": 0,
    }  # fmt: skip
    assert (rollup.condition.status, rollup.condition.reason) == (False, "Running")
    assert "waiting for n3" in rollup.condition.message


def test_ready_is_true_when_every_compatible_node_has_the_digest() -> None:
    rollup = roll_up(
        [node_object("n1", {NEW: ("Extracted", 0)}), node_object("n2", {NEW: ("Incompatible", 0)})],
        "vector-add",
        NEW,
    )
    assert (rollup.condition.status, rollup.condition.reason, rollup.ready) == (
        True, "Extracted", "1/1",
    )  # fmt: skip


def test_error_outranks_everything_and_names_the_node() -> None:
    rollup = roll_up(
        [
            node_object("n1", {NEW: ("Running", 1), OLD: ("Outdated", 1)}),
            node_object("n2", {NEW: ("Error", 0)}, "registry unreachable"),
        ],
        "vector-add",
        NEW,
    )
    assert rollup.condition.reason == "Error"
    assert "n2: registry unreachable" in rollup.condition.message
    assert rollup.counts["nodeErrorCnt"] == 1


def test_an_old_digest_still_mounted_is_outdated_and_kept_in_previous_digests() -> None:
    rollup = roll_up(
        [node_object("n1", {NEW: ("Extracted", 0), OLD: ("Outdated", 3)})], "vector-add", NEW
    )
    assert rollup.previous_digests == [OLD]
    assert rollup.condition.reason == "Outdated"
    assert rollup.condition.status is True  # new pods get the new digest
    assert (rollup.counts["podOutdatedCnt"], rollup.counts["podRunningCnt"]) == (3, 0)


def test_an_old_digest_nobody_mounts_is_not_previous() -> None:
    rollup = roll_up(
        [node_object("n1", {NEW: ("Extracted", 0), OLD: ("Extracted", 0)})], "vector-add", NEW
    )
    assert rollup.previous_digests == []


def test_all_incompatible_says_why() -> None:
    rollup = roll_up(
        [
            node_object(
                "a100", {NEW: ("Incompatible", 0)}, "GPU is cuda/80/32; cache has cuda/90/32"
            )
        ],
        "vector-add",
        NEW,
    )
    assert (rollup.condition.status, rollup.condition.reason) == (False, "Incompatible")
    assert "cuda/80/32" in rollup.condition.message
    assert rollup.ready == "0/0"


def test_no_nodes_or_no_digest_is_pending() -> None:
    assert roll_up([], "vector-add", NEW).condition.reason == "Pending"
    unresolved = roll_up([node_object("n1", {NEW: ("Extracted", 0)})], "vector-add", None)
    assert (unresolved.condition.status, unresolved.condition.reason) == (False, "Pending")


def test_a_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    pending = status_dict(wanted_status(cache(), resolution(), [], access=None, now=T0))
    downloading = [node_object("n1", {NEW: ("Downloading", 0)})]
    same = wanted_status(cache(pending), resolution(), downloading, access=None, now=T1)
    extracted = [node_object("n1", {NEW: ("Extracted", 0)})]
    flipped = wanted_status(cache(pending), resolution(), extracted, access=None, now=T1)
    assert same.condition("Ready").last_transition_time == "2026-12-07T10:00:00Z"
    assert flipped.condition("Ready").last_transition_time == "2026-12-07T11:00:00Z"


def written(status: Any) -> dict[str, Any]:
    """`status` as the API stores it after the operator's patch."""
    return {**status_dict(status), "lastUpdated": "2026-12-07T10:00:00Z"}


def test_unchanged_status_gives_no_patch() -> None:
    nodes = [node_object("n1", {NEW: ("Extracted", 0)})]
    stored = written(wanted_status(cache(), resolution(), nodes, access=None, now=T0))
    again = wanted_status(cache(stored), resolution(), nodes, access=None, now=T1)
    assert status_patch(stored, again, now=T1) is None


def test_a_node_change_gives_a_patch_with_the_new_counts() -> None:
    before = [node_object("n1", {NEW: ("Downloading", 0)})]
    stored = written(wanted_status(cache(), resolution(), before, access=None, now=T0))
    after = [node_object("n1", {NEW: ("Extracted", 0)})]
    wanted = wanted_status(cache(stored), resolution(), after, access=None, now=T1)
    patch = status_patch(stored, wanted, now=T1)
    assert patch is not None
    assert patch["ready"] == "1/1"
    assert patch["lastUpdated"] == "2026-12-07T11:00:00Z"


def test_status_names_the_digest_the_node_selector_and_generation() -> None:
    status = status_dict(wanted_status(cache(), resolution(), [], access="open", now=T0))
    assert status["resolvedDigest"] == NEW
    assert status["resolvedImage"] == f"reg/caches/vector-add@{NEW}"
    assert status["observedGeneration"] == 2
    assert status["nodeSelector"] == {node_label_key(KEY): "ready"}
    assert "access" not in status  # a GKMCache has no access mode
    assert [c["type"] for c in status["conditions"]] == ["Resolved", "Verified", "Ready"]
    assert {c["observedGeneration"] for c in status["conditions"]} == {2}


def test_cluster_cache_status_carries_the_access_mode() -> None:
    key = CacheKey("ClusterGKMCache", None, "vector-add")
    status = wanted_status(cache(key=key), resolution(), [], access="restricted", now=T0)
    assert status.access == "restricted"


def test_without_a_resolution_the_digest_and_its_conditions_stay() -> None:
    stored = written(wanted_status(cache(), resolution(), [], access=None, now=T0))
    carried = wanted_status(cache(stored), None, [], access=None, now=T1)
    assert status_patch(stored, carried, now=T1) is None
    assert carried.resolved_digest == NEW


def test_previous_digests_empty_once_unmounted() -> None:
    mounted = [node_object("n1", {NEW: ("Extracted", 0), OLD: ("Outdated", 1)})]
    stored = written(wanted_status(cache(), resolution(), mounted, access=None, now=T0))
    assert stored["previousDigests"] == [OLD]
    unmounted = [node_object("n1", {NEW: ("Extracted", 0)})]
    wanted = wanted_status(cache(stored), resolution(), unmounted, access=None, now=T1)
    patch = status_patch(stored, wanted, now=T1)
    assert patch is not None
    assert patch["previousDigests"] == []


def test_a_failed_signature_keeps_the_old_digest_and_says_why() -> None:
    refused = Resolution(
        generation=3, digest=OLD, resolved_image=f"reg/caches/vector-add@{OLD}",
        resolved=Verdict("Resolved", True, "Resolved", "v1 is " + NEW),
        verified=Verdict("Verified", False, "Unsigned", f"{NEW} has no signature"),
    )  # fmt: skip
    status = wanted_status(cache(generation=3), refused, [], access=None, now=T0)
    assert status.resolved_digest == OLD
    verified = status.condition("Verified")
    assert verified is not None
    assert (verified.status, verified.reason) == ("False", "Unsigned")


def obj(name: str, version: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(version)}}


def test_a_fresh_list_replaces_what_the_watch_delivered() -> None:
    merged = merge_listing({"a": obj("a", 3), "stale": obj("stale", 4)}, [obj("a", 5)], "9", {})
    assert merged == {"a": obj("a", 5)}


def test_the_watch_wins_over_a_list_served_before_its_event() -> None:
    known = {"a": obj("a", 12), "new": obj("new", 11)}
    merged = merge_listing(known, [obj("a", 5)], "10", {})
    assert merged == {"a": obj("a", 12), "new": obj("new", 11)}


def test_a_list_served_before_a_deletion_does_not_revive_the_object() -> None:
    merged = merge_listing({}, [obj("a", 5), obj("b", 6)], "10", {"a": obj("a", 11)})
    assert merged == {"b": obj("b", 6)}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (UnsignedError("x"), "Unsigned"),
        (UntrustedSignatureError("x"), "WrongKey"),
        (SignedDigestMismatchError("x"), "DigestMismatch"),
        (SignatureError("x"), "Error"),
    ],
)
def test_each_refusal_has_its_condition_reason(error: SignatureError, reason: str) -> None:
    assert refusal_reason(error) == reason
