"""cosign v3 signatures: a Sigstore bundle attached to the image as an OCI 1.1 referrer.

What ``cosign sign --key`` (v3, or v2.6 with ``--new-bundle-format``) writes and
`sign_image_bundle` writes too:

- the payload, an in-toto Statement v1 naming the image's manifest digest as its
  only subject, predicate type ``https://sigstore.dev/cosign/sign/v1``, empty
  predicate;
- a DSSE envelope over it (payload type ``application/vnd.in-toto+json``, one
  ECDSA P-256 / SHA-256 signature over the DSSE pre-authentication encoding);
- a Sigstore bundle v0.3 holding the envelope and, for a key (no Fulcio
  certificate), ``verificationMaterial.publicKey.hint``: base64 of the SHA-256 of
  the key's DER SubjectPublicKeyInfo. No Rekor entry, no timestamp: the key is
  pinned, so ``cosign verify --key ... --insecure-ignore-tlog`` checks it;
- an OCI image manifest with ``artifactType`` the bundle media type, the empty
  config, the bundle as its one layer, ``subject`` the image, in the image's own
  repository; listed by the referrers API or, where the registry has none, in the
  referrers tag schema index (`kcache.referrers`).

`verify_bundle_keys` reads them back, also bundles holding a ``messageSignature``
over the manifest digest. The statement names no repository (cosign's does not),
so unlike the v2 payload there is no docker-reference to check: the signature
vouches for the digest wherever it is. See docs/kcache-sign.md.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gpufleet.kcache.errors import (
    DigestMismatchError,
    NotFoundError,
    SignatureError,
    SignedDigestMismatchError,
    UnsignedError,
    UntrustedSignatureError,
)
from gpufleet.kcache.keys import is_p256, not_p256_error
from gpufleet.kcache.oci import OCI_MANIFEST, RegistryClient, sha256_digest
from gpufleet.kcache.reference import Reference, is_digest
from gpufleet.kcache.referrers import Referrer, add_to_tag_index, list_referrers
from gpufleet.kcache.trust import (
    ECDSA_SHA256,
    BoundedSink,
    json_object,
    key_names,
    resolve_digest,
    signer,
    summarize_failures,
)

__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "EMPTY_CONFIG",
    "EMPTY_MEDIA_TYPE",
    "IN_TOTO_PAYLOAD_TYPE",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_REFERRERS",
    "SIGN_PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "key_hint",
    "make_bundle",
    "pae",
    "referrer_manifest",
    "sign_image_bundle",
    "statement",
    "verify_bundle",
    "verify_bundle_keys",
    "verify_image_bundle",
]

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_BUNDLE_MEDIA_TYPES = (
    BUNDLE_MEDIA_TYPE,
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
)
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_STATEMENT_TYPES = (STATEMENT_TYPE, "https://in-toto.io/Statement/v0.1")
SIGN_PREDICATE_TYPE = "https://sigstore.dev/cosign/sign/v1"
MAX_BUNDLE_BYTES = 1 << 20
"""A key-signed bundle is about a kilobyte, one with a certificate chain and Rekor entry ~10."""
MAX_BUNDLE_REFERRERS = 64
"""Bundle referrers checked at most (each costs a manifest and a blob pull); more are refused."""

_ECDSA_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
_CONTENT_ANNOTATION = "dev.sigstore.bundle.content"
_PREDICATE_ANNOTATION = "dev.sigstore.bundle.predicateType"
_CREATED_ANNOTATION = "org.opencontainers.image.created"
_TITLE_ANNOTATION = "org.opencontainers.image.title"
_URLSAFE = bytes.maketrans(b"-_", b"+/")


# -- pure functions ------------------------------------------------------------------------


def statement(image_digest: str) -> bytes:
    """The in-toto statement ``cosign sign`` (v3) signs for an image: its digest, nothing else."""
    if not is_digest(image_digest):
        raise ValueError(f"not a sha256 digest: {image_digest!r}")
    document = {
        "_type": STATEMENT_TYPE,
        "subject": [{"digest": {"sha256": image_digest.removeprefix("sha256:")}}],
        "predicateType": SIGN_PREDICATE_TYPE,
        "predicate": {},
    }
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature is made over."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """cosign's ``publicKey.hint``: base64 of the SHA-256 of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def make_bundle(key: ec.EllipticCurvePrivateKey, image_digest: str) -> bytes:
    """A Sigstore bundle v0.3: a DSSE envelope over `statement`, signed with ``key``."""
    if not is_p256(key):
        raise not_p256_error(key, "signing key")
    body = statement(image_digest)
    signature = key.sign(pae(IN_TOTO_PAYLOAD_TYPE, body), ECDSA_SHA256)
    document = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint(key.public_key())}},
        "dsseEnvelope": {
            "payload": base64.b64encode(body).decode("ascii"),
            "payloadType": IN_TOTO_PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode("ascii")}],
        },
    }
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def referrer_manifest(bundle: bytes, subject: Mapping[str, Any], created: str) -> bytes:
    """The OCI 1.1 artifact manifest that attaches ``bundle`` to ``subject`` (a descriptor)."""
    bundle_digest = sha256_digest(bundle)
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": BUNDLE_MEDIA_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": sha256_digest(EMPTY_CONFIG),
            "size": len(EMPTY_CONFIG),
        },
        "layers": [
            {
                "mediaType": BUNDLE_MEDIA_TYPE,
                "digest": bundle_digest,
                "size": len(bundle),
                "annotations": {
                    _TITLE_ANNOTATION: bundle_digest.replace(":", "-", 1) + ".sigstore.json"
                },
            }
        ],
        "subject": dict(subject),
        "annotations": _annotations(created),
    }
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def verify_bundle(
    bundle: bytes, keys: Mapping[str, ec.EllipticCurvePublicKey], image_digest: str
) -> str:
    """The name of the key in ``keys`` that signed ``bundle`` for ``image_digest``.

    SignatureError when the bundle is malformed or no key verifies it;
    SignedDigestMismatchError when a key did but for another digest.
    """
    document = json_object(bundle, "the bundle")
    media_type = document.get("mediaType")
    if media_type not in _BUNDLE_MEDIA_TYPES:
        raise SignatureError(f"not a Sigstore bundle v0.2/v0.3 ({str(media_type)[:80]!r})")
    envelope, message = document.get("dsseEnvelope"), document.get("messageSignature")
    if (envelope is None) == (message is None):
        raise SignatureError("the bundle must hold exactly one dsseEnvelope or messageSignature")
    if envelope is not None:
        return _verify_envelope(envelope, keys, image_digest)
    return _verify_message(message, keys, image_digest)


