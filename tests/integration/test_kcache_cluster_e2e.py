"""The kernel cache on a cluster, end to end: the README's example, unchanged, makes a pod skip JIT.

Everything is real but the API server: the operator and two node processes run as the
`gpufleet cache operator` / `gpufleet cache node` commands the manifests run, against the
Kubernetes API double over its socket, with the real docker-registry. The cache is a real
Triton cache compiled for sm_90 with the mount root ``/cache``; the pod mounts it at
``/mnt/kernels``. The kubelet's side is played over the node's real CSI socket with exactly the
volume context and target path the kubelet sends; the bind mount is real, and Triton then runs
in a private mount namespace where the target is bind-mounted at the pod's mount path, as the
container runtime does. The second node is a simulated DGX A100 (sm_80): the cache is
incompatible there, and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gpufleet.kcache.cluster import (
    CSI_DRIVER,
    GROUP,
    NAMESPACED_CACHE,
    NAMESPACED_CACHE_NODE,
    VERSION,
    CacheKey,
    node_label_key,
    node_object_name,
)
from gpufleet.kcache.crds import crd
from gpufleet.kcache.csi.v1 import csi_pb2
from gpufleet.kcache.mounts import mounted_at, read_mountinfo
from gpufleet.kcache.store import CacheStore
from tests.conftest import require
from tests.doubles.kubeapi import KubeApiDouble
from tests.kcache_csi_support import Place, kubelet_place, node_client, pod_publish_request
from tests.kcache_support import build_triton_cache, compile_again
from tests.polling import eventually

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[2] / "examples" / "kcache" / "gkmcache.yaml"
IMAGE_ROOT = "/cache"
POD_MOUNT = "/mnt/kernels"
H100, A100 = "gpu-h100", "gpu-a100"
PRESETS = {H100: "dgx-h100", A100: "dgx-a100"}
OPERATOR_NAMESPACE = "gpufleet-kcache"
NODE_OBJECTS = f"{NAMESPACED_CACHE_NODE.plural}.{GROUP}"
CACHES = f"{NAMESPACED_CACHE.plural}.{GROUP}"
WAIT = 120.0
GPUFLEET = [sys.executable, "-m", "gpufleet.cli", "cache"]


def example() -> tuple[dict[str, Any], dict[str, Any]]:
    """The README's example: the GKMCache and the Pod, as a user applies them."""
    cache, pod = (doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc)
    assert cache["kind"] == "GKMCache"
    assert pod["kind"] == "Pod"
    return cache, pod


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Triton cache for sm_90, compiled once for the module."""
    directory = tmp_path_factory.mktemp("e2e") / "triton"
    build_triton_cache(directory, archs=(90,))
    return directory


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "KCACHE_"))}


def push(triton: Path, registry: str) -> str:
    """`gpufleet cache build` to a new repository, mount root /cache; ``<ref>@<digest>``."""
    ref = f"{registry}/caches/vector-add-{uuid.uuid4().hex[:8]}:v1"
    done = subprocess.run(
        [*GPUFLEET, "build", str(triton), "-t", ref, "--mount-root", IMAGE_ROOT],
        capture_output=True, text=True, env=cli_env(), timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def pushed(triton: Path, test_servers: dict[str, str]) -> str:
    """The cache pushed to a repository of this test's own."""
    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    return push(triton, registry)


@pytest.fixture
def place() -> Iterator[Place]:
    with kubelet_place("kce-") as where:
        yield where


