"""cosign key-based signatures: keys, payloads, signature images, sign and verify.

Image signing runs against a small in-memory registry that keeps the
`RegistryClient` contract (blobs by digest, manifests by tag and digest,
digest-checked pulls); the real-registry round trip is an integration test.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gpufleet.kcache.errors import (
    DigestMismatchError,
    InvalidReferenceError,
    NotFoundError,
    SignatureError,
)
from gpufleet.kcache.keys import (
    SigningKeyError,
    load_private_key,
    load_public_key,
    password_from_env,
)
from gpufleet.kcache.sign import (
    OCI_CONFIG_MEDIA_TYPE,
    OCI_MANIFEST_MEDIA_TYPE,
    SIGNATURE_ANNOTATION,
    SIGNATURE_TYPE,
    SIMPLE_SIGNING_MEDIA_TYPE,
    parse_payload,
    payload,
    sign_image,
    sign_payload,
    signature_config,
    signature_manifest,
    signature_tag,
    verify_image,
    verify_payload,
)

DIGEST = "sha256:" + "d34db33f" * 8
OTHER_DIGEST = "sha256:" + "0123abcd" * 8


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(
    path: Path,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    password: bytes | None = None,
) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, encryption))
    return path


def _write_public(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _same_key(a: ec.EllipticCurvePrivateKey, b: ec.EllipticCurvePrivateKey) -> bool:
    return a.private_numbers() == b.private_numbers()


# -- keys ----------------------------------------------------------------------------------


def test_an_unencrypted_pkcs8_p256_key_loads(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = _write_private(tmp_path / "k.pem", key)
    assert _same_key(load_private_key(path), key)


def test_a_sec1_ec_private_key_loads(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path = _write_private(tmp_path / "k.pem", key, serialization.PrivateFormat.TraditionalOpenSSL)
    assert path.read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert _same_key(load_private_key(path), key)


def test_a_password_given_for_an_unencrypted_key_is_ignored(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = _write_private(tmp_path / "k.pem", key)
    assert _same_key(load_private_key(path, b"set for another key"), key)


def test_an_encrypted_pem_key_loads_with_its_password(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = _write_private(tmp_path / "k.pem", key, password=b"s3cret")
    assert _same_key(load_private_key(path, b"s3cret"), key)


def test_an_encrypted_pem_key_with_the_wrong_password_is_refused(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = _write_private(tmp_path / "k.pem", key, password=b"s3cret")
    with pytest.raises(SigningKeyError, match="wrong password"):
        load_private_key(path, b"guess")


def test_an_encrypted_pem_key_without_a_password_asks_for_cosign_password(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = _write_private(tmp_path / "k.pem", key, password=b"s3cret")
    with pytest.raises(SigningKeyError, match="COSIGN_PASSWORD"):
        load_private_key(path)


def test_a_p384_private_key_is_refused(tmp_path: Path) -> None:
    path = _write_private(tmp_path / "k.pem", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(SigningKeyError, match=r"secp384r1.*P-256"):
        load_private_key(path)


def test_an_rsa_private_key_is_refused(tmp_path: Path) -> None:
    path = _write_private(
        tmp_path / "k.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    with pytest.raises(SigningKeyError, match=r"RSA 2048-bit.*P-256"):
        load_private_key(path)


def test_cosigns_own_encrypted_key_is_refused_with_a_way_to_a_pem_key(tmp_path: Path) -> None:
    sealed = base64.encodebytes(json.dumps({"kdf": {"name": "scrypt"}}).encode()).decode()
    path = tmp_path / "cosign.key"
    path.write_text(
        f"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n{sealed}"
        "-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n"
    )
    with pytest.raises(SigningKeyError, match="cosign's encrypted key format") as refused:
        load_private_key(path, b"pw")
    assert "openssl genpkey" in str(refused.value)
    assert "cosign import-key-pair" in str(refused.value)


def test_a_public_key_given_for_signing_is_refused(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = _write_public(tmp_path / "k.pub", key)
    with pytest.raises(SigningKeyError, match="holds a public key"):
        load_private_key(path)


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match=r"absent\.pem"):
        load_private_key(tmp_path / "absent.pem")


def test_a_subject_public_key_info_pem_loads(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    loaded = load_public_key(_write_public(tmp_path / "cosign.pub", key))
    assert loaded.public_numbers() == key.public_key().public_numbers()


def test_a_p384_public_key_is_refused(tmp_path: Path) -> None:
    path = _write_public(tmp_path / "k.pub", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(SigningKeyError, match="secp384r1"):
        load_public_key(path)


def test_an_rsa_public_key_is_refused(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(SigningKeyError, match="RSA"):
        load_public_key(_write_public(tmp_path / "k.pub", rsa_key))


def test_a_private_key_given_for_verifying_is_refused(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(SigningKeyError, match="holds a private key"):
        load_public_key(_write_private(tmp_path / "k.pem", key))


def test_the_password_comes_from_cosign_password_and_may_be_empty() -> None:
    assert password_from_env({"COSIGN_PASSWORD": "pw"}) == b"pw"
    assert password_from_env({"COSIGN_PASSWORD": ""}) == b""
    assert password_from_env({}) is None


# -- payload and signatures ----------------------------------------------------------------


def test_signature_tag_is_the_digest_with_a_dash_and_a_sig_suffix() -> None:
    assert signature_tag(DIGEST) == "sha256-" + "d34db33f" * 8 + ".sig"


@pytest.mark.parametrize("digest", ["sha256:abc", "sha512:" + "ab" * 64, "d34db33f" * 8])
def test_signature_tag_refuses_what_is_not_a_sha256_digest(digest: str) -> None:
    with pytest.raises(ValueError, match="sha256 digest"):
        signature_tag(digest)


def test_the_payload_carries_the_three_critical_fields() -> None:
    critical = json.loads(payload("registry.local:5000/caches/llama", DIGEST))["critical"]
    assert critical == {
        "identity": {"docker-reference": "registry.local:5000/caches/llama"},
        "image": {"docker-manifest-digest": DIGEST},
        "type": "cosign container image signature",
    }


def test_the_payload_bytes_are_the_compact_json_cosign_writes() -> None:
    # The literal cosign's payload.Cosign marshals for the same image (sigstore's own test).
    assert payload("example.com/test/image", DIGEST) == (
        b'{"critical":{"identity":{"docker-reference":"example.com/test/image"},'
        b'"image":{"docker-manifest-digest":"' + DIGEST.encode() + b'"},'
        b'"type":"cosign container image signature"},"optional":null}'
    )


# A signature `cosign sign --key` (v1.13.1) pushed, as its published debug trace shows it.
COSIGN_REPOSITORY = "index.docker.io/chihjenhuang/cosign1"
COSIGN_IMAGE_DIGEST = "sha256:4c1c50d0ffc614f90b93b07d778028dc765548e823f676fb027f61d281ac380d"
COSIGN_PAYLOAD_DIGEST = "sha256:b671489ededd1a180bd87235bba00fd83354f9c7d13b71d9f8b66a8e52965ebc"
COSIGN_SIGNATURE = (
    "MEYCIQCPH7NJAIfrB6BZN91dV0o7l/i11muXrvrAh100jDMMhAIh"
    "APsLH0oXb2OPITXRpWBMUd3vHtz5Ks5pql2Hr6t/IJXw"
)
COSIGN_CONFIG = (
    b'{"architecture":"","created":"2023-02-17T09:25:33.91047962-08:00",'
    b'"history":[{"created":"0001-01-01T00:00:00Z"}],"os":"","rootfs":{"type":"layers",'
    b'"diff_ids":["' + COSIGN_PAYLOAD_DIGEST.encode() + b'"]},"config":{}}'
)
COSIGN_MANIFEST_DIGEST = "sha256:7ebe8964225fa4619b53aa35416ef0246c037e36ddf81776b21b15e1dda2262b"


def test_the_payload_is_byte_for_byte_the_one_cosign_signed() -> None:
    body = payload(COSIGN_REPOSITORY, COSIGN_IMAGE_DIGEST)
    assert (len(body), _sha256(body)) == (252, COSIGN_PAYLOAD_DIGEST)


def test_the_signature_manifest_is_byte_for_byte_the_one_cosign_pushed() -> None:
    body = payload(COSIGN_REPOSITORY, COSIGN_IMAGE_DIGEST)
    manifest = signature_manifest(body, COSIGN_SIGNATURE, config=COSIGN_CONFIG)
    assert (len(manifest), _sha256(manifest)) == (558, COSIGN_MANIFEST_DIGEST)


def test_a_payload_reads_back_as_its_claims() -> None:
    claims = parse_payload(payload("example.com/test/image", DIGEST))
    assert (claims.docker_reference, claims.manifest_digest) == ("example.com/test/image", DIGEST)


@pytest.mark.parametrize(
    "document",
    [
        b"not json",
        b"[]",
        b'{"critical":{"identity":{"docker-reference":"r"},"type":"'
        + SIGNATURE_TYPE.encode()
        + b'"}}',
        b'{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":"'
        + DIGEST.encode()
        + b'"},"type":"atomic container signature"}}',
        b'{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":7},'
        b'"type":"' + SIGNATURE_TYPE.encode() + b'"}}',
    ],
    ids=["not-json", "not-an-object", "no-digest", "other-type", "digest-not-text"],
)
def test_a_malformed_payload_is_refused(document: bytes) -> None:
    with pytest.raises(SignatureError, match="payload"):
        parse_payload(document)


def test_a_signature_verifies_with_the_signers_public_key(key: ec.EllipticCurvePrivateKey) -> None:
    data = payload("example.com/test/image", DIGEST)
    verify_payload(key.public_key(), data, sign_payload(key, data))


def test_a_signature_is_base64_of_a_der_ecdsa_signature(key: ec.EllipticCurvePrivateKey) -> None:
    der = base64.b64decode(sign_payload(key, b"data"), validate=True)
    r, s = decode_dss_signature(der)
    assert r > 0
    assert s > 0


def test_flipping_one_payload_byte_breaks_the_signature(key: ec.EllipticCurvePrivateKey) -> None:
    data = payload("example.com/test/image", DIGEST)
    signature = sign_payload(key, data)
    flipped = bytes([data[0] ^ 0x01]) + data[1:]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_payload(key.public_key(), flipped, signature)


def test_another_key_does_not_verify(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    data = payload("example.com/test/image", DIGEST)
    with pytest.raises(SignatureError, match="does not verify with this key"):
        verify_payload(other_key.public_key(), data, sign_payload(key, data))


def test_a_signature_that_is_not_base64_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(SignatureError, match="not base64"):
        verify_payload(key.public_key(), b"data", "MEU!notbase64")


def test_signing_with_a_p384_key_is_refused() -> None:
    with pytest.raises(SigningKeyError, match="P-256"):
        sign_payload(ec.generate_private_key(ec.SECP384R1()), b"data")


def test_the_signature_manifest_is_an_oci_image_with_one_annotated_payload_layer() -> None:
    data = payload("example.com/test/image", DIGEST)
    config = signature_config([_sha256(data)])
    manifest = json.loads(signature_manifest(data, "c2lnbmF0dXJl", config=config))
    assert manifest == {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": OCI_CONFIG_MEDIA_TYPE,
            "size": len(config),
            "digest": _sha256(config),
        },
        "layers": [
            {
                "mediaType": SIMPLE_SIGNING_MEDIA_TYPE,
                "size": len(data),
                "digest": _sha256(data),
                "annotations": {SIGNATURE_ANNOTATION: "c2lnbmF0dXJl"},
            }
        ],
    }


def test_the_signature_config_lists_the_payload_layers_as_diff_ids() -> None:
    config = json.loads(signature_config([DIGEST, OTHER_DIGEST]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [DIGEST, OTHER_DIGEST]}
    assert (config["architecture"], config["os"]) == ("", "")


def test_the_default_config_names_the_payload_layer() -> None:
    data = payload("example.com/test/image", DIGEST)
    assert signature_manifest(data, "c2ln") == signature_manifest(
        data, "c2ln", config=signature_config([_sha256(data)])
    )


# -- sign_image / verify_image against an in-memory registry -------------------------------


@dataclass(frozen=True)
class Ref:
    """An image reference shaped like `kcache.reference.Reference`."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}"
        return name + (f"@{self.digest}" if self.digest else f":{self.tag}")


