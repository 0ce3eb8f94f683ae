"""Moving cache images between a directory, a registry and the node's store.

These are the functions the CLI (and later the node agent) calls: push a built
image, read a remote image's summary without pulling its layer, and pull a
layer into the content-addressed store, verifying the signature first when a
key is given.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from gpufleet.kcache.errors import KcacheError, UnsafeArchiveError
from gpufleet.kcache.extract import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    extract_layer,
    max_layer_bytes,
)
from gpufleet.kcache.image import (
    CONFIG_MEDIA_TYPE,
    DOCKER_CONFIG_MEDIA_TYPE,
    DOCKER_LAYER_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    BuiltImage,
)
from gpufleet.kcache.labels import MOUNT_ROOT_LABEL, labels_of, summary_from_labels
from gpufleet.kcache.model import CacheSummary
from gpufleet.kcache.oci import ProgressCallback, RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.sign import SIMPLE_SIGNING_MEDIA_TYPE, verify_image
from gpufleet.kcache.store import CacheStore

__all__ = [
    "MAX_CONFIG_BYTES",
    "MOUNT_ROOT_LABEL",
    "Pulled",
    "RemoteImage",
    "fetch_image",
    "pull_to_store",
    "push_image",
]

MAX_CONFIG_BYTES = 4 * 1024**2
"""The largest image config `fetch_image` reads by default: a cache image's is a few KiB."""
# An image built by MCV comes as an OCI or a Docker schema2 image, whichever builder pushed it.
_MANIFEST_TYPES = (MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE)
_CONFIG_TYPES = (CONFIG_MEDIA_TYPE, DOCKER_CONFIG_MEDIA_TYPE)
_LAYER_TYPES = (LAYER_MEDIA_TYPE, DOCKER_LAYER_MEDIA_TYPE)


def push_image(
    client: RegistryClient,
    reference: Reference,
    image: BuiltImage,
    *,
    mount_from: str | None = None,
    progress: ProgressCallback | None = None,
) -> str:
    """Push layer, config and manifest; returns the manifest digest.

    Blobs the repository already has are not sent again; with `mount_from`
    (another repository of the same registry) the registry is first asked to
    mount them from there, which costs no upload at all. `progress` is told
    the layer's bytes sent so far (the layer is nearly all of an image).
    """
    if reference.tag is None and reference.digest is None:
        raise KcacheError(f"{reference}: name a tag to push to")
    client.push_blob(
        reference.repository, image.layer_path, image.layer_digest,
        mount_from=mount_from, progress=progress,
    )  # fmt: skip
    client.push_blob(reference.repository, image.config, image.config_digest, mount_from=mount_from)
    tag = reference.tag or image.manifest_digest
    digest = client.push_manifest(reference.repository, tag, image.manifest, MANIFEST_MEDIA_TYPE)
    if digest != image.manifest_digest:
        raise KcacheError(
            f"{reference}: the registry stored the manifest as {digest}, "
            f"not {image.manifest_digest}"
        )
    return digest


@dataclass(frozen=True, slots=True)
class RemoteImage:
    """A cache image in a registry, known by its manifest and config only."""

    reference: Reference
    digest: str
    layer_digest: str
    layer_size: int
    labels: dict[str, str]
    summary: CacheSummary

    @property
    def size_bytes(self) -> int:
        """The cache's size as the image declares it (the extracted files must add up to it).

        The ``cache-size-bytes`` label, of ``cache.triton.image/`` or MCV's
        ``cache.vllm.image/``; `summary_from_labels` checked that it agrees with
        our summary label where both are there.
        """
        return self.summary.size_bytes

    @property
    def entry_count(self) -> int:
        """The cache's entries as the image declares them: kernel groups (MCV: its kernels)."""
        return self.summary.entry_count


