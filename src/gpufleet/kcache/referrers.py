"""OCI 1.1 referrers: the artifacts whose manifest names an image as its ``subject``.

A registry with the referrers API lists them at ``GET /v2/<repo>/referrers/<digest>``;
one without it (Debian's docker-registry 2.8, any distribution 2.x) answers 404, and
then the *referrers tag schema* holds the list: an OCI image index tagged
``sha256-<hex>`` in the same repository, which whoever pushes a referrer updates.
Both are read through `RegistryClient` under its manifest size cap; the number of
entries is capped too. See docs/kcache-sign.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpufleet.kcache.errors import NotFoundError, SignatureError
from gpufleet.kcache.oci import OCI_INDEX, OCI_MANIFEST, RegistryClient
from gpufleet.kcache.reference import check_digest, is_digest

__all__ = ["MAX_REFERRERS", "Referrer", "add_to_tag_index", "list_referrers", "referrers_tag"]

MAX_REFERRERS = 1000
"""Index entries read at most; a longer referrers list is refused rather than walked."""


@dataclass(frozen=True, slots=True)
class Referrer:
    """One entry of a referrers index: a manifest that names the image as its subject."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    annotations: Mapping[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        """The entry as an index descriptor, for the referrers tag schema."""
        entry: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type is not None:
            entry["artifactType"] = self.artifact_type
        if self.annotations:
            entry["annotations"] = dict(self.annotations)
        return entry


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for ``digest``: ``sha256-<hex>``."""
    return check_digest(digest).replace(":", "-", 1)


def list_referrers(
    client: RegistryClient, repository: str, digest: str, *, artifact_type: str | None = None
) -> tuple[list[Referrer], str]:
    """The referrers of ``digest`` (of ``artifact_type`` if given) and where they were listed.

    The referrers API first; on its 404 the tag schema; no tag: none.
    SignatureError when the index is malformed or longer than `MAX_REFERRERS`;
    RegistryError (a size cap included) as the client raises it.
    """
    body = client.get_referrers(repository, digest, artifact_type=artifact_type)
    where = f"{client.registry}/{repository}/referrers/{digest}"
    if body is None:
        tag = referrers_tag(digest)
        where = f"{client.registry}/{repository}:{tag} (referrers tag schema)"
        try:
            body, _, _ = client.get_manifest(repository, tag, accept=(OCI_INDEX,))
        except NotFoundError:
            return [], where
    entries = _parse_index(body, where)
    if artifact_type is not None:
        entries = [entry for entry in entries if entry.artifact_type == artifact_type]
    return entries, where


def add_to_tag_index(client: RegistryClient, repository: str, digest: str, entry: Referrer) -> str:
    """Add ``entry`` to the referrers tag schema index of ``digest``; returns the index digest.

    For registries without the referrers API. Read, append, write: two
    concurrent writers can lose an entry, as with every tool that keeps this
    index (cosign, oras); an entry already listed is not added again.
    """
    tag = referrers_tag(digest)
    where = f"{client.registry}/{repository}:{tag}"
    try:
        body, _, _ = client.get_manifest(repository, tag, accept=(OCI_INDEX,))
    except NotFoundError:
        known: list[dict[str, Any]] = []
    else:
        _parse_index(body, where)  # refuse to extend what is not an index
        known = [m for m in json.loads(body)["manifests"] if m.get("digest") != entry.digest]
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [*known, entry.descriptor()],
    }
    index = json.dumps(document, separators=(",", ":")).encode()
    return client.push_manifest(repository, tag, index, OCI_INDEX)


def _parse_index(body: bytes, where: str) -> list[Referrer]:
    try:
        document = json.loads(body)
    except RecursionError:
        raise SignatureError(f"{where}: the referrers index is nested too deeply") from None
    except ValueError:
        raise SignatureError(f"{where}: the referrers index is not JSON") from None
    manifests = document.get("manifests") if isinstance(document, dict) else None
    media_type = document.get("mediaType", OCI_INDEX) if isinstance(document, dict) else None
    if media_type != OCI_INDEX or not isinstance(manifests, list):
        raise SignatureError(f"{where}: not an OCI image index of referrers")
    if len(manifests) > MAX_REFERRERS:
        raise SignatureError(
            f"{where}: {len(manifests)} referrers, more than the {MAX_REFERRERS} read"
        )
    entries: list[Referrer] = []
    for item in manifests:
        if not isinstance(item, dict):
            raise SignatureError(f"{where}: a referrer descriptor is not an object")
        digest, size = item.get("digest"), item.get("size")
        media = item.get("mediaType", OCI_MANIFEST)
        artifact_type = item.get("artifactType")
        annotations = item.get("annotations") or {}
        if (
            not isinstance(digest, str)
            or not is_digest(digest)
            or not isinstance(size, int)
            or size < 0
            or not isinstance(media, str)
            or not (artifact_type is None or isinstance(artifact_type, str))
            or not isinstance(annotations, dict)
        ):
            raise SignatureError(f"{where}: malformed referrer descriptor for {digest!r:.80}")
        entries.append(
            Referrer(
                digest=digest,
                media_type=media,
                size=size,
                artifact_type=artifact_type,
                annotations={str(k): str(v) for k, v in annotations.items()},
            )
        )
    return entries