@dataclass
class MemoryRegistry:
    """The `RegistryClient` contract over dicts; pulls check digests like the real client."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    check_digests: bool = True
    """False: a client that trusts the registry, so sign.py's own check is on its own."""

    def blob_exists(self, repository: str, digest: str) -> bool:
        return digest in self.blobs

    def push_blob(self, repository: str, data: bytes, digest: str | None = None) -> str:
        self.blobs[_sha256(data)] = data
        return _sha256(data)

    def push_manifest(
        self, repository: str, reference: str, manifest: bytes, media_type: str
    ) -> str:
        for layer in json.loads(manifest).get("layers", []):
            assert layer["digest"] in self.blobs, "manifest pushed before its blobs"
        digest = _sha256(manifest)
        self.manifests[digest] = (manifest, media_type)
        if not reference.startswith("sha256:"):
            self.tags[(repository, reference)] = digest
        return digest

    def resolve(self, repository: str, reference: str) -> str | None:
        if reference.startswith("sha256:"):
            return reference if reference in self.manifests else None
        return self.tags.get((repository, reference))

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        digest = self.resolve(repository, reference)
        if digest is None:
            raise NotFoundError(f"{repository}:{reference}: manifest unknown")
        manifest, media_type = self.manifests[digest]
        return manifest, media_type, digest

    def pull_blob(self, repository: str, digest: str, sink: BinaryIO) -> int:
        if digest not in self.blobs:
            raise NotFoundError(f"{repository}@{digest}: blob unknown")
        data = self.blobs[digest]
        if self.check_digests and _sha256(data) != digest:
            raise DigestMismatchError(f"{repository}@{digest}: content is {_sha256(data)}")
        return sink.write(data)


