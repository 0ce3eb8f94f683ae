"""`verify_by_policy` against Debian's docker-registry: keys by namespace, both cosign formats.

Images here are tiny (a config and a layer that are not a cache): policy
verification reads manifests and signatures only. The registry has no
referrers API, so cosign v3 bundles go through the referrers tag schema.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gpufleet.kcache.bundle import BUNDLE_MEDIA_TYPE, sign_image_bundle
from gpufleet.kcache.errors import (
    SignatureError,
    SignedDigestMismatchError,
    UnsignedError,
    UntrustedSignatureError,
)
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.policy import TrustPolicy, Verified, verify_by_policy
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.referrers import referrers_tag
from gpufleet.kcache.sign import sign_image, signature_tag
from tests.conftest import require
from tests.integration.kcache_cli_support import push_image

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(test_servers: dict[str, str]) -> str:
    (address,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    return address


@pytest.fixture
def client(registry: str) -> Iterator[RegistryClient]:
    with RegistryClient(registry) as client:
        yield client


@pytest.fixture(scope="module")
def keys() -> dict[str, ec.EllipticCurvePrivateKey]:
    return {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ci", "team-a", "rogue")}


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def policy(keys: dict[str, ec.EllipticCurvePrivateKey]) -> TrustPolicy:
    """ci signs cluster caches and every namespace's; team-a also trusts its own key."""
    data = {f"{name}.pub": _pem(key) for name, key in keys.items() if name != "rogue"}
    data["policy.yaml"] = b'cluster: [ci]\nnamespaces: {team-a: [team-a, ci], "*": [ci]}\n'
    return TrustPolicy.from_secret_data(data)


Signer = Callable[[RegistryClient, Reference, ec.EllipticCurvePrivateKey], str]


@dataclass(frozen=True)
class PolicyImage:
    """An image in the registry with the keys that may sign it and the policy that judges it."""

    client: RegistryClient
    ref: Reference
    digest: str
    keys: dict[str, ec.EllipticCurvePrivateKey]
    policy: TrustPolicy

    def sign(self, key: str, signer: Signer = sign_image) -> str:
        """Sign the image with `keys[key]` (cosign v2 unless `signer` says otherwise)."""
        return signer(self.client, self.ref, self.keys[key])

    def verify(
        self,
        namespace: str | None,
        signature_format: str | None = None,
        *,
        ref: Reference | None = None,
        policy: TrustPolicy | None = None,
    ) -> Verified:
        """`verify_by_policy` of the image (or `ref`) under the policy (or `policy`)."""
        return verify_by_policy(
            self.client, ref or self.ref, policy or self.policy, namespace=namespace,
            signature_format=signature_format,
        )  # fmt: skip

    def push_over(self, content: bytes) -> str:
        """Push another image under the same tag; its digest."""
        return push_image(self.client, self.ref, content)

    def copy_manifest(self, source: str, target: str) -> None:
        """Copy the manifest at `source` (a tag or digest) to the tag `target`."""
        manifest, media_type, _ = self.client.get_manifest(self.ref.repository, source)
        self.client.push_manifest(self.ref.repository, target, manifest, media_type)


def policy_image(
    client: RegistryClient,
    ref: Reference,
    keys: dict[str, ec.EllipticCurvePrivateKey],
    policy: TrustPolicy,
) -> PolicyImage:
    """Push a fresh image at `ref` through `client`, for the keys and the policy to judge."""
    return PolicyImage(client, ref, push_image(client, ref, uuid.uuid4().bytes), keys, policy)


@pytest.fixture
def image(
    client: RegistryClient,
    registry: str,
    keys: dict[str, ec.EllipticCurvePrivateKey],
    policy: TrustPolicy,
) -> PolicyImage:
    ref = Reference.parse(f"{registry}/kcache-policy/img-{uuid.uuid4().hex[:8]}:v1")
    return policy_image(client, ref, keys, policy)


# -- cosign v2 (.sig tag) ------------------------------------------------------------------


@pytest.mark.parametrize("label", [None, "cosign-v2"])
def test_an_image_signed_v2_with_a_trusted_key_is_verified(
    image: PolicyImage, label: str | None
) -> None:
    image.sign("ci")
    verified = image.verify(None, label)
    assert verified == Verified(digest=image.digest, key_name="ci", format="cosign-v2")


def test_a_namespace_key_verifies_only_in_its_namespace(image: PolicyImage) -> None:
    image.sign("team-a")
    verified = image.verify("team-a")
    assert (verified.digest, verified.key_name) == (image.digest, "team-a")
    for scope in ("team-b", None):
        with pytest.raises(UntrustedSignatureError, match=r"keys 'ci'"):
            image.verify(scope)


def test_an_unsigned_image_is_refused_as_unsigned(image: PolicyImage) -> None:
    with pytest.raises(UnsignedError, match="unsigned") as refused:
        image.verify(None)
    message = str(refused.value)
    assert image.digest in message
    assert "ClusterGKMCache" in message
    assert "'ci'" in message


def test_an_image_signed_by_another_key_is_untrusted_and_no_key_is_shown(
    image: PolicyImage,
) -> None:
    image.sign("rogue")
    with pytest.raises(UntrustedSignatureError, match="does not verify") as refused:
        image.verify("team-a", "cosign-v2")
    message = str(refused.value)
    assert "'ci'" in message
    assert "'team-a'" in message
    for key in image.keys.values():
        pem_body = b"".join(_pem(key).splitlines()[1:-1]).decode()
        assert pem_body[:24] not in message