# -- images --------------------------------------------------------------------------------


def sign_image_bundle(
    client: RegistryClient,
    reference: Reference,
    key: ec.EllipticCurvePrivateKey,
    *,
    now: datetime.datetime | None = None,
) -> str:
    """Sign the image ``reference`` names in cosign v3's format; returns the referrer's digest.

    Signing again with a key that already signed the image changes nothing.
    Where the registry has no referrers API, the referrers tag schema index is
    updated as well.
    """
    if not is_p256(key):
        raise not_p256_error(key, "signing key")
    repository = reference.repository
    image_digest = resolve_digest(client, reference)
    try:
        found = _find(client, reference, {"signer": key.public_key()}, image_digest)
    except SignatureError:
        pass
    else:
        return found[1]
    manifest, media_type, _ = client.get_manifest(repository, image_digest)
    subject = {"mediaType": media_type, "digest": image_digest, "size": len(manifest)}
    created = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    bundle = make_bundle(key, image_digest)
    referrer = referrer_manifest(bundle, subject, created)
    # Blobs first: a registry refuses a manifest whose blobs it does not hold.
    client.push_blob(repository, EMPTY_CONFIG)
    client.push_blob(repository, bundle)
    digest = client.push_manifest(repository, sha256_digest(referrer), referrer, OCI_MANIFEST)
    if client.get_referrers(repository, image_digest) is None:
        entry = Referrer(
            digest=digest,
            media_type=OCI_MANIFEST,
            size=len(referrer),
            artifact_type=BUNDLE_MEDIA_TYPE,
            annotations=_annotations(created),
        )
        add_to_tag_index(client, repository, image_digest, entry)
    return digest


