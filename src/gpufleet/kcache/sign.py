"""Sign and verify kernel cache images in cosign's key-based format.

A signature is a *simple signing* JSON payload that names the image's manifest
digest, signed with ECDSA P-256 over SHA-256. It is stored as a layer of a
small OCI image tagged ``sha256-<hex>.sig`` in the image's own repository, the
base64 DER signature in the layer's ``dev.cosignproject.cosign/signature``
annotation. ``cosign verify --key`` reads what `sign_image` writes, and
`verify_image` reads what ``cosign sign --key`` writes (see docs/kcache-sign.md).
Loading and checking keys is `kcache.keys`' job; what checking either format
takes (the digest to check, bounded reads, which trusted key signed) is
`kcache.trust`'s. cosign 3's format, a Sigstore bundle attached as an OCI 1.1
referrer, is `kcache.bundle`'s; `kcache.policy` checks either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from gpufleet.kcache.errors import (
    DigestMismatchError,
    InvalidReferenceError,
    KcacheError,
    NotFoundError,
    SignatureError,
    SignedDigestMismatchError,
    UnsignedError,
    UntrustedSignatureError,
)
from gpufleet.kcache.keys import is_p256, not_p256_error
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.trust import (
    ECDSA_SHA256,
    BoundedSink,
    ImageReference,
    json_object,
    key_names,
    resolve_digest,
    signer,
    summarize_failures,
)

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_SIGNATURE_LAYERS",
    "OCI_CONFIG_MEDIA_TYPE",
    "OCI_MANIFEST_MEDIA_TYPE",
    "SIGNATURE_ANNOTATION",
    "SIGNATURE_TYPE",
    "SIMPLE_SIGNING_MEDIA_TYPE",
    "SignatureRegistry",
    "SignedClaims",
    "parse_payload",
    "payload",
    "sign_image",
    "sign_payload",
    "signature_config",
    "signature_manifest",
    "signature_tag",
    "verify_image",
    "verify_image_keys",
    "verify_payload",
    "verify_with_keys",
]

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_TYPE = "cosign container image signature"
"""``critical.type`` of every cosign image signature payload."""
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MAX_PAYLOAD_BYTES = 1 << 20
"""A simple signing payload is a few hundred bytes; anything far larger is hostile."""
MAX_SIGNATURE_LAYERS = 1000
"""Each layer costs a blob pull; a .sig image with more is refused rather than walked."""

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_THIS_KEY = "the given key"
_MANIFEST_MEDIA_TYPES = (
    OCI_MANIFEST_MEDIA_TYPE,
    "application/vnd.docker.distribution.manifest.v2+json",
)


class SignatureRegistry(Protocol):
    """The registry operations signing needs (`kcache.oci.RegistryClient` has them)."""

    def push_blob(self, repository: str, data: bytes, /) -> object: ...
    def push_manifest(
        self, repository: str, reference: str, manifest: bytes, media_type: str, /
    ) -> str: ...
    def get_manifest(self, repository: str, reference: str, /) -> tuple[bytes, str, str]: ...
    def resolve(self, repository: str, reference: str, /) -> str | None: ...
    def pull_blob(self, repository: str, digest: str, sink: BinaryIO, /) -> int: ...


@dataclass(frozen=True, slots=True)
class SignedClaims:
    """What a simple signing payload says: which image, under which name."""

    docker_reference: str
    manifest_digest: str


# -- pure functions ------------------------------------------------------------------------


def signature_tag(manifest_digest: str) -> str:
    """The tag cosign stores an image's signatures under: ``sha256-<hex>.sig``."""
    _check_digest(manifest_digest)
    return manifest_digest.replace(":", "-", 1) + ".sig"


