"""``gpufleet cache operator`` for real: kopf in-loop, the Kubernetes API double, docker-registry.

Each test runs the whole operator (`run_operator`: kopf, the reconciler, the health server,
leader election when asked) against `KubeApiDouble` serving the CRDs `kcache.crds`
renders, with images in the session's anonymous docker-registry. API economy is asserted
by counting the double's recorded requests, never by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from gpufleet.kcache.bundle import sign_image_bundle
from gpufleet.kcache.cluster import (
    ANNOTATION_RESOLVED_DIGEST,
    API_VERSION,
    CLUSTER_CACHE_FINALIZER,
    NAMESPACED_CACHE_FINALIZER,
    RESOURCES,
    CacheKey,
    node_object_name,
)
from gpufleet.kcache.crds import crd
from gpufleet.kcache.objects import new_node_object
from gpufleet.kcache.oci import RegistryClient, sha256_digest
from gpufleet.kcache.operator.run import OperatorRuntime, run_operator
from gpufleet.kcache.operator.settings import OperatorSettings
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.sign import sign_image
from gpufleet.kube.client import Kube, KubeSettings, connect
from tests.conftest import require
from tests.doubles.kubeapi import KubeApiDouble
from tests.polling import eventually

pytestmark = pytest.mark.integration

NS = "team-a"
OPERATOR_NS = "gpufleet"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LIMIT = 20.0  # seconds: a hang guard, never a timing


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble(bookmark_interval=0.5) as double:
        for resource in RESOURCES:
            double.add_crd(crd(resource))
        double.add_namespace(NS)
        double.add_namespace(OPERATOR_NS)
        double.add_node("node-1")
        double.add_node("node-2")
        yield double


@pytest.fixture
async def kube(api: KubeApiDouble) -> AsyncIterator[Kube]:
    settings = KubeSettings(qps=1000, burst=1000)
    async with await connect(settings, configuration=api.client_configuration()) as client:
        yield client


@pytest.fixture
def registry(test_servers: dict[str, str], tmp_path: Path) -> Iterator[RegistryClient]:
    (address,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    os.environ.setdefault("DOCKER_CONFIG", str(tmp_path))
    with RegistryClient(address, docker_config=tmp_path) as client:
        yield client


@pytest.fixture
def repo() -> str:
    return f"gpufleet-test/operator-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def no_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))


def push(client: RegistryClient, repository: str, tag: str) -> str:
    """Push a small distinct image at `tag`; its manifest digest."""
    config, layer = b'{"config": {}}', os.urandom(512)
    client.push_blob(repository, config)
    client.push_blob(repository, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256_digest(layer),
                    "size": len(layer),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    return client.push_manifest(repository, tag, manifest, OCI_MANIFEST)


def settings(**overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "leader_election": False,
        "server_port": 0,
        "namespace": OPERATOR_NS,
        "kcache_resolve_interval": 60.0,
        "log_format": "text",
    }
    values.update(overrides)
    return OperatorSettings(**values)


@contextlib.asynccontextmanager
async def operator(
    kube: Kube, config: OperatorSettings | None = None, *, coalesce: float = 0.05
) -> AsyncIterator[OperatorRuntime]:
    """Run the operator until the block ends; yields its runtime once it serves."""
    stop = asyncio.Event()
    started: list[OperatorRuntime] = []
    task = asyncio.create_task(
        run_operator(
            config or settings(), kube=kube, registry=CollectorRegistry(), stop=stop,
            started=started.append, coalesce=coalesce,
        )
    )  # fmt: skip
    try:
        await eventually(lambda: bool(started) or task.done(), LIMIT)
        if task.done():
            task.result()
        yield started[0]
    finally:
        stop.set()
        async with asyncio.timeout(LIMIT):
            await task


def cache_body(name: str, image: str, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "GKMCache",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": {"image": image},
    }


def cache_of(api: KubeApiDouble, name: str, namespace: str | None = NS) -> dict[str, Any] | None:
    plural = "gkmcaches.gkm.io" if namespace else "clustergkmcaches.gkm.io"
    found = [o for o in api.objects(plural, namespace) if o["metadata"]["name"] == name]
    return found[0] if found else None


def status_of(api: KubeApiDouble, name: str, namespace: str | None = NS) -> dict[str, Any]:
    found = cache_of(api, name, namespace)
    return (found or {}).get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def node_object(
    key: CacheKey, node: str, entries: dict[str, tuple[str, int]], message: str = ""
) -> dict[str, Any]:
    """The node process's object for `key` on `node`: digest → (state, pods mounting it)."""
    body = new_node_object(key, node)
    body["status"] = {
        "nodeName": node,
        "caches": {
            key.name: {
                digest: {
                    "conditions": [
                        {
                            "type": state, "status": "True", "reason": state, "message": message,
                            "lastTransitionTime": "2026-12-07T09:00:00Z",
                        }
                    ],
                    "pods": [
                        {"podNamespace": NS, "podName": f"p{i}", "volumeId": f"csi-{node}-{i}"}
                        for i in range(pods)
                    ],
                }
                for digest, (state, pods) in entries.items()
            }
        },
    }  # fmt: skip
    return body


