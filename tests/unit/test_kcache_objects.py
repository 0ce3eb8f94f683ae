"""The gkm.io API object models (parsing what the API server sends) and their status patches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpufleet.kcache.cluster import CacheKey, node_object_name
from gpufleet.kcache.errors import KcacheError
from gpufleet.kcache.objects import (
    CacheObject,
    CacheStatus,
    Condition,
    DigestState,
    DigestStatus,
    GpuRef,
    IncompatibleGpu,
    InvalidObjectError,
    NodeObject,
    NodeStatus,
    PodRef,
    make_condition,
    new_node_object,
    rfc3339,
    rollup_state,
    set_condition,
    status_dict,
)
from gpufleet.kcache.patches import merge_patch, status_patch

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


def seed_cache(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gkm.io/v1alpha1",
        "kind": "GKMCache",
        "metadata": {"name": "vector-add-cache", "namespace": "team-a", "generation": 3},
        "spec": {"image": "registry.example/caches/vector-add:v1", **spec},
    }


def gkm_node_object() -> dict[str, Any]:
    return {
        "apiVersion": "gkm.io/v1alpha1",
        "kind": "GKMCacheNode",
        "metadata": {
            "name": "vector-add-cache-1a2b3c4d",
            "namespace": "team-a",
            "labels": {"kubernetes.io/hostname": "node-1", "gkm.io/cache": "vector-add-cache"},
        },
        "spec": {},
        "status": {
            "nodeName": "node-1",
            "gpus": [
                {"gpuType": "NVIDIA H100 80GB HBM3", "driverVersion": "550.54.15", "ids": [0]}
            ],
            "caches": {
                "vector-add-cache": {
                    DIGEST: {
                        "compatibleGPUs": [{"id": 0, "uuid": "GPU-0"}],
                        "incompatibleGPUs": [],
                        "conditions": [
                            {
                                "type": "Running",
                                "status": "True",
                                "reason": "Running",
                                "message": "",
                                "lastTransitionTime": "2026-12-01T10:00:00Z",
                            }
                        ],
                        "volumeSize": 12345,
                        "pods": [{"podNamespace": "team-a", "podName": "app", "volumeId": "csi-1"}],
                        "someFutureField": True,
                    }
                }
            },
        },
    }


# Parsing


def test_seed_cache_parses_to_its_key_and_image() -> None:
    cache = CacheObject.from_api(seed_cache())
    assert (cache.key, cache.spec.image, cache.generation) == (
        CacheKey("GKMCache", "team-a", "vector-add-cache"),
        "registry.example/caches/vector-add:v1",
        3,
    )


def test_unknown_fields_are_ignored_everywhere() -> None:
    obj = seed_cache(newGkmField={"x": 1})
    obj["status"] = {"futureField": 1, "resolvedDigest": DIGEST}
    assert CacheObject.from_api(obj).status.resolved_digest == DIGEST


def test_gkm_pvc_era_fields_are_accepted() -> None:
    cache = CacheObject.from_api(
        seed_cache(
            podTemplate={"spec": {"containers": []}},
            storageClassName="standard",
            accessModes=["ReadOnlyMany"],
            workloadNamespaces=["team-b"],
        )
    )
    assert (cache.spec.storage_class_name, cache.spec.workload_namespaces) == (
        "standard",
        ["team-b"],
    )


def test_list_items_without_kind_are_typed_by_their_namespace() -> None:
    namespaced = seed_cache()
    del namespaced["kind"]
    cluster = seed_cache()
    del cluster["kind"], cluster["metadata"]["namespace"]
    assert (
        CacheObject.from_api(namespaced).key.kind,
        CacheObject.from_api(cluster).key,
    ) == ("GKMCache", CacheKey("ClusterGKMCache", None, "vector-add-cache"))


def test_null_status_is_an_empty_status() -> None:
    obj = seed_cache()
    obj["status"] = None
    assert CacheObject.from_api(obj).status == CacheStatus()


@pytest.mark.parametrize(
    "image",
    [
        "registry.example/Caches/vector-add:v1",
        "registry.example/caches/vector add:v1",
        "registry.example/caches/vector-add@sha256:abc",
        "registry.example/caches/vector-add:v1\n",
        "",
    ],
)
def test_an_invalid_image_is_refused_naming_the_cache_and_field(image: str) -> None:
    with pytest.raises(InvalidObjectError, match=r"GKMCache team-a/vector-add-cache: spec\.image"):
        CacheObject.from_api(seed_cache(image=image))


def test_a_cache_without_spec_is_refused() -> None:
    obj = seed_cache()
    del obj["spec"]
    with pytest.raises(InvalidObjectError, match="spec"):
        CacheObject.from_api(obj)


def test_a_namespaced_kind_without_namespace_is_refused() -> None:
    obj = seed_cache()
    del obj["metadata"]["namespace"]
    with pytest.raises(InvalidObjectError, match="namespace"):
        CacheObject.from_api(obj)


def test_invalid_object_error_is_a_kcache_error() -> None:
    assert issubclass(InvalidObjectError, KcacheError)


def test_signature_format_label_and_deletion_are_read_from_metadata() -> None:
    obj = seed_cache()
    obj["metadata"]["labels"] = {"gkm.io/signature-format": "cosign-v3"}
    obj["metadata"]["deletionTimestamp"] = "2026-12-01T10:00:00Z"
    cache = CacheObject.from_api(obj)
    assert (cache.signature_format, cache.deleting) == ("cosign-v3", True)


def test_gkm_node_object_parses_with_gkm_field_names() -> None:
    node = NodeObject.from_api(gkm_node_object())
    digest = node.status.caches["vector-add-cache"][DIGEST]
    assert (
        node.cache_key,
        node.node_name,
        digest.compatible_gpus,
        digest.volume_size,
        digest.pods[0].volume_id,
        digest.state,
    ) == (
        CacheKey("GKMCache", "team-a", "vector-add-cache"),
        "node-1",
        [GpuRef(id=0, uuid="GPU-0")],
        12345,
        "csi-1",
        DigestState.RUNNING,
    )


def test_a_fresh_node_object_without_status_parses() -> None:
    body = new_node_object(CacheKey("ClusterGKMCache", None, "shared"), "node-1")
    node = NodeObject.from_api(body)
    assert (node.kind, node.cache_key, node.node_name, node.status) == (
        "ClusterGKMCacheNode",
        CacheKey("ClusterGKMCache", None, "shared"),
        "node-1",
        NodeStatus(),
    )


def test_new_node_object_is_named_and_labelled_the_gkm_way() -> None:
    key = CacheKey("GKMCache", "team-a", "vector-add-cache")
    assert new_node_object(key, "node-1") == {
        "apiVersion": "gkm.io/v1alpha1",
        "kind": "GKMCacheNode",
        "metadata": {
            "name": node_object_name(key, "node-1"),
            "namespace": "team-a",
            "labels": {"kubernetes.io/hostname": "node-1", "gkm.io/cache": "vector-add-cache"},
        },
        "spec": {},
    }


# Rendering a status


def test_node_status_renders_with_gkm_field_names() -> None:
    status = NodeStatus(
        node_name="node-1",
        caches={
            "c": {
                DIGEST: DigestStatus(
                    compatible_gpus=[GpuRef(id=0, uuid="GPU-0")],
                    incompatible_gpus=[IncompatibleGpu(id=1, uuid="GPU-1", reason="sm_80")],
                    volume_size=7,
                    pods=[PodRef(pod_namespace="a", pod_name="p", volume_id="v")],
                )
            }
        },
    )
    assert status_dict(status)["caches"]["c"][DIGEST] == {
        "compatibleGPUs": [{"id": 0, "uuid": "GPU-0"}],
        "incompatibleGPUs": [{"id": 1, "uuid": "GPU-1", "reason": "sm_80"}],
        "conditions": [],
        "volumeSize": 7,
        "pods": [{"podNamespace": "a", "podName": "p", "volumeId": "v"}],
    }


def test_cache_status_renders_camel_case_and_leaves_unset_fields_out() -> None:
    status = CacheStatus(resolved_digest=DIGEST, observed_generation=2)
    assert status_dict(status) == {
        "resolvedDigest": DIGEST,
        "observedGeneration": 2,
        "previousDigests": [],
        "nodeSelector": {},
        "conditions": [],
    }


def test_status_round_trips_through_the_wire_form() -> None:
    node = NodeObject.from_api(gkm_node_object())
    again = NodeStatus.model_validate(status_dict(node.status))
    assert again == node.status


# Conditions


def test_make_condition_writes_rfc3339_and_true_false() -> None:
    condition = make_condition("Resolved", True, "Resolved", "ok", now=T0, observed_generation=2)
    assert condition.model_dump(by_alias=True) == {
        "type": "Resolved",
        "status": "True",
        "reason": "Resolved",
        "message": "ok",
        "lastTransitionTime": "2026-12-01T10:00:00Z",
        "observedGeneration": 2,
    }


def test_set_condition_keeps_the_transition_time_when_the_status_is_unchanged() -> None:
    first = [make_condition("Ready", False, "Pending", now=T0)]
    again = set_condition(
        first, make_condition("Ready", False, "Downloading", now=T0 + timedelta(1))
    )
    assert (again[0].reason, again[0].last_transition_time) == ("Downloading", rfc3339(T0))


def test_set_condition_moves_the_transition_time_when_the_status_changes() -> None:
    first = [make_condition("Ready", False, "Pending", now=T0)]
    later = T0 + timedelta(minutes=1)
    changed = set_condition(first, make_condition("Ready", True, "Extracted", now=later))
    assert changed[0].last_transition_time == rfc3339(later)


def test_set_condition_replaces_its_type_and_keeps_the_others() -> None:
    conditions = [make_condition("Resolved", True, "Resolved", now=T0)]
    conditions = set_condition(conditions, make_condition("Verified", True, "NotRequired", now=T0))
    conditions = set_condition(conditions, make_condition("Resolved", False, "NotFound", now=T0))
    assert [(c.type, c.reason) for c in conditions] == [
        ("Resolved", "NotFound"),
        ("Verified", "NotRequired"),
    ]


def test_saying_the_same_condition_again_changes_nothing() -> None:
    status = CacheStatus(conditions=[make_condition("Ready", True, "Running", now=T0)])
    stored = status_dict(status)
    status.conditions = set_condition(
        status.conditions, make_condition("Ready", True, "Running", now=T0 + timedelta(hours=1))
    )
    assert status_patch(status, stored) == {}


def test_a_condition_rejects_a_status_other_than_true_false_unknown() -> None:
    with pytest.raises(ValueError, match="status"):
        Condition.model_validate(
            {"type": "Ready", "status": "yes", "reason": "R", "lastTransitionTime": "x"}
        )


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (["Extracted", "Error", "Running"], DigestState.ERROR),
        (["Running", "Outdated"], DigestState.OUTDATED),
        (["Extracted", "Running", "Pending"], DigestState.RUNNING),
        (["Pending", "Downloading"], DigestState.DOWNLOADING),
        (["Incompatible", "Extracted"], DigestState.EXTRACTED),
        (["Incompatible"], None),
        ([], None),
    ],
)
def test_rollup_follows_gkm_order_and_ignores_incompatible_nodes(
    states: list[str], expected: DigestState | None
) -> None:
    assert rollup_state(states) == expected


# Patches


def test_merge_patch_names_removed_keys_with_null_and_replaces_lists() -> None:
    old = {"a": 1, "m": {"x": 1, "y": 2}, "l": [1, 2], "gone": {"deep": 1}}
    new = {"a": 1, "m": {"x": 1, "z": 3}, "l": [2]}
    assert merge_patch(old, new) == {"m": {"y": None, "z": 3}, "l": [2], "gone": None}


def test_status_patch_is_empty_when_nothing_changed() -> None:
    status = CacheStatus(resolved_digest=DIGEST, ready="1/1")
    assert status_patch(status, status_dict(status)) == {}


def test_status_patch_drops_a_digest_the_node_no_longer_has() -> None:
    node = NodeObject.from_api(gkm_node_object())
    stored = status_dict(node.status)
    node.status.caches["vector-add-cache"] = {OTHER: DigestStatus(volume_size=1)}
    patch = status_patch(node.status, stored)
    assert patch["status"]["caches"]["vector-add-cache"][DIGEST] is None
    assert patch["status"]["caches"]["vector-add-cache"][OTHER]["volumeSize"] == 1


def test_status_patch_from_nothing_is_the_whole_status() -> None:
    status = CacheStatus(resolved_digest=DIGEST)
    assert status_patch(status) == {"status": status_dict(status)}