def payload(docker_reference: str, manifest_digest: str) -> bytes:
    """The simple signing payload for an image, byte for byte what cosign writes."""
    _check_digest(manifest_digest)
    if not docker_reference or any(ch.isspace() for ch in docker_reference):
        raise ValueError(f"not a docker reference: {docker_reference!r}")
    document = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": SIGNATURE_TYPE,
        },
        "optional": None,
    }
    # Compact, in Go's field order: the same bytes cosign's json.Marshal gives.
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def parse_payload(data: bytes) -> SignedClaims:
    """Read a simple signing payload; SignatureError when it is not a cosign image payload."""
    try:
        document = json.loads(data)
        critical = document["critical"]
        kind = critical["type"]
        reference = critical["identity"]["docker-reference"]
        digest = critical["image"]["docker-manifest-digest"]
    except RecursionError:
        raise SignatureError("malformed simple signing payload: nested too deeply") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"malformed simple signing payload: {exc!r}") from None
    if kind != SIGNATURE_TYPE:
        raise SignatureError(f"payload is a {kind!r}, not a {SIGNATURE_TYPE!r}")
    if not isinstance(reference, str) or not isinstance(digest, str):
        raise SignatureError("payload's docker-reference and docker-manifest-digest must be text")
    return SignedClaims(docker_reference=reference, manifest_digest=digest)


