"""The gkm.io CRDs generated from the models: structural, validating, committed, printed.

Objects are validated against the generated ``openAPIV3Schema`` with a real OpenAPI 3.0
schema validator (``openapi_schema_validator.OAS30Validator``, on jsonschema): the
dialect Kubernetes CRD schemas are written in. One keyword is adjusted: ``pattern`` is
matched the way the API server's RE2 does it, where ``$`` is the end of the text (in
Python's ``re`` it also matches before a final newline). The API server's own extras
(``x-kubernetes-*``) are checked by hand where they matter.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import ValidationError, validators
from openapi_schema_validator import OAS30Validator

from gpufleet.kcache.cluster import RESOURCES, CacheKey
from gpufleet.kcache.crds import crd, render_crds
from gpufleet.kcache.errors import KcacheError
from gpufleet.kcache.objects import (
    IMAGE_MAX_LENGTH,
    IMAGE_PATTERN,
    CacheCounts,
    CacheObject,
    CacheStatus,
    DigestStatus,
    GpuGroup,
    GpuRef,
    IncompatibleGpu,
    NodeStatus,
    PodRef,
    make_condition,
    new_node_object,
    status_dict,
)
from gpufleet.kcache.reference import Reference

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "deploy" / "kustomize" / "overlays" / "kcache" / "crds.yaml"
EXAMPLES = ROOT / "examples" / "kcache"
DIGEST = "sha256:" + "0123456789abcdef" * 4

SEED_CACHE = {
    "apiVersion": "gkm.io/v1alpha1",
    "kind": "GKMCache",
    "metadata": {"name": "vector-add-cache", "namespace": "team-a"},
    "spec": {"image": "registry.example/caches/vector-add:v1"},
}
SEED_VOLUME = {
    "name": "kernels",
    "csi": {
        "driver": "csi.gkm.io",
        "volumeAttributes": {
            "csi.gkm.io/GKMCache": "vector-add-cache",
            "csi.gkm.io/namespace": "team-a",
        },
    },
}


def _re2_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "string"):
        return
    python = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern
    if re.search(python, instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = validators.extend(OAS30Validator, {"pattern": _re2_pattern})


def schema_of(kind: str) -> dict[str, Any]:
    (resource,) = [r for r in RESOURCES if r.kind == kind]
    (version,) = crd(resource)["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def errors(obj: dict[str, Any]) -> list[str]:
    """What the CRD of the object's kind refuses in it (empty: valid)."""
    validator = Validator(schema_of(obj["kind"]))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def cache_with(image: Any) -> dict[str, Any]:
    return {**SEED_CACHE, "spec": {"image": image}}


def example_documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


# Committed, printed


def test_committed_crds_yaml_is_regenerated_from_the_models() -> None:
    assert COMMITTED.read_text() == render_crds(), (
        "deploy/kustomize/overlays/kcache/crds.yaml is stale: run "
        "`gpufleet cache crds > deploy/kustomize/overlays/kcache/crds.yaml`"
    )


def test_gpufleet_cache_crds_prints_the_four_crds() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "cache", "crds"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert (result.returncode, [d["metadata"]["name"] for d in documents]) == (
        0,
        [
            "gkmcaches.gkm.io",
            "clustergkmcaches.gkm.io",
            "gkmcachenodes.gkm.io",
            "clustergkmcachenodes.gkm.io",
        ],
    ), result.stderr


# The CRD objects


@pytest.mark.parametrize(
    ("kind", "scope", "short"),
    [
        ("GKMCache", "Namespaced", ["gkmc"]),
        ("ClusterGKMCache", "Cluster", ["cgkmc"]),
        ("GKMCacheNode", "Namespaced", ["gkmcn"]),
        ("ClusterGKMCacheNode", "Cluster", ["cgkmcn"]),
    ],
)
def test_each_crd_serves_and_stores_v1alpha1_with_a_status_subresource(
    kind: str, scope: str, short: list[str]
) -> None:
    (resource,) = [r for r in RESOURCES if r.kind == kind]
    spec = crd(resource)["spec"]
    assert (
        spec["group"],
        spec["scope"],
        spec["names"]["kind"],
        spec["names"]["shortNames"],
        [(v["name"], v["served"], v["storage"], v["subresources"]) for v in spec["versions"]],
    ) == ("gkm.io", scope, kind, short, [("v1alpha1", True, True, {"status": {}})])


