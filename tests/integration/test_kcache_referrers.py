"""cosign v3 bundles through a registry that HAS the referrers API, and hostile ones.

Debian's docker-registry (the other tests) answers 404 for
``/v2/<repo>/referrers/<digest>``, so there the referrers tag schema is used.
Here a small registry on a real loopback socket serves the API, so signing
must not write the tag schema index and verifying must read the API; its
hostile variants answer with a referrers index or a bundle that never ends,
too many referrers, or a bundle whose descriptor claims a gigabyte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gpufleet.kcache.bundle import (
    BUNDLE_MEDIA_TYPE,
    MAX_BUNDLE_BYTES,
    sign_image_bundle,
    verify_bundle_keys,
)
from gpufleet.kcache.errors import (
    RegistryError,
    UnsignedError,
    UntrustedSignatureError,
)
from gpufleet.kcache.oci import MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST, RegistryClient
from gpufleet.kcache.policy import TrustPolicy, Verified, verify_by_policy
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.referrers import MAX_REFERRERS, referrers_tag
from tests.doubles.hostile import HUGE, SOCKET_SLACK, HostileServer, Reply, Seen, in_thread

pytestmark = pytest.mark.integration

REPOSITORY = "caches/llama"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class ReferrersRegistry:
    """Just enough of the distribution API, with the OCI 1.1 referrers API, in memory.

    ``referrers`` may replace the answer to the referrers API (a hostile one);
    ``blob`` the answer to a blob GET.
    """

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    referrers: Callable[[Seen], Reply] | None = None
    blob: Callable[[Seen, str], Reply] | None = None

    def __call__(self, seen: Seen) -> Reply:
        url = urlsplit(seen.target)
        query = parse_qs(url.query)
        _, _, rest = url.path.partition("/v2/")
        for kind in ("/referrers/", "/manifests/", "/blobs/uploads/", "/blobs/"):
            repository, found, name = rest.partition(kind)
            if found:
                break
        else:
            return Reply(404)
        assert repository == REPOSITORY, seen.target
        if kind == "/referrers/":
            if self.referrers is not None:
                return self.referrers(seen)
            return self._referrers(name, query.get("artifactType", [None])[0])
        if kind == "/blobs/uploads/":
            if seen.method == "POST":
                return Reply(202, {"Location": f"/v2/{REPOSITORY}/blobs/uploads/u"})
            digest = query["digest"][0]
            assert _sha256(seen.body) == digest
            self.blobs[digest] = seen.body
            return Reply(201, {"Docker-Content-Digest": digest})
        if kind == "/blobs/":
            if name not in self.blobs:
                return Reply(404)
            if seen.method == "GET" and self.blob is not None:
                return self.blob(seen, name)
            return Reply(200, {"Docker-Content-Digest": name}, self.blobs[name])
        if seen.method == "PUT":
            digest = _sha256(seen.body)
            self.manifests[digest] = (seen.body, seen.headers["content-type"])
            if not name.startswith("sha256:"):
                self.tags[name] = digest
            headers = {"Docker-Content-Digest": digest}
            if "subject" in json.loads(seen.body):
                headers["OCI-Subject"] = json.loads(seen.body)["subject"]["digest"]
            return Reply(201, headers)
        digest = self.tags.get(name, name)
        if digest not in self.manifests:
            return Reply(404)
        body, media_type = self.manifests[digest]
        return Reply(200, {"Content-Type": media_type, "Docker-Content-Digest": digest}, body)

    def _referrers(self, digest: str, artifact_type: str | None) -> Reply:
        entries = []
        for key, (body, media_type) in self.manifests.items():
            document = json.loads(body)
            if document.get("subject", {}).get("digest") != digest:
                continue
            if artifact_type and document.get("artifactType") != artifact_type:
                continue
            entries.append({
                "mediaType": media_type, "digest": key, "size": len(body),
                "artifactType": document.get("artifactType"),
            })  # fmt: skip
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        headers = {"Content-Type": OCI_INDEX}
        if artifact_type:
            headers["OCI-Filters-Applied"] = "artifactType"
        return Reply(200, headers, json.dumps(index).encode())

    def push_image(self, tag: str = "v1") -> str:
        config, layer = b'{"config":{}}', b"not a cache"
        self.blobs[_sha256(config)] = config
        self.blobs[_sha256(layer)] = layer
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": _sha256(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": _sha256(layer), "size": len(layer)}],
        }).encode()  # fmt: skip
        digest = _sha256(manifest)
        self.manifests[digest] = (manifest, OCI_MANIFEST)
        self.tags[tag] = digest
        return digest


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def registry(hostile_servers: Callable[..., HostileServer]) -> tuple[ReferrersRegistry, str]:
    state = ReferrersRegistry()
    return state, hostile_servers(state).address


@pytest.fixture
def no_docker_config(tmp_path: Path) -> Path:
    empty = tmp_path / "docker-empty"
    empty.mkdir()
    return empty


def _policy(key: ec.EllipticCurvePrivateKey) -> TrustPolicy:
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TrustPolicy.from_secret_data({"ci.pub": pem})


def test_signing_uses_the_referrers_api_and_writes_no_tag_schema_index(
    hostile_servers: Callable[..., HostileServer],
    key: ec.EllipticCurvePrivateKey,
    no_docker_config: Path,
) -> None:
    state = ReferrersRegistry()
    server = hostile_servers(state)
    digest = state.push_image()
    ref = Reference.parse(f"{server.address}/{REPOSITORY}:v1")
    with RegistryClient(server.address, docker_config=no_docker_config) as client:
        referrer = sign_image_bundle(client, ref, key)
        verified = verify_by_policy(
            client, ref, _policy(key), namespace=None, signature_format="cosign-v3"
        )
    assert verified == Verified(digest=digest, key_name="ci", format="cosign-v3")
    assert referrers_tag(digest) not in state.tags
    assert referrer in state.manifests
    asked = [urlsplit(s.target) for s in server.seen if "/referrers/" in s.target]
    assert asked, "the referrers API was never asked"
    assert parse_qs(asked[-1].query)["artifactType"] == [BUNDLE_MEDIA_TYPE]


def test_an_unsigned_image_behind_the_referrers_api_is_unsigned(
    registry: tuple[ReferrersRegistry, str], key: ec.EllipticCurvePrivateKey, no_docker_config: Path
) -> None:
    state, address = registry
    state.push_image()
    ref = Reference.parse(f"{address}/{REPOSITORY}:v1")
    with (
        RegistryClient(address, docker_config=no_docker_config) as client,
        pytest.raises(UnsignedError, match="no Sigstore bundle referrer"),
    ):
        verify_bundle_keys(client, ref, {"ci": key.public_key()})


def _signed(
    state: ReferrersRegistry, address: str, key: ec.EllipticCurvePrivateKey, config: Path
) -> Reference:
    state.push_image()
    ref = Reference.parse(f"{address}/{REPOSITORY}:v1")
    with RegistryClient(address, docker_config=config) as client:
        sign_image_bundle(client, ref, key)
    return ref


def test_an_endless_referrers_index_is_read_no_further_than_the_manifest_cap(
    hostile_servers: Callable[..., HostileServer],
    key: ec.EllipticCurvePrivateKey,
    no_docker_config: Path,
) -> None:
    def endless(_: Seen) -> Reply:
        head = b'{"schemaVersion":2,"mediaType":"' + OCI_INDEX.encode() + b'","manifests":['
        filler = (b" " * (256 * 1024) for _ in range(HUGE // (256 * 1024)))
        return Reply(200, {"Content-Type": OCI_INDEX}, (head, *filler))

    state = ReferrersRegistry(referrers=endless)
    server = hostile_servers(state)
    state.push_image()
    ref = Reference.parse(f"{server.address}/{REPOSITORY}:v1")
    with RegistryClient(server.address, docker_config=no_docker_config) as client:
        error = in_thread(lambda: verify_bundle_keys(client, ref, {"ci": key.public_key()}))
    assert isinstance(error, RegistryError)
    assert f"larger than {MAX_MANIFEST_BYTES} bytes" in str(error)
    assert server.sent < MAX_MANIFEST_BYTES + SOCKET_SLACK


def test_a_referrers_index_longer_than_the_cap_is_refused_unwalked(
    hostile_servers: Callable[..., HostileServer],
    key: ec.EllipticCurvePrivateKey,
    no_docker_config: Path,
) -> None:
    entry = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "ab" * 32, "size": 700,
             "artifactType": BUNDLE_MEDIA_TYPE}  # fmt: skip
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry] * (MAX_REFERRERS + 1)}
    state = ReferrersRegistry(referrers=lambda _: Reply(200, {}, json.dumps(index).encode()))
    server = hostile_servers(state)
    state.push_image()
    ref = Reference.parse(f"{server.address}/{REPOSITORY}:v1")
    with (
        RegistryClient(server.address, docker_config=no_docker_config) as client,
        pytest.raises(UntrustedSignatureError, match=f"more than the {MAX_REFERRERS} read"),
    ):
        verify_bundle_keys(client, ref, {"ci": key.public_key()})
    assert not [s for s in server.seen if "ab" * 32 in s.target]


def test_an_endless_bundle_blob_is_cut_off_at_its_descriptors_size(
    hostile_servers: Callable[..., HostileServer],
    key: ec.EllipticCurvePrivateKey,
    no_docker_config: Path,
) -> None:
    state = ReferrersRegistry()
    server = hostile_servers(state)
    ref = _signed(state, server.address, key, no_docker_config)
    state.blob = lambda _, name: Reply(200, {}, (b"{" * (256 * 1024) for _ in range(1024)))
    bundles = [s for s in state.blobs if b"dsseEnvelope" in state.blobs[s]]
    assert bundles
    server.sent = 0
    with RegistryClient(server.address, docker_config=no_docker_config) as client:
        error = in_thread(lambda: verify_bundle_keys(client, ref, {"ci": key.public_key()}))
    assert isinstance(error, RegistryError)
    assert "longer than its descriptor says" in str(error)
    assert server.sent < MAX_BUNDLE_BYTES + SOCKET_SLACK


def test_a_bundle_layer_claiming_a_gigabyte_is_refused_before_any_blob_is_pulled(
    hostile_servers: Callable[..., HostileServer],
    key: ec.EllipticCurvePrivateKey,
    no_docker_config: Path,
) -> None:
    state = ReferrersRegistry()
    server = hostile_servers(state)
    state.push_image()
    image = state.tags["v1"]
    bundle_digest = "sha256:" + "cd" * 32
    state.blobs[bundle_digest] = b"never pulled"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": BUNDLE_MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   "digest": _sha256(b"{}"), "size": 2},
        "layers": [{"mediaType": BUNDLE_MEDIA_TYPE, "digest": bundle_digest, "size": 1 << 30}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": image, "size": 1},
    }).encode()  # fmt: skip
    state.manifests[_sha256(manifest)] = (manifest, OCI_MANIFEST)
    ref = Reference.parse(f"{server.address}/{REPOSITORY}:v1")
    with (
        RegistryClient(server.address, docker_config=no_docker_config) as client,
        pytest.raises(UntrustedSignatureError, match="bundle size 1073741824 is not between"),
    ):
        verify_bundle_keys(client, ref, {"ci": key.public_key()})
    assert not [s for s in server.seen if bundle_digest in s.target]


@pytest.mark.parametrize("status", [400, 404, 405])
def test_a_registry_refusing_the_referrers_endpoint_gets_the_tag_schema(
    hostile_servers: Callable[..., HostileServer],
    key: ec.EllipticCurvePrivateKey,
    no_docker_config: Path,
    status: int,
) -> None:
    state = ReferrersRegistry(referrers=lambda _: Reply(status, {}, b"unsupported"))
    server = hostile_servers(state)
    digest = state.push_image()
    ref = Reference.parse(f"{server.address}/{REPOSITORY}:v1")
    with RegistryClient(server.address, docker_config=no_docker_config) as client:
        sign_image_bundle(client, ref, key)
        assert referrers_tag(digest) in state.tags
        assert verify_bundle_keys(client, ref, {"ci": key.public_key()}) == (digest, "ci")


def test_a_referrers_api_failing_otherwise_is_a_registry_error_not_unsigned(
    hostile_servers: Callable[..., HostileServer],
    key: ec.EllipticCurvePrivateKey,
    no_docker_config: Path,
) -> None:
    state = ReferrersRegistry(referrers=lambda _: Reply(503, {}, b"down"))
    server = hostile_servers(state)
    state.push_image()
    ref = Reference.parse(f"{server.address}/{REPOSITORY}:v1")
    with (
        RegistryClient(server.address, docker_config=no_docker_config) as client,
        pytest.raises(RegistryError, match="HTTP 503") as failed,
    ):
        verify_by_policy(client, ref, _policy(key), namespace=None, signature_format=None)
    assert not isinstance(failed.value, UnsignedError)