@contextlib.asynccontextmanager
async def started(args: list[str], env: dict[str, str], log: Path) -> AsyncIterator[None]:
    """A gpufleet command as a child process, stopped with SIGTERM (its log kept for failures)."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
        try:
            yield
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


@dataclass
class Cluster:
    api: KubeApiDouble
    place: Place
    logs: list[Path]

    def log_tail(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in self.logs if p.exists())


@pytest.fixture
async def cluster(place: Place) -> AsyncIterator[Cluster]:
    """The API double with the CRDs, two GPU nodes, the operator and a node process per node."""
    async with KubeApiDouble(bookmark_interval=0.5) as api:
        for resource in ("GKMCache", "ClusterGKMCache", "GKMCacheNode", "ClusterGKMCacheNode"):
            api.add_crd(crd(_resource(resource)))
        for node in PRESETS:
            api.add_node(node)
        kubeconfig = api.write_kubeconfig(place.root / "kubeconfig")
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("REGISTRY_", "KCACHE_", "KUBE", "NODE_", "CSI_", "LEASE_"))
        }
        base |= {"KUBECONFIG": str(kubeconfig), "LOG_LEVEL": "info"}
        operator_env = {
            "LEADER_ELECTION": "false",
            "NAMESPACE": OPERATOR_NAMESPACE,
            "KCACHE_RESOLVE_INTERVAL": "1",
        }
        logs = [place.root / "operator.log", *(place.root / f"{n}.log" for n in PRESETS)]
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                started(
                    [*GPUFLEET, "operator", "--server-port", "0"],
                    base | operator_env,
                    logs[0],
                )
            )
            for node, preset in PRESETS.items():
                args = [
                    *GPUFLEET, "node", "--simulate", preset, "--node-name", node,
                    "--csi-endpoint", place.endpoint_of(node), "--kubelet-dir", str(place.kubelet),
                    "--store", str(place.store_of(node)), "--metrics-port", "0",
                ]  # fmt: skip
                await stack.enter_async_context(started(args, base, place.root / f"{node}.log"))
            cluster = Cluster(api, place, logs)
            try:
                yield cluster
            except BaseException:
                sys.stderr.write(cluster.log_tail())
                raise


def _resource(kind: str) -> Any:
    from gpufleet.kcache import cluster as names

    return next(
        r
        for r in (
            names.NAMESPACED_CACHE,
            names.CLUSTER_CACHE,
            names.NAMESPACED_CACHE_NODE,
            names.CLUSTER_CACHE_NODE,
        )
        if r.kind == kind
    )


def apply_example(api: KubeApiDouble, image: str) -> tuple[CacheKey, dict[str, Any]]:
    """The example, with our registry's image and the pod on the H100 node at `POD_MOUNT`."""
    cache, pod = example()
    cache["spec"]["image"] = image.rsplit("@", 1)[0]
    pod["spec"]["nodeName"] = H100
    (mount,) = pod["spec"]["containers"][0]["volumeMounts"]
    mount["mountPath"] = POD_MOUNT
    pod["spec"]["containers"][0]["env"] = [{"name": "TRITON_CACHE_DIR", "value": POD_MOUNT}]
    api.add_object(cache)
    stored_pod = api.add_object(pod)
    key = CacheKey("GKMCache", cache["metadata"]["namespace"], cache["metadata"]["name"])
    return key, stored_pod


def cache_object(api: KubeApiDouble, key: CacheKey) -> dict[str, Any] | None:
    found = [o for o in api.objects(CACHES, key.namespace) if o["metadata"]["name"] == key.name]
    return found[0] if found else None


def node_state(api: KubeApiDouble, key: CacheKey, node: str, digest: str) -> dict[str, Any]:
    name = node_object_name(key, node)
    for obj in api.objects(NODE_OBJECTS, key.namespace):
        if obj["metadata"]["name"] == name:
            entry = obj.get("status", {}).get("caches", {}).get(key.name, {}).get(digest)
            if entry:
                return dict(entry)
    return {}


async def publish_when_ready(stub: Any, request: csi_pb2.NodePublishVolumeRequest) -> None:
    """Publish as the kubelet does: UNAVAILABLE means "still pulling", so ask again."""
    async with asyncio.timeout(WAIT):  # a hang guard: a pull that never ends
        while True:
            try:
                await stub.NodePublishVolume(request, timeout=30)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(0.2)