def report(
    api: KubeApiDouble, key: CacheKey, node: str, entries: dict[str, tuple[str, int]]
) -> None:
    """Create or update the node object of `key` on `node` with `entries`."""
    body = node_object(key, node, entries)
    plural = "gkmcachenodes.gkm.io" if key.namespace else "clustergkmcachenodes.gkm.io"
    name = node_object_name(key, node)
    if any(o["metadata"]["name"] == name for o in api.objects(plural, key.namespace)):

        def mutate(obj: dict[str, Any]) -> None:
            obj["status"] = body["status"]

        api.update_object(plural, key.namespace, name, mutate)
    else:
        api.add_object(body)


async def resolved(api: KubeApiDouble, digest: str) -> None:
    """Wait until the cache vector-add has `digest` in its status."""
    await eventually(lambda: status_of(api, "vector-add").get("resolvedDigest") == digest, LIMIT)


def annotated(api: KubeApiDouble) -> str | None:
    """GKM's digest annotation on vector-add."""
    metadata = (cache_of(api, "vector-add") or {}).get("metadata") or {}
    value = (metadata.get("annotations") or {}).get(ANNOTATION_RESOLVED_DIGEST)
    return value if isinstance(value, str) else None


def status_writes(api: KubeApiDouble) -> int:
    return api.count(verb="patch", resource="gkmcaches", subresource="status")


async def settled(api: KubeApiDouble, quiet: float = 0.6) -> None:
    """Wait until no write reaches the double for `quiet` seconds (bounded by LIMIT)."""
    try:
        async with asyncio.timeout(LIMIT):  # a hang guard: a write every window never ends
            while True:
                before = api.count(verb="patch") + api.count(verb="delete")
                await asyncio.sleep(quiet)
                if api.count(verb="patch") + api.count(verb="delete") == before:
                    return
    except TimeoutError:
        pytest.fail("the operator kept writing")


KEY = CacheKey("GKMCache", NS, "vector-add")


# --- resolution ------------------------------------------------------------------------


async def test_a_new_cache_gets_its_digest_the_annotation_and_conditions(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    async with operator(kube):
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == digest, LIMIT
        )
        cache = cache_of(api, "vector-add")
        assert cache is not None
        status = cache["status"]
        assert status["resolvedImage"] == f"{registry.registry}/{repo}@{digest}"
        assert status["observedGeneration"] == 1
        assert condition(status, "Resolved")["status"] == "True"
        assert condition(status, "Verified")["reason"] == "NotRequired"
        assert condition(status, "Ready")["reason"] == "Pending"
        await eventually(lambda: annotated(api) == digest, LIMIT)
        assert (
            NAMESPACED_CACHE_FINALIZER
            in (cache_of(api, "vector-add") or {})["metadata"]["finalizers"]
        )


async def test_a_moved_tag_writes_the_new_digest_and_keeps_the_old_while_mounted(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    old = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    async with operator(kube, settings(kcache_resolve_interval=0.2)):
        await resolved(api, old)
        report(api, KEY, "node-1", {old: ("Running", 1)})
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "1/1", LIMIT)
        new = push(registry, repo, "v1")
        await resolved(api, new)
        status = status_of(api, "vector-add")
        assert status["previousDigests"] == [old]
        assert status["counts"]["podOutdatedCnt"] == 1
        await eventually(lambda: annotated(api) == new, LIMIT)  # patched right after
        report(api, KEY, "node-1", {new: ("Extracted", 0)})
        await eventually(lambda: status_of(api, "vector-add").get("previousDigests") == [], LIMIT)
        assert condition(status_of(api, "vector-add"), "Ready")["status"] == "True"