@pytest.mark.parametrize("kind", ["GKMCache", "ClusterGKMCache"])
def test_cache_printer_columns_are_image_digest_ready_age(kind: str) -> None:
    (resource,) = [r for r in RESOURCES if r.kind == kind]
    (version,) = crd(resource)["spec"]["versions"]
    columns = [
        (c["name"], c["jsonPath"])
        for c in version["additionalPrinterColumns"]
        if c.get("priority", 0) == 0
    ]
    assert columns == [
        ("Image", ".spec.image"),
        ("Digest", ".status.resolvedDigest"),
        ("Ready", ".status.ready"),
        ("Age", ".metadata.creationTimestamp"),
    ]


@pytest.mark.parametrize("kind", [r.kind for r in RESOURCES])
def test_schema_is_structural(kind: str) -> None:
    # Every node typed; unknown fields kept only under podTemplate (GKM's, ignored); no
    # combinators or references, which structural schemas forbid at the type level.
    untyped, preserving, forbidden = [], [], []
    for path, node in walk(schema_of(kind), ""):
        if "type" not in node:
            untyped.append(path)
        if node.get("x-kubernetes-preserve-unknown-fields"):
            preserving.append(path)
        forbidden += [
            f"{path}:{key}" for key in ("$ref", "anyOf", "oneOf", "allOf", "not") if key in node
        ]
        if ("properties" in node or "additionalProperties" in node) and node["type"] != "object":
            forbidden.append(path)
        if node["type"] == "array" and "items" not in node:
            forbidden.append(path)
    expected = [".spec.podTemplate"] if "Node" not in kind else []
    assert (untyped, preserving, forbidden) == ([], expected, [])


@pytest.mark.parametrize("kind", [r.kind for r in RESOURCES])
def test_metadata_schema_restricts_only_the_name(kind: str) -> None:
    # The API server refuses a CRD whose schema constrains metadata beyond name.
    metadata = schema_of(kind)["properties"]["metadata"]
    assert set(metadata.get("properties", {})) == {"name"}


@pytest.mark.parametrize("kind", [r.kind for r in RESOURCES])
def test_patterns_are_anchored_and_re2_compatible(kind: str) -> None:
    # RE2 (the API server) has no lookaround and no backreferences.
    patterns = [node["pattern"] for _, node in walk(schema_of(kind), "") if "pattern" in node]
    assert patterns
    bad = [
        p
        for p in patterns
        if not (p.startswith("^") and p.endswith("$")) or re.search(r"\(\?[=!<]|\\[1-9]", p)
    ]
    assert bad == []


def test_conditions_are_a_list_map_keyed_by_type() -> None:
    conditions = schema_of("GKMCache")["properties"]["status"]["properties"]["conditions"]
    assert (
        conditions["x-kubernetes-list-type"],
        conditions["x-kubernetes-list-map-keys"],
        "type" in conditions["items"]["required"],
        conditions["items"]["properties"]["status"]["enum"],
    ) == ("map", ["type"], True, ["True", "False", "Unknown"])


# Validation


def test_the_seed_example_validates() -> None:
    assert errors(SEED_CACHE) == []


@pytest.mark.parametrize(
    "image",
    [
        "registry.example/caches/vector-add:v1",
        "registry.example:5000/caches/vector-add:v1",
        "localhost/vector-add",
        "localhost:5000/a/b/c:tag_1.2-x",
        "ubuntu",
        "library/ubuntu:22.04",
        "[::1]:5000/caches/x:v1",
        f"registry.example/caches/vector-add@{DIGEST}",
        f"registry.example/caches/vector-add:v1@{DIGEST}",
        "registry.example/a__b/c-d.e_f:v",
    ],
)
def test_valid_image_references_are_accepted(image: str) -> None:
    assert errors(cache_with(image)) == []