def fetch_image(
    client: RegistryClient, reference: Reference, *, max_config_bytes: int = MAX_CONFIG_BYTES
) -> RemoteImage:
    """Read the manifest and the config (not the layer) of a cache image.

    The config is held in memory, so a descriptor over `max_config_bytes` is
    refused before a byte of it is read, and no more than its declared size
    is read (see docs/limits.md).
    """
    ref = reference.digest or reference.tag or "latest"
    manifest_bytes, media_type, digest = client.get_manifest(reference.repository, ref)
    if media_type not in _MANIFEST_TYPES:
        raise KcacheError(f"{reference}: not a cache image (manifest type {media_type})")
    try:
        manifest = json.loads(manifest_bytes)
        config, layers = manifest["config"], manifest["layers"]
        _refuse_signature(reference, layers)
        if not isinstance(layers, list) or len(layers) != 1:
            count = len(layers) if isinstance(layers, list) else "no list of"
            raise ValueError(f"{count} layers")
        (layer,) = layers
        if config["mediaType"] not in _CONFIG_TYPES or layer["mediaType"] not in _LAYER_TYPES:
            raise ValueError(
                f"config {config['mediaType']}, layer {layer['mediaType']}: unexpected media types"
            )
        config_digest, layer_digest = config["digest"], layer["digest"]
        config_size = _size(config, "config")
        layer_size = _size(layer, "layer")
    except RecursionError:
        raise KcacheError(
            f"{reference}: not a cache image: its manifest is nested too deeply"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise KcacheError(
            f"{reference}: not a cache image (one tar+gzip layer expected): {exc}"
        ) from exc
    if config_size > max_config_bytes:
        raise KcacheError(
            f"{reference}: its config descriptor declares {config_size} bytes, more than the "
            f"{max_config_bytes} a cache image's config may hold (KCACHE_MAX_CONFIG_BYTES)"
        )
    config_blob = io.BytesIO()
    client.pull_blob(reference.repository, str(config_digest), config_blob, size=config_size)
    labels = labels_of(config_blob.getvalue())
    return RemoteImage(
        reference.with_digest(digest), digest, str(layer_digest), int(layer_size), labels,
        summary_from_labels(labels),
    )  # fmt: skip


def _size(descriptor: object, what: str) -> int:
    """A descriptor's ``size``: a non-negative integer, else ValueError."""
    size = descriptor.get("size") if isinstance(descriptor, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{what} size {size!r} is not a byte count")
    return size


def _refuse_signature(reference: Reference, layers: object) -> None:
    """Raise, naming the image it signs, if `reference` is a cosign signature, not a cache."""
    signed = re.fullmatch(r"sha256-([0-9a-f]{64})\.sig", reference.tag or "")
    signature_layers = isinstance(layers, list) and any(
        isinstance(layer, dict) and layer.get("mediaType") == SIMPLE_SIGNING_MEDIA_TYPE
        for layer in layers
    )
    if signed is None and not signature_layers:
        return
    target = (
        f"{reference.registry}/{reference.repository}@sha256:{signed.group(1)}"
        if signed is not None
        else "the image it signs"
    )
    raise KcacheError(
        f"{reference}: a cosign signature, not a cache image; name the signed image instead: "
        f"{target}"
    )


@dataclass(frozen=True, slots=True)
class Pulled:
    """Where an image's cache lies in the store, for which mount root, and if this call put it."""

    path: Path
    digest: str
    mount_root: str
    extracted: bool


def pull_to_store(
    client: RegistryClient,
    reference: Reference,
    store: CacheStore,
    *,
    mount_root: str | None = None,
    verify_key: ec.EllipticCurvePublicKey | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_config_bytes: int = MAX_CONFIG_BYTES,
    signed_repository: str | None = None,
) -> Pulled:
    """Pull, verify and extract into the store for `mount_root`; nothing to do if it is there.

    The cache lands at ``store.path(digest, mount_root)``: one directory per
    image and mount root, since its ``__grp__`` files name the mount root.
    With `verify_key`, the signature is checked before a single byte of the
    layer is read, and the digest it vouches for is the digest extracted; it
    must name the image's repository, or `signed_repository` (`verify_image`).
    Without `mount_root`, the one the image's label names is used. The layer
    is downloaded to a temporary file in the store root first, so a layer
    whose declared size extraction could never accept under `max_bytes` and
    `max_entries` is refused before it is read, and no more than its declared
    size is read (see docs/limits.md).
    """
    if verify_key is not None:
        digest = verify_image(client, reference, verify_key, signed_repository=signed_repository)
        reference = reference.with_digest(digest)
    image = fetch_image(client, reference, max_config_bytes=max_config_bytes)
    root = mount_root or image.labels.get(MOUNT_ROOT_LABEL)
    if not root:
        raise KcacheError(f"{reference}: no --mount-root given and the image names none")
    installed = store.installed(image.digest, root)
    if installed is not None:
        return Pulled(installed, image.digest, root, extracted=False)
    layer_limit = max_layer_bytes(max_bytes, max_entries)
    if image.layer_size > layer_limit:
        raise UnsafeArchiveError(
            f"{reference}: a layer of {image.layer_size} bytes, more than the {layer_limit} a "
            f"cache of --max-bytes {max_bytes} in --max-entries {max_entries} entries can take"
        )
    extracted = False

    def fill(target: Path) -> None:
        nonlocal extracted
        with tempfile.TemporaryFile(dir=store.root) as layer:
            # The whole blob is verified against its digest before extraction starts.
            client.pull_blob(reference.repository, image.layer_digest, layer, size=image.layer_size)
            layer.seek(0)
            extract_layer(
                layer, target, mount_root=root, expected_size=image.size_bytes,
                expected_entries=image.entry_count, max_bytes=max_bytes, max_entries=max_entries,
            )  # fmt: skip
        extracted = True

    path = store.install(image.digest, root, fill)
    return Pulled(path, image.digest, root, extracted)
