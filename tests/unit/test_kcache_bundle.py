"""cosign v3's bundle format: the statement, DSSE, the bundle and its referrer manifest."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gpufleet.kcache.bundle import (
    BUNDLE_MEDIA_TYPE,
    EMPTY_MEDIA_TYPE,
    IN_TOTO_PAYLOAD_TYPE,
    SIGN_PREDICATE_TYPE,
    key_hint,
    make_bundle,
    pae,
    referrer_manifest,
    statement,
    verify_bundle,
)
from gpufleet.kcache.errors import SignatureError, SignedDigestMismatchError
from gpufleet.kcache.keys import SigningKeyError

DIGEST = "sha256:" + "d34db33f" * 8
OTHER_DIGEST = "sha256:" + "0123abcd" * 8


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def other() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _envelope_bundle(
    key: ec.EllipticCurvePrivateKey,
    body: bytes,
    *,
    payload_type: str = IN_TOTO_PAYLOAD_TYPE,
    signatures: int = 1,
) -> bytes:
    sig = base64.b64encode(key.sign(pae(payload_type, body), ec.ECDSA(hashes.SHA256()))).decode()
    return json.dumps({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint(key.public_key())}},
        "dsseEnvelope": {
            "payload": base64.b64encode(body).decode(), "payloadType": payload_type,
            "signatures": [{"sig": sig}] * signatures,
        },
    }).encode()  # fmt: skip


def _statement(**changes: object) -> bytes:
    document = json.loads(statement(DIGEST)) | changes
    return json.dumps(document).encode()


def test_the_statement_is_cosigns_in_toto_v1_sign_statement() -> None:
    assert statement(DIGEST) == (
        b'{"_type":"https://in-toto.io/Statement/v1","subject":[{"digest":{"sha256":"'
        + DIGEST.removeprefix("sha256:").encode()
        + b'"}}],"predicateType":"https://sigstore.dev/cosign/sign/v1","predicate":{}}'
    )


def test_pae_is_the_dsse_specs_encoding() -> None:
    # The example of the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_the_key_hint_is_base64_of_the_sha256_of_the_spki_der(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert base64.b64decode(key_hint(key.public_key())) == hashlib.sha256(der).digest()


def test_a_bundle_holds_a_dsse_envelope_with_one_signature_and_the_key_hint(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    document = json.loads(make_bundle(key, DIGEST))
    assert document["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert document["verificationMaterial"] == {"publicKey": {"hint": key_hint(key.public_key())}}
    envelope = document["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert base64.b64decode(envelope["payload"]) == statement(DIGEST)
    (signature,) = envelope["signatures"]
    key.public_key().verify(
        base64.b64decode(signature["sig"]),
        pae(IN_TOTO_PAYLOAD_TYPE, statement(DIGEST)),
        ec.ECDSA(hashes.SHA256()),
    )


def test_a_bundle_verifies_with_its_key_and_names_it(
    key: ec.EllipticCurvePrivateKey, other: ec.EllipticCurvePrivateKey
) -> None:
    keys = {"other": other.public_key(), "ci": key.public_key()}
    assert verify_bundle(make_bundle(key, DIGEST), keys, DIGEST) == "ci"


def test_a_bundle_of_another_key_does_not_verify(
    key: ec.EllipticCurvePrivateKey, other: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(SignatureError, match=r"does not verify with any of the keys 'other'"):
        verify_bundle(make_bundle(key, DIGEST), {"other": other.public_key()}, DIGEST)


def test_a_bundle_for_another_digest_is_a_mismatch_naming_both(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    with pytest.raises(SignedDigestMismatchError, match=f"names {OTHER_DIGEST}, not .* {DIGEST}"):
        verify_bundle(make_bundle(key, OTHER_DIGEST), {"ci": key.public_key()}, DIGEST)


def test_a_tampered_payload_does_not_verify(key: ec.EllipticCurvePrivateKey) -> None:
    document = json.loads(make_bundle(key, OTHER_DIGEST))
    document["dsseEnvelope"]["payload"] = base64.b64encode(statement(DIGEST)).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(json.dumps(document).encode(), {"ci": key.public_key()}, DIGEST)


def test_a_signature_under_another_payload_type_does_not_verify(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    # Signed as "application/json" but presented as in-toto: PAE binds the type.
    document = json.loads(_envelope_bundle(key, statement(DIGEST), payload_type="application/json"))
    document["dsseEnvelope"]["payloadType"] = IN_TOTO_PAYLOAD_TYPE
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(json.dumps(document).encode(), {"ci": key.public_key()}, DIGEST)


def test_an_attestation_of_another_predicate_is_no_image_signature(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    body = _statement(predicateType="https://slsa.dev/provenance/v1")
    with pytest.raises(SignatureError, match="provenance/v1' attestation, not an image signature"):
        verify_bundle(_envelope_bundle(key, body), {"ci": key.public_key()}, DIGEST)


def test_a_statement_v01_is_accepted(key: ec.EllipticCurvePrivateKey) -> None:
    body = _statement(_type="https://in-toto.io/Statement/v0.1")
    assert verify_bundle(_envelope_bundle(key, body), {"ci": key.public_key()}, DIGEST) == "ci"


def test_one_of_several_subjects_may_be_the_image(key: ec.EllipticCurvePrivateKey) -> None:
    subjects = [{"digest": {"sha256": OTHER_DIGEST[7:]}}, {"digest": {"sha256": DIGEST[7:]}}]
    body = _statement(subject=subjects)
    assert verify_bundle(_envelope_bundle(key, body), {"ci": key.public_key()}, DIGEST) == "ci"


def test_a_url_safe_base64_payload_is_read(key: ec.EllipticCurvePrivateKey) -> None:
    document = json.loads(make_bundle(key, DIGEST))
    envelope = document["dsseEnvelope"]
    envelope["payload"] = base64.urlsafe_b64encode(statement(DIGEST)).decode()
    envelope["signatures"][0]["sig"] = base64.urlsafe_b64encode(
        base64.b64decode(envelope["signatures"][0]["sig"])
    ).decode()
    assert verify_bundle(json.dumps(document).encode(), {"ci": key.public_key()}, DIGEST) == "ci"


def test_a_message_signature_over_the_manifest_digest_verifies(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    raw = bytes.fromhex(DIGEST[7:])
    signature = key.sign(raw, ec.ECDSA(Prehashed(hashes.SHA256())))
    bundle = json.dumps({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint(key.public_key())}},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": base64.b64encode(raw).decode()},
            "signature": base64.b64encode(signature).decode(),
        },
    }).encode()  # fmt: skip
    assert verify_bundle(bundle, {"ci": key.public_key()}, DIGEST) == "ci"
    with pytest.raises(SignedDigestMismatchError, match="signed message digest"):
        verify_bundle(bundle, {"ci": key.public_key()}, OTHER_DIGEST)


@pytest.mark.parametrize(
    ("bundle", "says"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"mediaType":"application/json"}', "not a Sigstore bundle"),
        (b'{"mediaType":"' + BUNDLE_MEDIA_TYPE.encode() + b'"}', "exactly one dsseEnvelope"),
        (
            b'{"mediaType":"' + BUNDLE_MEDIA_TYPE.encode() + b'","dsseEnvelope":{},'
            b'"messageSignature":{}}',
            "exactly one dsseEnvelope",
        ),
        (b'{"mediaType":"' + BUNDLE_MEDIA_TYPE.encode() + b'","dsseEnvelope":[]}', "not an object"),
        (
            b'{"mediaType":"' + BUNDLE_MEDIA_TYPE.encode() + b'","dsseEnvelope":'
            b'{"payloadType":"application/vnd.in-toto+json","payload":"!!","signatures":[{"sig":""}]}}',
            "payload is not base64",
        ),
        (b"[" * 100_000, "nested too deeply|not JSON"),
    ],
    ids=["json", "array", "media-type", "no-content", "two-contents", "envelope", "b64", "deep"],
)
def test_a_malformed_bundle_is_refused_saying_why(
    key: ec.EllipticCurvePrivateKey, bundle: bytes, says: str
) -> None:
    with pytest.raises(SignatureError, match=says):
        verify_bundle(bundle, {"ci": key.public_key()}, DIGEST)


def test_an_envelope_must_carry_exactly_one_signature(key: ec.EllipticCurvePrivateKey) -> None:
    bundle = _envelope_bundle(key, statement(DIGEST), signatures=2)
    with pytest.raises(SignatureError, match="exactly one signature"):
        verify_bundle(bundle, {"ci": key.public_key()}, DIGEST)


def test_the_referrer_manifest_is_an_oci_1_1_artifact_with_the_bundle_as_its_layer(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    bundle = make_bundle(key, DIGEST)
    subject = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST,
               "size": 512}  # fmt: skip
    document = json.loads(referrer_manifest(bundle, subject, "2026-12-07T23:00:00Z"))
    bundle_digest = "sha256:" + hashlib.sha256(bundle).hexdigest()
    assert document == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": BUNDLE_MEDIA_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2,
        },
        "layers": [{
            "mediaType": BUNDLE_MEDIA_TYPE, "digest": bundle_digest, "size": len(bundle),
            "annotations": {
                "org.opencontainers.image.title": bundle_digest.replace(":", "-") + ".sigstore.json"
            },
        }],
        "subject": subject,
        "annotations": {
            "dev.sigstore.bundle.content": "dsse-envelope",
            "dev.sigstore.bundle.predicateType": SIGN_PREDICATE_TYPE,
            "org.opencontainers.image.created": "2026-12-07T23:00:00Z",
        },
    }  # fmt: skip


def test_signing_with_a_p384_key_is_refused() -> None:
    with pytest.raises(SigningKeyError, match="P-256"):
        make_bundle(ec.generate_private_key(ec.SECP384R1()), DIGEST)


def test_a_statement_needs_a_sha256_digest() -> None:
    with pytest.raises(ValueError, match="sha256 digest"):
        statement("sha256:abc")