@pytest.mark.parametrize(
    "image",
    [
        pytest.param("", id="empty"),
        pytest.param("registry.example/" + "a" * IMAGE_MAX_LENGTH, id="too-long"),
        pytest.param("registry.example/caches/vector add:v1", id="space"),
        pytest.param(" registry.example/caches/vector-add:v1", id="leading-space"),
        pytest.param("registry.example/caches/vector-add:v1\n", id="newline"),
        pytest.param("registry.example/Caches/vector-add:v1", id="uppercase-repo"),
        pytest.param("Caches/vector-add", id="uppercase-hub-repo"),
        pytest.param("registry.example/caches/vector-add@sha256:abc", id="short-digest"),
        pytest.param(f"registry.example/caches/x@{DIGEST.upper()}", id="uppercase-digest"),
        pytest.param("registry.example/caches/x@sha512:" + "a" * 128, id="sha512"),
        pytest.param("registry.example/caches/x:", id="empty-tag"),
        pytest.param("registry.example/caches/x:-v1", id="tag-dash"),
        pytest.param("registry.example/caches/x:" + "v" * 129, id="tag-too-long"),
        pytest.param("registry.example/caches/../x", id="dot-dot"),
        pytest.param("registry.example//x", id="empty-component"),
        pytest.param("https://registry.example/x", id="url"),
        pytest.param(5, id="not-a-string"),
    ],
)
def test_bad_image_references_are_refused(image: Any) -> None:
    assert [e for e in errors(cache_with(image)) if e.startswith("spec.image")] != []


def test_a_cache_without_image_is_refused() -> None:
    assert errors({**SEED_CACHE, "spec": {}}) != []


def test_a_cache_without_spec_is_refused() -> None:
    obj = {key: value for key, value in SEED_CACHE.items() if key != "spec"}
    assert errors(obj) != []


def test_a_cache_name_longer_than_a_label_value_is_refused() -> None:
    # The node objects carry the cache name as the gkm.io/cache label value (<= 63).
    obj = {**SEED_CACHE, "metadata": {"name": "a" * 64, "namespace": "team-a"}}
    assert errors(obj) != []


@pytest.mark.parametrize(
    "image",
    [
        "registry.example/caches/vector-add:v1",
        "registry.example:5000/x",
        "localhost/x",
        "ubuntu:22.04",
        "[::1]:5000/x:v",
        f"r.example/x@{DIGEST}",
        "registry.example/Caches/x",
        "Ubuntu",
        "registry.example/x:-v",
        "registry.example/x@sha256:abc",
        "registry.example/a//b",
        "registry.example/a/",
        "a b",
        "registry_example/x",
    ],
)
def test_image_pattern_agrees_with_reference_parse(image: str) -> None:
    try:
        Reference.parse(image)
    except KcacheError:
        parses = False
    else:
        parses = True
    assert (re.fullmatch(IMAGE_PATTERN, image) is not None) == parses


def full_cache_status() -> CacheStatus:
    return CacheStatus(
        resolved_digest=DIGEST,
        resolved_image=f"registry.example/caches/vector-add@{DIGEST}",
        observed_generation=3,
        previous_digests=["sha256:" + "f" * 64],
        access="restricted",
        node_selector={"gkm.io/cache-0123456789abcdef0123": "ready"},
        ready="2/3",
        counts=CacheCounts(node_cnt=3, node_ready_cnt=2, pod_running_cnt=1),
        conditions=[
            make_condition("Resolved", True, "Resolved", observed_generation=3),
            make_condition("Verified", False, "WrongKey", "signed by another key"),
            make_condition("Ready", False, "Downloading"),
        ],
        last_updated="2026-12-01T10:00:00Z",
    )


def test_a_status_the_models_render_validates_against_the_crd() -> None:
    obj = {**SEED_CACHE, "status": status_dict(full_cache_status())}
    assert errors(obj) == []