def _push_image(registry: MemoryRegistry, repository: str, tag: str, content: str) -> Ref:
    manifest = json.dumps({"schemaVersion": 2, "content": content}).encode()
    registry.push_manifest(repository, tag, manifest, OCI_MANIFEST_MEDIA_TYPE)
    return Ref("registry.local:5000", repository, tag=tag)


def _signature_layers(
    registry: MemoryRegistry, image_digest: str, repository: str = "caches/llama"
) -> list[dict[str, object]]:
    manifest, _, _ = registry.get_manifest(repository, signature_tag(image_digest))
    layers: list[dict[str, object]] = json.loads(manifest)["layers"]
    return layers


def _digest(registry: MemoryRegistry, tag: str) -> str:
    digest = registry.resolve("caches/llama", tag)
    assert digest is not None, f"caches/llama:{tag} was never pushed"
    return digest


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry()


@pytest.fixture
def image(registry: MemoryRegistry) -> Ref:
    return _push_image(registry, "caches/llama", "v1", "image A")


def test_a_signed_image_verifies_and_yields_its_manifest_digest(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)
    assert verify_image(registry, image, key.public_key()) == _digest(registry, "v1")


def test_the_signature_lives_under_the_sig_tag_of_the_same_repository(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    signature_digest = sign_image(registry, image, key)
    image_digest = _digest(registry, "v1")
    assert registry.tags[("caches/llama", signature_tag(image_digest))] == signature_digest


def test_the_signed_payload_names_the_repository_and_the_image_digest(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)
    image_digest = _digest(registry, "v1")
    (layer,) = _signature_layers(registry, image_digest)
    assert registry.blobs[str(layer["digest"])] == payload(
        "registry.local:5000/caches/llama", image_digest
    )


def test_an_image_named_by_digest_verifies(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)
    digest = _digest(registry, "v1")
    by_digest = Ref("registry.local:5000", "caches/llama", digest=digest)
    assert verify_image(registry, by_digest, key.public_key()) == digest


def test_an_unsigned_image_is_refused(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(SignatureError, match="unsigned"):
        verify_image(registry, image, key.public_key())


def test_an_image_signed_by_another_key_is_refused(
    registry: MemoryRegistry,
    image: Ref,
    key: ec.EllipticCurvePrivateKey,
    other_key: ec.EllipticCurvePrivateKey,
) -> None:
    sign_image(registry, image, other_key)
    with pytest.raises(SignatureError, match="does not verify with this key"):
        verify_image(registry, image, key.public_key())


def test_a_signature_copied_from_another_image_is_refused(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    other = _push_image(registry, "caches/llama", "v2", "image B")
    sign_image(registry, image, key)
    a_digest, b_digest = _digest(registry, "v1"), _digest(registry, "v2")
    copied, media_type, _ = registry.get_manifest("caches/llama", signature_tag(a_digest))
    registry.push_manifest("caches/llama", signature_tag(b_digest), copied, media_type)
    with pytest.raises(SignatureError, match=f"names {a_digest}, not this image's {b_digest}"):
        verify_image(registry, other, key.public_key())


def test_a_tampered_payload_blob_is_refused(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)
    image_digest = _digest(registry, "v1")
    (layer,) = _signature_layers(registry, image_digest)
    blob = registry.blobs[str(layer["digest"])]
    registry.blobs[str(layer["digest"])] = blob.replace(b"registry.local", b"registry.evil")
    with pytest.raises(SignatureError, match="does not match its digest"):
        verify_image(registry, image, key.public_key())


def test_a_tampered_payload_blob_is_refused_even_by_a_client_that_does_not_check(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)
    (layer,) = _signature_layers(registry, _digest(registry, "v1"))
    registry.blobs[str(layer["digest"])] += b" "
    registry.check_digests = False
    with pytest.raises(SignatureError, match="does not match its digest"):
        verify_image(registry, image, key.public_key())


def test_a_payload_blob_past_one_mebibyte_is_not_read_into_memory(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)
    (layer,) = _signature_layers(registry, _digest(registry, "v1"))
    registry.blobs[str(layer["digest"])] = b" " * (2 << 20)
    registry.check_digests = False
    with pytest.raises(SignatureError, match="larger than 1048576 bytes"):
        verify_image(registry, image, key.public_key())


def test_a_signature_tag_that_is_not_a_manifest_is_refused(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    image_digest = _digest(registry, "v1")
    garbage = b"\x00garbage"
    registry.manifests[_sha256(garbage)] = (garbage, OCI_MANIFEST_MEDIA_TYPE)
    registry.tags[("caches/llama", signature_tag(image_digest))] = _sha256(garbage)
    with pytest.raises(SignatureError, match="not JSON"):
        verify_image(registry, image, key.public_key())


def test_two_signers_both_verify_and_the_first_layer_is_kept_as_it_was(
    registry: MemoryRegistry,
    image: Ref,
    key: ec.EllipticCurvePrivateKey,
    other_key: ec.EllipticCurvePrivateKey,
) -> None:
    sign_image(registry, image, key)
    image_digest = _digest(registry, "v1")
    (first,) = _signature_layers(registry, image_digest)
    sign_image(registry, image, other_key)
    layers = _signature_layers(registry, image_digest)
    assert (len(layers), layers[0]) == (2, first)
    assert verify_image(registry, image, key.public_key()) == image_digest
    assert verify_image(registry, image, other_key.public_key()) == image_digest


def test_the_config_of_a_two_signer_image_lists_both_layers(
    registry: MemoryRegistry,
    image: Ref,
    key: ec.EllipticCurvePrivateKey,
    other_key: ec.EllipticCurvePrivateKey,
) -> None:
    sign_image(registry, image, key)
    sign_image(registry, image, other_key)
    image_digest = _digest(registry, "v1")
    manifest, _, _ = registry.get_manifest("caches/llama", signature_tag(image_digest))
    document = json.loads(manifest)
    config = json.loads(registry.blobs[document["config"]["digest"]])
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in document["layers"]]


def test_signing_again_with_the_same_key_changes_nothing(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    first = sign_image(registry, image, key)
    assert sign_image(registry, image, key) == first


def test_signing_a_missing_image_says_it_is_not_found(
    registry: MemoryRegistry, key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(NotFoundError, match="no such image"):
        sign_image(registry, Ref("registry.local:5000", "caches/none", tag="v1"), key)


def _registry_with_cosigns_signature() -> tuple[MemoryRegistry, Ref]:
    """cosign's signed image as the registry held it: the image, its .sig image and blobs."""
    registry = MemoryRegistry()
    registry.manifests[COSIGN_IMAGE_DIGEST] = (b"{}", OCI_MANIFEST_MEDIA_TYPE)
    registry.tags[("chihjenhuang/cosign1", "t1")] = COSIGN_IMAGE_DIGEST
    body = payload(COSIGN_REPOSITORY, COSIGN_IMAGE_DIGEST)
    registry.push_blob("chihjenhuang/cosign1", body)
    registry.push_blob("chihjenhuang/cosign1", COSIGN_CONFIG)
    manifest = signature_manifest(body, COSIGN_SIGNATURE, config=COSIGN_CONFIG)
    tag = signature_tag(COSIGN_IMAGE_DIGEST)
    registry.push_manifest("chihjenhuang/cosign1", tag, manifest, OCI_MANIFEST_MEDIA_TYPE)
    return registry, Ref("index.docker.io", "chihjenhuang/cosign1", tag="t1")


def test_a_cosign_signature_is_read_and_checked_against_the_key(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    registry, image = _registry_with_cosigns_signature()
    with pytest.raises(SignatureError, match=r"sha256:b671.*does not verify with this key"):
        verify_image(registry, image, key.public_key())


def test_signing_an_image_cosign_signed_keeps_cosigns_signature(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    registry, image = _registry_with_cosigns_signature()
    (cosigns,) = _signature_layers(registry, COSIGN_IMAGE_DIGEST, "chihjenhuang/cosign1")
    sign_image(registry, image, key)
    layers = _signature_layers(registry, COSIGN_IMAGE_DIGEST, "chihjenhuang/cosign1")
    assert (len(layers), layers[0]) == (2, cosigns)
    assert verify_image(registry, image, key.public_key()) == COSIGN_IMAGE_DIGEST


def _copy_to(registry: MemoryRegistry, image: Ref, repository: str) -> Ref:
    """The image and its signature image tagged in another repository, as a mirror copies them."""
    digest = _digest(registry, image.tag or "")
    registry.tags[(repository, image.tag or "")] = digest
    registry.tags[(repository, signature_tag(digest))] = registry.tags[
        (image.repository, signature_tag(digest))
    ]
    return Ref(image.registry, repository, tag=image.tag)


def test_a_signed_image_copied_to_another_repository_is_refused_naming_the_signed_one(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)
    copy = _copy_to(registry, image, "attacker/llama")

    with pytest.raises(
        SignatureError, match=r"names repository 'registry.local:5000/caches/llama', not "
        r"registry.local:5000/attacker/llama"
    ):  # fmt: skip
        verify_image(registry, copy, key.public_key())


def test_a_mirrored_image_verifies_when_its_origin_repository_is_named(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)
    copy = _copy_to(registry, image, "mirror/llama")

    verified = verify_image(
        registry, copy, key.public_key(), signed_repository="registry.local:5000/caches/llama"
    )
    assert verified == _digest(registry, "v1")
    with pytest.raises(SignatureError, match="names repository"):
        verify_image(registry, image, key.public_key(), signed_repository="other.io/caches/llama")


def test_a_signed_reference_with_a_tag_or_docker_hubs_other_name_still_matches(
    registry: MemoryRegistry, key: ec.EllipticCurvePrivateKey
) -> None:
    _push_image(registry, "library/ubuntu", "v1", "hub image")
    digest = registry.resolve("library/ubuntu", "v1")
    assert digest is not None
    # Signed as docker.io/...:v1, pulled as registry-1.docker.io/...: the same repository.
    body = payload("docker.io/library/ubuntu:v1", digest)
    registry.push_blob("library/ubuntu", body)
    manifest = signature_manifest(body, sign_payload(key, body))
    registry.push_manifest(
        "library/ubuntu", signature_tag(digest), manifest, OCI_MANIFEST_MEDIA_TYPE
    )
    hub = Ref("registry-1.docker.io", "library/ubuntu", tag="v1")

    assert verify_image(registry, hub, key.public_key()) == digest


def test_a_signed_repository_that_is_no_repository_is_a_usage_error(
    registry: MemoryRegistry, image: Ref, key: ec.EllipticCurvePrivateKey
) -> None:
    sign_image(registry, image, key)

    with pytest.raises(InvalidReferenceError, match="--signed-repository 'not a repo!'"):
        verify_image(registry, image, key.public_key(), signed_repository="not a repo!")