def in_pod_mount_namespace(target: Path) -> list[str]:
    """A wrapper that runs a command where `target` is bind-mounted read-only at `POD_MOUNT`."""
    script = (
        'set -e; mount -t tmpfs e2e /mnt; mkdir -p "$1"; mount --bind "$0" "$1"; '
        'mount -o remount,bind,ro "$1"; shift; exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            os.fspath(target), POD_MOUNT]  # fmt: skip


async def test_the_example_makes_the_pod_skip_jit_and_deleting_it_cleans_up(
    cluster: Cluster, pushed: str
) -> None:
    api, place = cluster.api, cluster.place
    digest = pushed.rsplit("@", 1)[1]
    key, pod = apply_example(api, pushed)

    # The operator resolves the tag once, for every node.
    await eventually(
        lambda: (cache_object(api, key) or {}).get("status", {}).get("resolvedDigest") == digest,
        limit=WAIT,
    )
    # The H100 node pulls it; the A100 node says why it cannot use it.
    await eventually(
        lambda: (cache_object(api, key) or {}).get("status", {}).get("ready") == "1/1",
        limit=WAIT,
    )
    h100 = node_state(api, key, H100, digest)
    assert h100["conditions"][0]["type"] in {"Extracted", "Running"}
    assert len(h100["compatibleGPUs"]) == 8
    a100 = node_state(api, key, A100, digest)
    assert a100["conditions"][0]["type"] == "Incompatible"
    assert "cuda arch 80" in a100["incompatibleGPUs"][0]["reason"]
    node = api.get("nodes", None, H100)
    assert node is not None
    assert node["metadata"]["labels"][node_label_key(key)] == "ready"
    status = (cache_object(api, key) or {})["status"]
    assert status["nodeSelector"] == {node_label_key(key): "ready"}

    # The kubelet publishes the pod's volume on the H100 node.
    volume = pod["spec"]["volumes"][0]["name"]
    target = place.target(pod["metadata"]["uid"], volume)
    request = pod_publish_request(pod, target, volume)
    async with node_client(place.endpoint_of(H100)) as stub:
        await publish_when_ready(stub, request)
        mount = mounted_at(target, read_mountinfo())
        assert mount is not None
        assert "ro" in mount.options
        with pytest.raises(OSError, match="Read-only file system") as refused:
            (target / "written-by-the-pod").write_bytes(b"x")
        assert refused.value.errno == errno.EROFS

        # Triton in the pod, at the pod's mount path, compiles nothing.
        report = await asyncio.to_thread(
            compile_again,
            Path(POD_MOUNT),
            archs=(90,),
            wrapper=in_pod_mount_namespace(target),
        )
        assert (report.compiled, report.cache_hits) == (0, 2)

        await eventually(
            lambda: node_state(api, key, H100, digest)["conditions"][0]["type"] == "Running",
            limit=WAIT,
        )
        await stub.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=request.volume_id, target_path=request.target_path
            ),
            timeout=30,
        )
    assert mounted_at(target, read_mountinfo()) is None
    assert not target.exists()

    # On the A100 node the same volume is refused with the GPU mismatch.
    a100_target = place.target(str(uuid.uuid4()), volume)
    a100_pod = {**pod, "metadata": {**pod["metadata"], "uid": a100_target.parents[3].name}}
    async with node_client(place.endpoint_of(A100)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as incompatible:
            await stub.NodePublishVolume(
                pod_publish_request(a100_pod, a100_target, volume), timeout=30
            )
    assert incompatible.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "cuda arch 80" in (incompatible.value.details() or "")

    # Deleting the cache removes the store entries, then the finalizer lets it go.
    api.delete_object(CACHES, key.namespace, key.name)
    await eventually(lambda: cache_object(api, key) is None, limit=WAIT)
    assert CacheStore(place.store_of(H100)).caches() == []
    assert not any(
        o["metadata"]["name"] == node_object_name(key, n)
        for o in api.objects(NODE_OBJECTS, key.namespace)
        for n in PRESETS
    )


async def test_a_pod_of_another_namespace_cannot_mount_the_cache(
    cluster: Cluster, pushed: str
) -> None:
    api, place = cluster.api, cluster.place
    key, pod = apply_example(api, pushed)
    await eventually(
        lambda: (cache_object(api, key) or {}).get("status", {}).get("ready") == "1/1",
        limit=WAIT,
    )
    intruder = api.add_object({**pod, "metadata": {"name": "intruder", "namespace": "team-b"}})
    volume = intruder["spec"]["volumes"][0]["name"]
    target = place.target(intruder["metadata"]["uid"], volume)
    async with node_client(place.endpoint_of(H100)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.NodePublishVolume(pod_publish_request(intruder, target, volume), timeout=30)
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert mounted_at(target, read_mountinfo()) is None
    assert CSI_DRIVER in str(intruder["spec"]["volumes"][0]["csi"]["driver"])
    assert VERSION == "v1alpha1"


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign(image: str, key: Path, signature_format: str) -> None:
    done = subprocess.run(
        [*GPUFLEET, "sign", image, "--key", str(key), "--format", signature_format],
        capture_output=True, text=True, env=cli_env(), timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for item in (obj or {}).get("status", {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return {}


@pytest.mark.parametrize("signature_format", ["cosign-v2", "cosign-v3"])
async def test_only_an_image_signed_with_a_trusted_key_reaches_a_node(
    cluster: Cluster, pushed: str, tmp_path: Path, signature_format: str
) -> None:
    api, place = cluster.api, cluster.place
    digest = pushed.rsplit("@", 1)[1]
    trusted, rogue = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    api.add_secret(
        OPERATOR_NAMESPACE, "gpufleet-kcache-trust", {"release.pub": public_pem(trusted)}
    )

    key, _ = apply_example(api, pushed)
    await eventually(
        lambda: condition(cache_object(api, key), "Verified").get("reason") == "Unsigned",
        limit=WAIT,
    )
    sign(pushed, write_private_key(tmp_path / "rogue.pem", rogue), signature_format)
    await eventually(
        lambda: condition(cache_object(api, key), "Verified").get("reason") == "WrongKey",
        limit=WAIT,
    )
    refused = cache_object(api, key) or {}
    assert "resolvedDigest" not in refused.get("status", {})
    assert node_state(api, key, H100, digest) == {}
    assert CacheStore(place.store_of(H100)).caches() == []

    sign(pushed, write_private_key(tmp_path / "trusted.pem", trusted), signature_format)
    await eventually(
        lambda: (cache_object(api, key) or {}).get("status", {}).get("ready") == "1/1",
        limit=WAIT,
    )
    verified = cache_object(api, key)
    assert condition(verified, "Verified")["status"] == "True"
    assert (verified or {})["status"]["resolvedDigest"] == digest
    assert [c.digest for c in CacheStore(place.store_of(H100)).caches()] == [digest]