def test_a_node_status_the_models_render_validates_against_the_crd() -> None:
    key = CacheKey("GKMCache", "team-a", "vector-add-cache")
    status = NodeStatus(
        node_name="node-1",
        observed_cache_generation=3,
        gpus=[GpuGroup(gpu_type="NVIDIA H100 80GB HBM3", driver_version="550.54.15", ids=[0, 1])],
        caches={
            key.name: {
                DIGEST: DigestStatus(
                    compatible_gpus=[GpuRef(id=0, uuid="GPU-0")],
                    incompatible_gpus=[IncompatibleGpu(id=1, uuid="GPU-1", reason="cuda/80/32")],
                    conditions=[make_condition("Running", True, "Running")],
                    volume_size=12345,
                    pods=[PodRef(pod_namespace="team-a", pod_name="app", volume_id="csi-1")],
                )
            }
        },
        last_updated="2026-12-01T10:00:00Z",
    )
    obj = {**new_node_object(key, "node-1"), "status": status_dict(status)}
    assert errors(obj) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolvedDigest", "sha256:xyz"),
        ("resolvedImage", "registry.example/caches/vector-add:v1"),
        ("access", "everyone"),
        ("ready", "two of three"),
        ("observedGeneration", -1),
    ],
)
def test_a_bad_status_field_is_refused(field: str, value: Any) -> None:
    status = {**status_dict(full_cache_status()), field: value}
    assert [e for e in errors({**SEED_CACHE, "status": status}) if field in e] != []


def test_a_condition_status_outside_true_false_unknown_is_refused() -> None:
    status = status_dict(full_cache_status())
    status["conditions"][0]["status"] = "Yes"
    assert errors({**SEED_CACHE, "status": status}) != []


# Examples


def test_examples_hold_the_seed_example_unchanged() -> None:
    documents = example_documents()
    pods = [d for d in documents if d["kind"] == "Pod" and d["metadata"]["namespace"] == "team-a"]
    assert SEED_CACHE in documents
    (pod,) = pods
    (container,) = pod["spec"]["containers"]
    assert (pod["spec"]["volumes"], container["name"], container["volumeMounts"]) == (
        [SEED_VOLUME],
        "app",
        [{"name": "kernels", "mountPath": "/cache"}],
    )


def test_example_caches_validate_against_the_crds_and_parse() -> None:
    caches = [d for d in example_documents() if d["apiVersion"] == "gkm.io/v1alpha1"]
    assert {d["kind"] for d in caches} == {"GKMCache", "ClusterGKMCache"}
    assert [(d["metadata"]["name"], errors(d)) for d in caches] == [
        (d["metadata"]["name"], []) for d in caches
    ]
    assert all(CacheObject.from_api(d).spec.image == d["spec"]["image"] for d in caches)


def test_example_pods_name_example_caches_of_their_own_namespace_or_cluster_caches() -> None:
    documents = example_documents()
    namespaced = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in documents
        if d["kind"] == "GKMCache"
    }
    cluster = {d["metadata"]["name"] for d in documents if d["kind"] == "ClusterGKMCache"}
    for pod in (d for d in documents if d["kind"] == "Pod"):
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"]["volumes"]:
            attributes = volume["csi"]["volumeAttributes"]
            assert volume["csi"]["driver"] == "csi.gkm.io"
            if "csi.gkm.io/ClusterGKMCache" in attributes:
                assert attributes["csi.gkm.io/ClusterGKMCache"] in cluster
            else:
                assert attributes["csi.gkm.io/namespace"] == namespace
                assert (namespace, attributes["csi.gkm.io/GKMCache"]) in namespaced


def test_example_grants_use_of_the_cluster_cache_to_the_pods_service_account() -> None:
    # With KCACHE_CLUSTER_CACHE_ACCESS=restricted the node process asks whether the pod's
    # ServiceAccount may `use` clustergkmcaches/<name>; a cluster-scoped check sees only
    # ClusterRoleBindings.
    documents = example_documents()
    (cache,) = [d for d in documents if d["kind"] == "ClusterGKMCache"]
    (pod,) = [d for d in documents if d["kind"] == "Pod" and d["metadata"]["namespace"] == "team-b"]
    (role,) = [d for d in documents if d["kind"] == "ClusterRole"]
    (binding,) = [d for d in documents if d["kind"] == "ClusterRoleBinding"]
    account = pod["spec"].get("serviceAccountName", "default")
    assert (
        role["rules"],
        binding["roleRef"]["name"],
        binding["subjects"],
    ) == (
        [
            {
                "apiGroups": ["gkm.io"],
                "resources": ["clustergkmcaches"],
                "resourceNames": [cache["metadata"]["name"]],
                "verbs": ["use"],
            }
        ],
        role["metadata"]["name"],
        [{"kind": "ServiceAccount", "name": account, "namespace": "team-b"}],
    )