async def test_a_spec_change_is_resolved_at_once_and_observed(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    first, second = push(registry, repo, "v1"), push(registry, repo, "v2")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    async with operator(kube):  # re-resolving only every minute: the change must not wait
        await resolved(api, first)

        def retag(obj: dict[str, Any]) -> None:
            obj["spec"]["image"] = f"{registry.registry}/{repo}:v2"
            obj["metadata"]["generation"] = 2

        api.update_object("gkmcaches.gkm.io", NS, "vector-add", retag)
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == second, LIMIT
        )
        assert status_of(api, "vector-add")["observedGeneration"] == 2


async def test_a_missing_tag_says_not_found_and_writes_no_digest(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:nope"))
    async with operator(kube):
        await eventually(
            lambda: condition(status_of(api, "vector-add"), "Resolved").get("reason") == "NotFound",
            LIMIT,
        )
        assert "resolvedDigest" not in status_of(api, "vector-add")


# --- roll-up and API economy --------------------------------------------------------


async def test_node_objects_roll_up_into_counts_ready_and_the_ready_condition(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    api.add_node("a100")
    async with operator(kube):
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == digest, LIMIT
        )
        report(api, KEY, "node-1", {digest: ("Running", 2)})
        report(api, KEY, "node-2", {digest: ("Downloading", 0)})
        api.add_object(node_object(KEY, "a100", {digest: ("Incompatible", 0)}, "GPU is cuda/80/32"))
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "1/2", LIMIT)
        status = status_of(api, "vector-add")
        assert status["counts"] == {
            "nodeCnt": 3, "nodeReadyCnt": 1, "nodeIncompatibleCnt": 1, "nodeInUseCnt": 1,
            "nodeNotInUseCnt": 2, "nodeErrorCnt": 0, "podRunningCnt": 2, "podOutdatedCnt": 0,
        }  # fmt: skip
        ready = condition(status, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Running")
        report(api, KEY, "node-2", {digest: ("Extracted", 0)})
        await eventually(
            lambda: condition(status_of(api, "vector-add"), "Ready").get("status") == "True", LIMIT
        )
        assert status_of(api, "vector-add")["ready"] == "2/2"


async def test_an_idle_cluster_gets_no_writes(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    # Re-resolving five times a second: an unchanged tag must cost registry calls only.
    async with operator(kube, settings(kcache_resolve_interval=0.2)) as runtime:
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == digest, LIMIT
        )
        report(api, KEY, "node-1", {digest: ("Extracted", 0)})
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "1/1", LIMIT)
        await settled(api)
        writes = api.count(verb="patch") + api.count(verb="create") + api.count(verb="delete")
        resolutions = runtime.stats.resolutions
        await eventually(lambda: runtime.stats.resolutions >= resolutions + 5, LIMIT)
        assert api.count(verb="patch") + api.count(verb="create") + api.count(verb="delete") == (
            writes
        )


async def test_one_node_status_change_is_at_most_one_status_write(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    async with operator(kube) as runtime:
        report(api, KEY, "node-1", {digest: ("Downloading", 0)})
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == digest, LIMIT
        )
        await settled(api)
        before, reconciles = status_writes(api), runtime.stats.reconciles
        report(api, KEY, "node-1", {digest: ("Extracted", 0)})
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "1/1", LIMIT)
        # The operator sees its own write come back; that reconcile must not write again.
        await eventually(lambda: runtime.stats.reconciles >= reconciles + 2, LIMIT)
        await settled(api)
        assert status_writes(api) == before + 1


async def test_a_burst_of_node_changes_is_coalesced_into_one_status_write(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    for node in ("node-3", "node-4", "node-5"):
        api.add_node(node)
    async with operator(kube, coalesce=1.5):
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == digest, LIMIT
        )
        await settled(api, quiet=1.5)
        before = status_writes(api)
        for node in ("node-1", "node-2", "node-3", "node-4", "node-5"):
            report(api, KEY, node, {digest: ("Extracted", 0)})
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "5/5", LIMIT)
        await settled(api, quiet=2.0)
        assert status_writes(api) == before + 1


# --- deletion -------------------------------------------------------------------------