def sign_payload(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    """ECDSA P-256 / SHA-256 signature of ``data``: base64 of the ASN.1 DER encoding."""
    if not is_p256(key):
        raise not_p256_error(key, "signing key")
    return base64.b64encode(key.sign(data, ECDSA_SHA256)).decode("ascii")


def verify_payload(public_key: ec.EllipticCurvePublicKey, data: bytes, signature_b64: str) -> None:
    """Check a base64 DER signature over ``data``; SignatureError when it does not verify."""
    if not is_p256(public_key):
        raise not_p256_error(public_key, "public key")
    der = _decode_signature(signature_b64)
    try:
        public_key.verify(der, data, ECDSA_SHA256)
    except InvalidSignature:
        raise SignatureError("the signature does not verify with this key") from None


def _decode_signature(signature_b64: str) -> bytes:
    try:
        return base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the signature annotation is not base64") from None


def signature_config(diff_ids: Sequence[str]) -> bytes:
    """The config blob of a signature image: empty, listing its payload layers as diff IDs."""
    # cosign's config also carries a creation time. Leaving it out keeps ours reproducible,
    # and verifiers read signatures from the manifest's layers, never from the config.
    document = {
        "architecture": "",
        "os": "",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def signature_manifest(
    payload_bytes: bytes, signature_b64: str, *, config: bytes | None = None
) -> bytes:
    """The OCI manifest of a one-signature image; ``config`` defaults to `signature_config`."""
    layer = _signature_layer(payload_bytes, signature_b64)
    if config is None:
        config = signature_config([layer["digest"]])
    return _manifest([layer], config)


# -- images --------------------------------------------------------------------------------


def sign_image(
    client: SignatureRegistry, reference: ImageReference, key: ec.EllipticCurvePrivateKey
) -> str:
    """Sign the image ``reference`` names; returns the digest of its signature manifest.

    Signatures are appended, as cosign does: other signers' layers stay and
    verify still accepts any of them. Signing again with a key whose signature
    of the same payload is already there changes nothing.
    """
    repository = reference.repository
    image_digest = resolve_digest(client, reference)
    body = payload(_docker_reference(reference), image_digest)
    body_digest = _sha256(body)
    tag = signature_tag(image_digest)
    where = f"{reference.registry}/{repository}:{tag}"
    existing_digest, layers = _existing_signatures(client, repository, tag, where)
    if existing_digest is not None and any(
        layer.get("digest") == body_digest and _verifies(key.public_key(), body, layer)
        for layer in layers
    ):
        return existing_digest
    layers.append(_signature_layer(body, sign_payload(key, body)))
    config = signature_config([layer["digest"] for layer in layers])
    # Blobs first: a registry refuses a manifest whose blobs it does not hold.
    client.push_blob(repository, body)
    client.push_blob(repository, config)
    return client.push_manifest(repository, tag, _manifest(layers, config), OCI_MANIFEST_MEDIA_TYPE)


def verify_image(
    client: SignatureRegistry,
    reference: ImageReference,
    public_key: ec.EllipticCurvePublicKey,
    *,
    signed_repository: str | None = None,
) -> str:
    """Check that ``public_key`` signed the image ``reference`` names; returns its digest.

    Pull the image by the returned digest, not by tag: the tag may move after
    this check. SignatureError when the image is unsigned, no signature
    verifies with the key, or the verified payload names another digest or
    another repository. The payload's ``critical.identity.docker-reference``
    must name the image's own registry and repository (any tag), or
    ``signed_repository`` (``REGISTRY/REPOSITORY``) when given: an image
    mirrored from there keeps the signature made for its origin.
    """
    digest, _ = verify_image_keys(
        client, reference, {_THIS_KEY: public_key}, signed_repository=signed_repository
    )
    return digest


def verify_image_keys(
    client: SignatureRegistry,
    reference: ImageReference,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    *,
    signed_repository: str | None = None,
    image_digest: str | None = None,
) -> tuple[str, str]:
    """`verify_image` with any of ``keys`` (by name); returns (digest, the name that verified).

    ``image_digest``: the digest the reference was resolved to already (so that
    every format checks the same one); resolved here when None. Raises
    `UnsignedError` (no ``.sig`` image or no layers), `SignedDigestMismatchError`
    (a key signed another digest) or `UntrustedSignatureError` (anything else:
    no layer verifies, or one signed for another repository). Messages name the
    keys by name only.
    """
    if not keys:
        raise ValueError("verify_image_keys needs at least one key")
    expected = _identity(signed_repository or f"{reference.registry}/{reference.repository}")
    if expected is None:
        raise InvalidReferenceError(
            f"--signed-repository {signed_repository!r}: not a REGISTRY/REPOSITORY"
        )
    repository = reference.repository
    if image_digest is None:
        image_digest = resolve_digest(client, reference)
    tag = signature_tag(image_digest)
    where = f"{reference.registry}/{repository}:{tag}"
    try:
        manifest, _, _ = client.get_manifest(repository, tag)
    except NotFoundError:
        raise UnsignedError(
            f"{reference} ({image_digest}) is unsigned: no signature image at {where}"
        ) from None
    try:
        layers = _parse_layers(manifest, where)
    except SignatureError as exc:
        raise UntrustedSignatureError(str(exc)) from None
    if not layers:
        raise UnsignedError(f"{reference} ({image_digest}) is unsigned: {where} has no layers")
    failures: list[str] = []
    mismatched = False
    for layer in layers:
        try:
            name = _verify_layer(client, repository, layer, keys, image_digest, expected)
        except SignatureError as exc:
            mismatched = mismatched or isinstance(exc, SignedDigestMismatchError)
            failures.append(f"layer {layer.get('digest')}: {exc}")
        else:
            return image_digest, name
    error = SignedDigestMismatchError if mismatched else UntrustedSignatureError
    raise error(
        f"{reference} ({image_digest}): no valid signature in {where}"
        f"{_tried(keys)}: {summarize_failures(failures)}"
    )


def _tried(keys: Mapping[str, object]) -> str:
    return "" if set(keys) == {_THIS_KEY} else f" (trusted keys tried: {key_names(keys)})"


def verify_with_keys(
    keys: Mapping[str, ec.EllipticCurvePublicKey], data: bytes, signature_b64: str
) -> str:
    """The name of the first of ``keys`` that made ``signature_b64`` over ``data``.

    SignatureError when none did (for `verify_image`'s one key: `verify_payload`'s message).
    """
    if set(keys) == {_THIS_KEY}:
        verify_payload(keys[_THIS_KEY], data, signature_b64)
        return _THIS_KEY
    return signer(keys, _decode_signature(signature_b64), data)


# -- helpers -------------------------------------------------------------------------------


def _check_digest(digest: str) -> None:
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _docker_reference(reference: ImageReference) -> str:
    # cosign signs the repository's full name without tag or digest.
    return f"{reference.registry}/{reference.repository}"


def _signature_layer(payload_bytes: bytes, signature_b64: str) -> dict[str, Any]:
    return {
        "mediaType": SIMPLE_SIGNING_MEDIA_TYPE,
        "size": len(payload_bytes),
        "digest": _sha256(payload_bytes),
        "annotations": {SIGNATURE_ANNOTATION: signature_b64},
    }


def _manifest(layers: Sequence[Mapping[str, Any]], config: bytes) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": OCI_CONFIG_MEDIA_TYPE,
            "size": len(config),
            "digest": _sha256(config),
        },
        "layers": list(layers),
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _parse_layers(manifest: bytes, where: str) -> list[dict[str, Any]]:
    document = json_object(manifest, f"{where}: the signature manifest")
    media_type = document.get("mediaType", OCI_MANIFEST_MEDIA_TYPE)
    layers = document.get("layers")
    if media_type not in _MANIFEST_MEDIA_TYPES or not isinstance(layers, list):
        raise SignatureError(f"{where}: not an image manifest with layers ({media_type})")
    if len(layers) > MAX_SIGNATURE_LAYERS:
        raise SignatureError(f"{where}: {len(layers)} layers, more than {MAX_SIGNATURE_LAYERS}")
    if not all(
        isinstance(layer, dict) and isinstance(layer.get("digest"), str) for layer in layers
    ):
        raise SignatureError(f"{where}: a layer descriptor is not an object with a digest")
    return layers


def _existing_signatures(
    client: SignatureRegistry, repository: str, tag: str, where: str
) -> tuple[str | None, list[dict[str, Any]]]:
    try:
        manifest, _, digest = client.get_manifest(repository, tag)
    except NotFoundError:
        return None, []
    return digest, _parse_layers(manifest, where)


def _layer_signature(layer: Mapping[str, Any]) -> str | None:
    annotations = layer.get("annotations")
    signature = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
    return signature if isinstance(signature, str) else None


def _verifies(public_key: ec.EllipticCurvePublicKey, data: bytes, layer: Mapping[str, Any]) -> bool:
    signature = _layer_signature(layer)
    if signature is None:
        return False
    try:
        verify_payload(public_key, data, signature)
    except SignatureError:
        return False
    return True


def _verify_layer(
    client: SignatureRegistry,
    repository: str,
    layer: Mapping[str, Any],
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    image_digest: str,
    identity: tuple[str, str],
) -> str:
    media_type, digest, size = layer.get("mediaType"), layer.get("digest"), layer.get("size")
    signature = _layer_signature(layer)
    if media_type != SIMPLE_SIGNING_MEDIA_TYPE or signature is None:
        raise SignatureError(f"not a simple signing layer with a signature ({media_type})")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise SignatureError(f"malformed layer digest {digest!r}")
    if not isinstance(size, int) or not 0 <= size <= MAX_PAYLOAD_BYTES:
        raise SignatureError(f"payload size {size!r} is not between 0 and {MAX_PAYLOAD_BYTES}")
    body = _pull_payload(client, repository, digest)
    name = verify_with_keys(keys, body, signature)
    claims = parse_payload(body)
    if claims.manifest_digest != image_digest:
        # A valid signature of another image, copied or re-tagged next to this one.
        raise SignedDigestMismatchError(
            f"the signed payload names {claims.manifest_digest}, not this image's {image_digest}"
            + ("" if name == _THIS_KEY else f" (signed by trusted key {name!r})")
        )
    if _identity(claims.docker_reference) != identity:
        # A valid signature of this very image, made for another repository: copied here.
        raise UntrustedSignatureError(
            f"the signed payload names repository {claims.docker_reference!r}, not "
            f"{'/'.join(identity)} (--signed-repository accepts another)"
        )
    return name


def _identity(text: str) -> tuple[str, str] | None:
    """(registry, repository) a docker reference names, normalized; None if it names none."""
    try:
        parsed = Reference.parse(text)
    except KcacheError:
        return None
    return parsed.registry, parsed.repository


def _pull_payload(client: SignatureRegistry, repository: str, digest: str) -> bytes:
    sink = BoundedSink(MAX_PAYLOAD_BYTES, "payload blob")
    try:
        client.pull_blob(repository, digest, sink)
    except DigestMismatchError as exc:
        raise SignatureError(f"payload blob does not match its digest: {exc}") from None
    except NotFoundError:
        raise SignatureError("payload blob is missing from the registry") from None
    body = sink.getvalue()
    # The client verifies while streaming; checking again costs nothing at this size
    # and keeps the guarantee local to the code that relies on it.
    if _sha256(body) != digest:
        raise SignatureError(f"payload blob does not match its digest {digest}")
    return body