def test_a_tag_moved_to_another_image_after_signing_is_refused(image: PolicyImage) -> None:
    image.sign("ci")
    swapped = image.push_over(b"another image under the signed tag")
    assert swapped != image.digest
    with pytest.raises(UnsignedError, match=swapped):
        image.verify(None)


def test_a_signature_copied_to_the_swapped_digest_is_a_digest_mismatch(
    image: PolicyImage,
) -> None:
    signed = image.digest
    image.sign("ci")
    swapped = image.push_over(b"another image, with the old signature copied")
    image.copy_manifest(signature_tag(signed), signature_tag(swapped))
    with pytest.raises(SignedDigestMismatchError, match=f"names {signed}, not this image's"):
        image.verify(None, "cosign-v2")


def test_nothing_is_checked_where_nothing_is_required(image: PolicyImage) -> None:
    open_policy = TrustPolicy.from_secret_data({})
    verified = image.verify("x", policy=open_policy)
    assert verified == Verified(digest=image.digest, key_name=None, format=None)
    assert not verified.required


def test_a_digest_reference_is_verified_as_that_digest(image: PolicyImage) -> None:
    image.sign("ci")
    pinned = Reference.parse(f"{image.ref.registry}/{image.ref.repository}@{image.digest}")
    verified = image.verify("x", ref=pinned)
    assert verified.digest == image.digest


def test_every_refusal_is_a_signature_error() -> None:
    for kind in (UnsignedError, UntrustedSignatureError, SignedDigestMismatchError):
        assert issubclass(kind, SignatureError)


# -- cosign v3 (bundle referrer, through the referrers tag schema) -------------------------


@pytest.mark.parametrize("label", [None, "cosign-v3"])
def test_an_image_signed_v3_with_a_trusted_key_is_verified(
    image: PolicyImage, label: str | None
) -> None:
    image.sign("ci", sign_image_bundle)
    verified = image.verify("team-b", label)
    assert verified == Verified(digest=image.digest, key_name="ci", format="cosign-v3")


def test_the_v3_signature_is_listed_in_the_referrers_tag_schema_index(image: PolicyImage) -> None:
    client, ref, digest = image.client, image.ref, image.digest
    referrer = image.sign("ci", sign_image_bundle)
    index, _, _ = client.get_manifest(ref.repository, referrers_tag(digest))
    entries = json.loads(index)["manifests"]
    assert [(e["digest"], e["artifactType"]) for e in entries] == [(referrer, BUNDLE_MEDIA_TYPE)]
    manifest = json.loads(client.get_manifest(ref.repository, referrer)[0])
    assert manifest["subject"]["digest"] == digest
    assert manifest["artifactType"] == BUNDLE_MEDIA_TYPE


def test_signing_v3_again_with_the_same_key_adds_nothing(image: PolicyImage) -> None:
    first = image.sign("ci", sign_image_bundle)
    assert image.sign("ci", sign_image_bundle) == first
    other = image.sign("team-a", sign_image_bundle)
    listed = image.client.get_manifest(image.ref.repository, referrers_tag(image.digest))[0]
    index = json.loads(listed)
    assert [e["digest"] for e in index["manifests"]] == [first, other]


@pytest.mark.parametrize(
    ("signer", "label"),
    [(sign_image, "cosign-v3"), (sign_image_bundle, "cosign-v2")],
    ids=["v2-signed-v3-wanted", "v3-signed-v2-wanted"],
)
def test_the_format_label_checks_only_that_format(
    image: PolicyImage, signer: Signer, label: str
) -> None:
    image.sign("ci", signer)
    with pytest.raises(UnsignedError, match=rf"is unsigned .*\[{label}\] is unsigned"):
        image.verify(None, label)
    assert image.verify(None).key_name


def test_an_image_signed_v3_by_another_key_is_untrusted(image: PolicyImage) -> None:
    image.sign("rogue", sign_image_bundle)
    with pytest.raises(UntrustedSignatureError, match=r"does not verify with any of the keys"):
        image.verify("team-a")


def test_a_v3_tag_moved_after_signing_is_refused_and_a_copied_index_is_a_mismatch(
    image: PolicyImage,
) -> None:
    signed = image.digest
    image.sign("ci", sign_image_bundle)
    swapped = image.push_over(b"another image under the v3-signed tag")
    with pytest.raises(UnsignedError, match=swapped):
        image.verify(None)
    image.copy_manifest(referrers_tag(signed), referrers_tag(swapped))
    with pytest.raises(SignedDigestMismatchError, match=f"names {signed}, not this image's"):
        image.verify(None)


def test_both_formats_work_against_the_registry_that_wants_credentials(
    test_servers: dict[str, str],
    keys: dict[str, ec.EllipticCurvePrivateKey],
    policy: TrustPolicy,
    tmp_path: Path,
) -> None:
    address, user, password = require(
        test_servers,
        "GPUFLEET_TEST_REGISTRY_AUTH",
        "GPUFLEET_TEST_REGISTRY_AUTH_USER",
        "GPUFLEET_TEST_REGISTRY_AUTH_PASSWORD",
    )
    ref = Reference.parse(f"{address}/kcache-policy/auth-{uuid.uuid4().hex[:8]}:v1")
    with RegistryClient(
        address, username=user, password=password, docker_config=tmp_path
    ) as client:
        image = policy_image(client, ref, keys, policy)
        image.sign("ci", sign_image_bundle)
        image.sign("team-a")
        v3 = image.verify("team-b")
        v2 = image.verify("team-a", "cosign-v2")
    assert v3 == Verified(digest=image.digest, key_name="ci", format="cosign-v3")
    assert v2 == Verified(digest=image.digest, key_name="team-a", format="cosign-v2")