async def test_a_deleted_cache_is_kept_while_node_objects_remain_then_released(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    async with operator(kube) as runtime:
        await eventually(lambda: runtime.controller is not None, LIMIT)
        controller = runtime.controller
        assert controller is not None
        report(api, KEY, "node-1", {digest: ("Running", 1)})
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "1/1", LIMIT)
        api.delete_object("gkmcaches.gkm.io", NS, "vector-add")
        await settled(api)
        kept = cache_of(api, "vector-add")
        assert kept is not None
        assert kept["metadata"]["deletionTimestamp"]
        assert kept["metadata"]["finalizers"] == [NAMESPACED_CACHE_FINALIZER]
        # The node process unmounted everything and deleted its object: the cache goes.
        api.delete_object("gkmcachenodes.gkm.io", NS, node_object_name(KEY, "node-1"))
        await eventually(lambda: cache_of(api, "vector-add") is None, LIMIT)
        # Forgotten too: no worker, nothing left in memory for it.
        await eventually(lambda: controller.caches == 0 and not controller.workers, LIMIT)


async def test_node_objects_of_a_gone_node_are_deleted_and_release_the_cache(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    api.add_object(node_object(KEY, "node-gone", {digest: ("Running", 1)}))
    async with operator(kube):
        await eventually(lambda: not api.objects("gkmcachenodes.gkm.io", NS), LIMIT)
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "0/0", LIMIT)
        assert status_of(api, "vector-add")["counts"]["nodeCnt"] == 0
        report(api, KEY, "node-1", {digest: ("Running", 1)})
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "1/1", LIMIT)
        api.delete_object("gkmcaches.gkm.io", NS, "vector-add")
        await settled(api)
        assert cache_of(api, "vector-add") is not None  # node-1's pod still mounts it
        api.delete_object("nodes", None, "node-1")  # the node went away with its pod
        await eventually(lambda: cache_of(api, "vector-add") is None, LIMIT)


