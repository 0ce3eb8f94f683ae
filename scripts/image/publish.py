"""After ``buildah push``: attach the SBOM to the pushed image and sign the image's digest.

    scripts/image/publish.py IMAGE_REF [--sbom FILE] [--build-dir DIR] [--plain-http]

``make image PUSH=...`` runs it with the reference it pushed. Through gpufleet's
own registry client (`gpufleet.kcache.oci.RegistryClient`), no shell tools:

1. the SBOM (``build/image/context/sbom.cdx.json``, sbom.py's) is pushed as an
   OCI 1.1 artifact: ``artifactType`` ``application/vnd.cyclonedx+json``, the
   empty config, the SBOM as its one layer and the image's manifest descriptor
   as its ``subject``. Where the registry has no referrers API (Debian's
   docker-registry 2.8) it is also listed in the referrers tag schema index
   ``sha256-<hex>``, as `gpufleet.kcache.referrers` keeps it;
2. the image digest is signed in both of cosign's key-based formats, v2 (the
   ``sha256-<hex>.sig`` tag) and v3 (a Sigstore bundle referrer), exactly as
   ``gpufleet cache sign --format cosign-v2|cosign-v3`` signs, with the PEM key
   ``SIGN_KEY`` names (password in ``COSIGN_PASSWORD``) or, without it, a key
   made once under ``BUILD_DIR/keys/`` (``cosign.key``, mode 0600, and
   ``cosign.pub``); the key is never printed;
3. ``BUILD_DIR/publish.json`` records the image digest, the SBOM artifact's
   digest, the signature manifests' digests and the public key's path
   (relative to the repository root when it lies inside it).

Running it again changes nothing in the registry. ``REGISTRY_USERNAME`` and
``REGISTRY_PASSWORD`` (or docker's config.json) are the registry credentials;
loopback registries are spoken to over plain HTTP. Exit 2 for bad input (the
reference, the SBOM file, SIGN_KEY), 1 when the registry fails; one line on
stderr either way. See docs/image.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gpufleet.core.errors import ConfigError, GpufleetError
from gpufleet.kcache.bundle import EMPTY_CONFIG, EMPTY_MEDIA_TYPE, sign_image_bundle
from gpufleet.kcache.keys import SigningKeyError, load_private_key, password_from_env
from gpufleet.kcache.oci import OCI_MANIFEST, RegistryClient, sha256_digest
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.referrers import Referrer, add_to_tag_index, referrers_tag
from gpufleet.kcache.sign import sign_image
from gpufleet.kcache.trust import resolve_digest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUILD = ROOT / "build" / "image"
SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
SIGN_KEY_ENV = "SIGN_KEY"
_TITLE = "org.opencontainers.image.title"
_CREATED = "org.opencontainers.image.created"


class UsageError(ConfigError):
    """A bad argument or variable: exit 2."""


@dataclass(frozen=True, slots=True)
class PublishedSbom:
    """Where the SBOM artifact went."""

    digest: str
    layer_digest: str
    listed_in: str


def source_date(environ: Mapping[str, str]) -> datetime.datetime | None:
    """``SOURCE_DATE_EPOCH`` as a UTC time; None when unset."""
    text = environ.get("SOURCE_DATE_EPOCH")
    if text is None:
        return None
    try:
        return datetime.datetime.fromtimestamp(int(text), datetime.UTC)
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"SOURCE_DATE_EPOCH={text!r}: not a UNIX timestamp") from None


def sbom_manifest(
    sbom: bytes, subject: Mapping[str, Any], created: datetime.datetime | None
) -> bytes:
    """The OCI 1.1 artifact manifest that attaches ``sbom`` to ``subject`` (a descriptor)."""
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM_MEDIA_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": sha256_digest(EMPTY_CONFIG),
            "size": len(EMPTY_CONFIG),
        },
        "layers": [
            {
                "mediaType": SBOM_MEDIA_TYPE,
                "digest": sha256_digest(sbom),
                "size": len(sbom),
                "annotations": {_TITLE: "sbom.cdx.json"},
            }
        ],
        "subject": dict(subject),
    }
    if created is not None:
        # Only a fixed time: a clock reading would give a new artifact on every run.
        document["annotations"] = {_CREATED: created.strftime("%Y-%m-%dT%H:%M:%SZ")}
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def push_sbom(
    client: RegistryClient,
    repository: str,
    image_digest: str,
    sbom: bytes,
    created: datetime.datetime | None,
) -> PublishedSbom:
    """Push ``sbom`` as a referrer of ``image_digest`` in ``repository``."""
    manifest, media_type, _ = client.get_manifest(repository, image_digest)
    subject = {"mediaType": media_type, "digest": image_digest, "size": len(manifest)}
    artifact = sbom_manifest(sbom, subject, created)
    # Blobs first: a registry refuses a manifest whose blobs it does not hold.
    client.push_blob(repository, EMPTY_CONFIG)
    layer = client.push_blob(repository, sbom)
    digest = client.push_manifest(repository, sha256_digest(artifact), artifact, OCI_MANIFEST)
    if client.get_referrers(repository, image_digest) is not None:
        where = f"{client.registry}/{repository}/referrers/{image_digest}"
        return PublishedSbom(digest, layer.digest, where)
    entry = Referrer(
        digest=digest,
        media_type=OCI_MANIFEST,
        size=len(artifact),
        artifact_type=SBOM_MEDIA_TYPE,
        annotations=json.loads(artifact).get("annotations", {}),
    )
    add_to_tag_index(client, repository, image_digest, entry)
    tag = referrers_tag(image_digest)
    return PublishedSbom(digest, layer.digest, f"{client.registry}/{repository}:{tag}")


def _public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: never a moment where others may read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def signing_key(keys: Path, environ: Mapping[str, str]) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    """The key to sign with and where its public half is written.

    ``SIGN_KEY`` when set (its public key goes to ``keys/sign-key.pub``), else
    ``keys/cosign.key``, made on the first run (public key ``keys/cosign.pub``).
    """
    named = environ.get(SIGN_KEY_ENV)
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    if named:
        path = Path(named)
        if not path.is_file():
            raise UsageError(f"{SIGN_KEY_ENV}={named}: no such file")
        try:
            key = load_private_key(path, password_from_env(environ))
        except SigningKeyError as exc:
            raise UsageError(f"{SIGN_KEY_ENV}: {exc}") from None
        public = keys / "sign-key.pub"
    else:
        path = keys / "cosign.key"
        if path.exists():
            try:
                key = load_private_key(path)
            except SigningKeyError as exc:
                raise UsageError(f"{exc} (remove it to have a new key made)") from None
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            _write_private(path, key)
        public = keys / "cosign.pub"
    public.write_bytes(_public_pem(key))
    return key, public


def _shown(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def publish(
    reference: Reference, sbom: bytes, build: Path, environ: Mapping[str, str], plain_http: bool
) -> dict[str, Any]:
    """Attach ``sbom``, sign, write ``build/publish.json``; returns what it holds."""
    created = source_date(environ)
    key, public = signing_key(build / "keys", environ)
    username, password = environ.get("REGISTRY_USERNAME"), environ.get("REGISTRY_PASSWORD")
    with RegistryClient(
        reference.registry,
        plain_http=True if plain_http else None,
        username=username if username and password else None,
        password=password if username and password else None,
    ) as client:
        image_digest = resolve_digest(client, reference)
        pinned = Reference.parse(f"{reference.registry}/{reference.repository}@{image_digest}")
        attached = push_sbom(client, reference.repository, image_digest, sbom, created)
        v2 = sign_image(client, pinned, key)
        v3 = sign_image_bundle(client, pinned, key, now=created)
    record = {
        "image": str(reference),
        "image_digest": image_digest,
        "sbom": {
            "digest": attached.digest,
            "artifact_type": SBOM_MEDIA_TYPE,
            "layer_digest": attached.layer_digest,
            "listed_in": attached.listed_in,
        },
        "signatures": {"cosign-v2": v2, "cosign-v3": v3},
        "public_key": _shown(public),
    }
    target = build / "publish.json"
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    partial.replace(target)
    return record


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", metavar="IMAGE_REF", help="the pushed image, by tag or digest")
    parser.add_argument(
        "--sbom",
        type=Path,
        default=DEFAULT_BUILD / "context" / "sbom.cdx.json",
        help="the CycloneDX SBOM to attach [build/image/context/sbom.cdx.json]",
    )
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=DEFAULT_BUILD,
        help="where keys/ and publish.json go [build/image]",
    )
    parser.add_argument(
        "--plain-http", action="store_true", help="HTTP even to a non-loopback registry"
    )
    args = parser.parse_args(argv)
    try:
        reference = Reference.parse(args.image)
        if reference.tag is None and reference.digest is None:
            raise UsageError(f"{args.image}: names neither a tag nor a digest")
        try:
            sbom = args.sbom.read_bytes()
        except OSError as exc:
            raise UsageError(f"--sbom {args.sbom}: {exc.strerror}") from None
        record = publish(reference, sbom, args.build_dir, os.environ, args.plain_http)
    except ConfigError as exc:
        print(f"publish.py: {exc}", file=sys.stderr)
        return 2
    except (GpufleetError, OSError) as exc:
        print(f"publish.py: {exc}", file=sys.stderr)
        return 1
    print(
        f"publish.py: {record['image']} ({record['image_digest']}): SBOM {record['sbom']['digest']}"
        f" listed in {record['sbom']['listed_in']}; signed cosign-v2 and cosign-v3; verify with"
        f" `gpufleet cache verify {record['image']} --key {record['public_key']}`",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