def verify_bundle_keys(
    client: RegistryClient,
    reference: Reference,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    *,
    image_digest: str | None = None,
) -> tuple[str, str]:
    """Check that one of ``keys`` signed ``reference`` in cosign v3's format: (digest, key name).

    ``image_digest``: the digest already resolved (resolved here when None).
    `UnsignedError` when the image has no bundle referrer, `SignedDigestMismatchError`
    when a key signed another digest, `UntrustedSignatureError` otherwise;
    RegistryError (size caps included) as the registry client raises it.
    """
    if not keys:
        raise ValueError("verify_bundle_keys needs at least one key")
    if image_digest is None:
        image_digest = resolve_digest(client, reference)
    name, _ = _find(client, reference, keys, image_digest)
    return image_digest, name


def verify_image_bundle(
    client: RegistryClient, reference: Reference, public_key: ec.EllipticCurvePublicKey
) -> str:
    """`verify_bundle_keys` with one key; returns the verified digest."""
    return verify_bundle_keys(client, reference, {"the given key": public_key})[0]


# -- helpers -------------------------------------------------------------------------------


def _annotations(created: str) -> dict[str, str]:
    return {
        _CONTENT_ANNOTATION: "dsse-envelope",
        _PREDICATE_ANNOTATION: SIGN_PREDICATE_TYPE,
        _CREATED_ANNOTATION: created,
    }


def _find(
    client: RegistryClient,
    reference: Reference,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    image_digest: str,
) -> tuple[str, str]:
    """(key name, referrer digest) of the first bundle referrer a key signed for the digest."""
    repository = reference.repository
    try:
        referrers, where = list_referrers(
            client, repository, image_digest, artifact_type=BUNDLE_MEDIA_TYPE
        )
    except SignatureError as exc:
        raise UntrustedSignatureError(f"{reference} ({image_digest}): {exc}") from None
    if not referrers:
        raise UnsignedError(
            f"{reference} ({image_digest}) is unsigned: no Sigstore bundle referrer in {where}"
        )
    if len(referrers) > MAX_BUNDLE_REFERRERS:
        raise UntrustedSignatureError(
            f"{reference} ({image_digest}): {len(referrers)} bundle referrers in {where}, "
            f"more than the {MAX_BUNDLE_REFERRERS} checked"
        )
    failures: list[str] = []
    mismatched = False
    for referrer in referrers:
        try:
            bundle = _pull_bundle(client, repository, referrer)
            name = verify_bundle(bundle, keys, image_digest)
        except SignatureError as exc:
            mismatched = mismatched or isinstance(exc, SignedDigestMismatchError)
            failures.append(f"referrer {referrer.digest}: {exc}")
        else:
            return name, referrer.digest
    error = SignedDigestMismatchError if mismatched else UntrustedSignatureError
    raise error(
        f"{reference} ({image_digest}): no valid bundle in {where} (trusted keys tried: "
        f"{key_names(keys)}): {summarize_failures(failures)}"
    )


def _pull_bundle(client: RegistryClient, repository: str, referrer: Referrer) -> bytes:
    """The bundle blob of a referrer manifest, both read under their caps."""
    if referrer.media_type != OCI_MANIFEST:
        raise SignatureError(f"not an OCI image manifest ({referrer.media_type[:80]!r})")
    try:
        manifest, _, _ = client.get_manifest(repository, referrer.digest, accept=(OCI_MANIFEST,))
    except NotFoundError:
        raise SignatureError("listed, but the registry has no such manifest") from None
    except DigestMismatchError as exc:
        raise SignatureError(f"the referrer manifest does not match its digest: {exc}") from None
    document = json_object(manifest, "the referrer manifest")
    if document.get("artifactType") != BUNDLE_MEDIA_TYPE:
        raise SignatureError(f"artifactType is {str(document.get('artifactType'))[:80]!r}")
    layers = document.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise SignatureError("a bundle referrer must have exactly one layer")
    layer = layers[0]
    digest, size = layer.get("digest"), layer.get("size")
    if layer.get("mediaType") not in _BUNDLE_MEDIA_TYPES:
        raise SignatureError(f"its layer is a {str(layer.get('mediaType'))[:80]!r}, not a bundle")
    if not isinstance(digest, str) or not is_digest(digest):
        raise SignatureError(f"malformed layer digest {str(digest)[:80]!r}")
    if not isinstance(size, int) or not 0 <= size <= MAX_BUNDLE_BYTES:
        raise SignatureError(f"bundle size {size!r} is not between 0 and {MAX_BUNDLE_BYTES}")
    sink = BoundedSink(MAX_BUNDLE_BYTES, "bundle blob")
    try:
        client.pull_blob(repository, digest, sink, size=size)
    except DigestMismatchError as exc:
        raise SignatureError(f"the bundle blob does not match its descriptor: {exc}") from None
    except NotFoundError:
        raise SignatureError("the bundle blob is missing from the registry") from None
    return sink.getvalue()