async def test_a_cluster_cache_gets_its_finalizer_and_the_access_mode(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    body = cache_body("shared", f"{registry.registry}/{repo}:v1")
    body["kind"] = "ClusterGKMCache"
    del body["metadata"]["namespace"]
    api.add_object(body)
    async with operator(kube, settings(kcache_cluster_cache_access="restricted")):
        await eventually(
            lambda: status_of(api, "shared", None).get("resolvedDigest") == digest, LIMIT
        )
        cache = cache_of(api, "shared", None)
        assert cache is not None
        assert cache["status"]["access"] == "restricted"
        assert cache["metadata"]["finalizers"] == [CLUSTER_CACHE_FINALIZER]
        api.delete_object("clustergkmcaches.gkm.io", None, "shared")
        await eventually(lambda: cache_of(api, "shared", None) is None, LIMIT)


# --- signatures -----------------------------------------------------------------------


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def trusted() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def trust_secret(api: KubeApiDouble, trusted: ec.EllipticCurvePrivateKey) -> None:
    api.add_secret(
        OPERATOR_NS,
        "gpufleet-kcache-trust",
        {"team-a.pub": public_pem(trusted), "policy.yaml": b"namespaces: {team-a: [team-a]}\n"},
    )


@pytest.mark.usefixtures("trust_secret")
async def test_an_unsigned_image_is_refused_and_no_digest_is_written(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    async with operator(kube):
        await eventually(lambda: condition(status_of(api, "vector-add"), "Verified") != {}, LIMIT)
        status = status_of(api, "vector-add")
        verified = condition(status, "Verified")
        assert (verified["status"], verified["reason"]) == ("False", "Unsigned")
        assert "team-a" in verified["message"]
        assert "resolvedDigest" not in status
        assert "resolvedImage" not in status
        await eventually(lambda: any(e["reason"] == "SignatureUnsigned" for e in api.events(NS)))


@pytest.mark.usefixtures("trust_secret")
async def test_an_image_signed_by_another_key_is_refused_as_wrong_key(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    push(registry, repo, "v1")
    reference = Reference.parse(f"{registry.registry}/{repo}:v1")
    sign_image(registry, reference, ec.generate_private_key(ec.SECP256R1()))
    api.add_object(cache_body("vector-add", str(reference)))
    async with operator(kube):
        await eventually(lambda: condition(status_of(api, "vector-add"), "Verified") != {}, LIMIT)
        verified = condition(status_of(api, "vector-add"), "Verified")
        assert (verified["status"], verified["reason"]) == ("False", "WrongKey")
        assert "resolvedDigest" not in status_of(api, "vector-add")


@pytest.mark.usefixtures("trust_secret")
async def test_a_signed_image_is_verified_and_a_moved_unsigned_tag_keeps_the_old_digest(
    api: KubeApiDouble,
    kube: Kube,
    registry: RegistryClient,
    repo: str,
    trusted: ec.EllipticCurvePrivateKey,
) -> None:
    signed = push(registry, repo, "v1")
    reference = Reference.parse(f"{registry.registry}/{repo}:v1")
    sign_image(registry, reference, trusted)
    api.add_object(
        cache_body("vector-add", str(reference), labels={"gkm.io/signature-format": "cosign-v2"})
    )
    async with operator(kube, settings(kcache_resolve_interval=0.2)):
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == signed, LIMIT
        )
        verified = condition(status_of(api, "vector-add"), "Verified")
        assert (verified["status"], verified["reason"]) == ("True", "Verified")
        swapped = push(registry, repo, "v1")  # the tag moves to bytes nobody signed
        await eventually(
            lambda: condition(status_of(api, "vector-add"), "Verified").get("status") == "False",
            LIMIT,
        )
        status = status_of(api, "vector-add")
        assert status["resolvedDigest"] == signed
        assert swapped in condition(status, "Verified")["message"]


# --- leader election and health --------------------------------------------------------


async def test_with_leader_election_only_the_lease_holder_runs_kopf(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    lease = {"leader_election": True, "lease_duration": 3.0, "lease_renew_deadline": 2.0,
             "lease_retry_period": 0.2}  # fmt: skip
    async with operator(kube, settings(pod_name="operator-a", **lease)) as first:
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == digest, LIMIT
        )
        held = api.get("leases", OPERATOR_NS, "gpufleet-kcache-operator")
        assert held is not None
        assert held["spec"]["holderIdentity"] == "operator-a"
        async with operator(kube, settings(pod_name="operator-b", **lease)) as second:
            await eventually(lambda: second.elector is not None and second.elector.healthy, LIMIT)
            assert second.controller is None
            assert first.controller is not None
        assert second.terms == 0


async def test_losing_the_lease_stops_kopf_and_a_later_term_resumes(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    lease = {"leader_election": True, "lease_duration": 2.0, "lease_renew_deadline": 1.5,
             "lease_retry_period": 0.2}  # fmt: skip
    async with operator(kube, settings(pod_name="operator-a", **lease)) as runtime:
        await eventually(
            lambda: status_of(api, "vector-add").get("resolvedDigest") == digest, LIMIT
        )

        def taken(obj: dict[str, Any]) -> None:
            obj["spec"]["holderIdentity"] = "intruder"

        terms = runtime.terms
        api.update_object("leases", OPERATOR_NS, "gpufleet-kcache-operator", taken)
        await eventually(lambda: runtime.controller is None, LIMIT)
        # The intruder never renews: once its lease expires this replica leads again.
        await eventually(lambda: runtime.terms > terms and runtime.controller is not None, LIMIT)
        # The new term starts from a fresh list and resolves every cache once.
        new = push(registry, repo, "v1")
        await resolved(api, new)


async def test_without_leader_election_it_leads_at_once_and_serves_health(
    api: KubeApiDouble, kube: Kube
) -> None:
    async with operator(kube) as runtime:
        assert runtime.elector is None
        await eventually(lambda: runtime.kopf_ready is not None and runtime.kopf_ready.is_set())
        base = f"http://127.0.0.1:{runtime.server.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as health:
                assert health.status == 200
            async with session.get(f"{base}/readyz") as ready:
                assert ready.status == 200
            async with session.get(f"{base}/metrics") as metrics:
                text = await metrics.text()
        assert "gpufleet_kcache_operator_leader 1.0" in text
    assert api.get("leases", OPERATOR_NS, "gpufleet-kcache-operator") is None


async def test_a_malformed_trust_secret_refuses_new_digests(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    push(registry, repo, "v1")
    api.add_secret(OPERATOR_NS, "gpufleet-kcache-trust", {"policy.yaml": b"cluster: [nobody]\n"})
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    async with operator(kube):
        await eventually(lambda: condition(status_of(api, "vector-add"), "Verified") != {}, LIMIT)
        verified = condition(status_of(api, "vector-add"), "Verified")
        assert (verified["status"], verified["reason"]) == ("False", "Error")
        assert "gpufleet/gpufleet-kcache-trust" in verified["message"]
        assert "resolvedDigest" not in status_of(api, "vector-add")


async def test_an_unreachable_registry_is_a_registry_error_and_no_digest(
    api: KubeApiDouble, kube: Kube
) -> None:
    api.add_object(cache_body("vector-add", "127.0.0.1:9/gpufleet-test/nowhere:v1"))
    async with operator(kube, settings(kcache_resolve_timeout=5.0)) as runtime:
        await eventually(
            lambda: (
                condition(status_of(api, "vector-add"), "Resolved").get("reason") == "RegistryError"
            ),
            LIMIT,
        )
        assert "resolvedDigest" not in status_of(api, "vector-add")
        tried = runtime.stats.resolutions
        await eventually(lambda: runtime.stats.resolutions > tried, LIMIT)  # retried, no crash


async def test_a_restarted_operator_writes_nothing_when_nothing_changed(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    report(api, KEY, "node-1", {digest: ("Extracted", 0)})
    async with operator(kube):
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "1/1", LIMIT)
        await settled(api)
    writes = api.count(verb="patch") + api.count(verb="create") + api.count(verb="delete")
    async with operator(kube) as runtime:
        await eventually(lambda: runtime.stats.resolutions >= 1, LIMIT)
        await settled(api)
    assert api.count(verb="patch") + api.count(verb="create") + api.count(verb="delete") == writes


# --- the command ------------------------------------------------------------------------

GPUFLEET = [sys.executable, "-m", "gpufleet.cli", "cache", "operator"]


def command_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "KCACHE_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"KCACHE_CLUSTER_CACHE_ACCESS": "everyone"}, "KCACHE_CLUSTER_CACHE_ACCESS"),
        ({"KCACHE_RESOLVE_INTERVAL": "soon"}, "KCACHE_RESOLVE_INTERVAL"),
        ({"REGISTRY_USERNAME": "bob"}, "REGISTRY_PASSWORD"),
    ],
)
def test_bad_settings_exit_2_with_one_line_naming_the_variable(
    variables: dict[str, str], named: str
) -> None:
    result = subprocess.run(
        GPUFLEET, capture_output=True, text=True, env=command_env(**variables), timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_the_command_resolves_logs_json_and_stops_on_sigterm(
    api: KubeApiDouble, registry: RegistryClient, repo: str, tmp_path: Path
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    env = command_env(
        KUBECONFIG=str(kubeconfig), LEADER_ELECTION="false", SERVER_PORT="0",
        NAMESPACE=OPERATOR_NS, DOCKER_CONFIG=str(tmp_path),
    )  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *GPUFLEET, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        await resolved(api, digest)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert stdout == b""
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    assert any(line["msg"] == "status written" for line in lines)
    assert any(line["msg"].startswith("Initial authentication") for line in lines)  # kopf's


async def test_a_start_checks_nodes_with_one_list_not_a_get_per_node_object(
    api: KubeApiDouble, kube: Kube, registry: RegistryClient, repo: str
) -> None:
    digest = push(registry, repo, "v1")
    api.add_object(cache_body("vector-add", f"{registry.registry}/{repo}:v1"))
    for node in ("node-1", "node-2"):
        report(api, KEY, node, {digest: ("Extracted", 0)})
    async with operator(kube):
        await eventually(lambda: status_of(api, "vector-add").get("ready") == "2/2", LIMIT)
        await settled(api)
    assert api.count(verb="get", resource="nodes") == 0
    assert api.count(verb="delete") == 0


@pytest.mark.usefixtures("trust_secret")
async def test_a_cosign_v3_bundle_is_verified_and_the_label_holds_the_check_to_its_format(
    api: KubeApiDouble,
    kube: Kube,
    registry: RegistryClient,
    repo: str,
    trusted: ec.EllipticCurvePrivateKey,
) -> None:
    signed = push(registry, repo, "v1")
    reference = Reference.parse(f"{registry.registry}/{repo}:v1")
    sign_image_bundle(registry, reference, trusted)
    api.add_object(
        cache_body("bundle", str(reference), labels={"gkm.io/signature-format": "cosign-v3"})
    )
    api.add_object(
        cache_body("sig", str(reference), labels={"gkm.io/signature-format": "cosign-v2"})
    )
    async with operator(kube):
        await eventually(lambda: status_of(api, "bundle").get("resolvedDigest") == signed, LIMIT)
        verified = condition(status_of(api, "bundle"), "Verified")
        assert (verified["reason"], "cosign-v3" in verified["message"]) == ("Verified", True)
        await eventually(lambda: condition(status_of(api, "sig"), "Verified") != {}, LIMIT)
        assert condition(status_of(api, "sig"), "Verified")["reason"] == "Unsigned"
        assert "resolvedDigest" not in status_of(api, "sig")