def _b64(value: object, what: str) -> bytes:
    """Standard or URL-safe base64 (DSSE allows both; protobuf JSON writes standard)."""
    if not isinstance(value, str):
        raise SignatureError(f"{what} is not base64 text")
    try:
        text = value.encode("ascii").translate(_URLSAFE)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{what} is not base64") from None


def _verify_envelope(
    envelope: object, keys: Mapping[str, ec.EllipticCurvePublicKey], image_digest: str
) -> str:
    if not isinstance(envelope, dict):
        raise SignatureError("dsseEnvelope is not an object")
    payload_type, signatures = envelope.get("payloadType"), envelope.get("signatures")
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise SignatureError(f"the DSSE payload is a {str(payload_type)[:80]!r}, not in-toto")
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise SignatureError("a bundle's DSSE envelope must carry exactly one signature")
    signed = signatures[0]
    if not isinstance(signed, dict):
        raise SignatureError("the DSSE signature is not an object")
    body = _b64(envelope.get("payload"), "the DSSE payload")
    if len(body) > MAX_BUNDLE_BYTES:
        raise SignatureError("the DSSE payload is too large")
    signature = _b64(signed.get("sig"), "the DSSE signature")
    name = signer(keys, signature, pae(IN_TOTO_PAYLOAD_TYPE, body), ECDSA_SHA256)
    document = json_object(body, "the signed statement")
    kind, predicate, subjects = (
        document.get("_type"),
        document.get("predicateType"),
        document.get("subject"),
    )
    if kind not in _STATEMENT_TYPES:
        raise SignatureError(
            f"the signed payload is a {str(kind)[:80]!r}, not an in-toto statement"
        )
    if predicate != SIGN_PREDICATE_TYPE:
        raise SignatureError(
            f"the signed statement is a {str(predicate)[:80]!r} attestation, not an image "
            f"signature ({SIGN_PREDICATE_TYPE})"
        )
    if not isinstance(subjects, list) or not subjects:
        raise SignatureError("the signed statement has no subject")
    named = []
    for subject in subjects[:16]:
        digests = subject.get("digest") if isinstance(subject, dict) else None
        sha = digests.get("sha256") if isinstance(digests, dict) else None
        if isinstance(sha, str):
            named.append(f"sha256:{sha}")
    if image_digest in named:
        return name
    raise SignedDigestMismatchError(
        f"the signed statement names {', '.join(named) or 'no sha256 digest'}, not this "
        f"image's {image_digest} (signed by trusted key {name!r})"
    )


def _verify_message(
    message: object, keys: Mapping[str, ec.EllipticCurvePublicKey], image_digest: str
) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("messageDigest"), dict):
        raise SignatureError("messageSignature has no messageDigest")
    digest = message["messageDigest"]
    if digest.get("algorithm") != "SHA2_256":
        raise SignatureError(f"messageDigest algorithm {str(digest.get('algorithm'))[:40]!r}")
    raw = _b64(digest.get("digest"), "the message digest")
    if len(raw) != 32:
        raise SignatureError("the message digest is not 32 bytes")
    signature = _b64(message.get("signature"), "the message signature")
    name = signer(keys, signature, raw, _ECDSA_PREHASHED)
    signed = "sha256:" + raw.hex()
    if signed != image_digest:
        raise SignedDigestMismatchError(
            f"the signed message digest is {signed}, not this image's {image_digest} "
            f"(signed by trusted key {name!r})"
        )
    return name
