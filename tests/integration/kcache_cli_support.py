"""Shared by the kernel-cache CLI, signing and image tests: the real ``gpufleet cache`` CLI,
key pairs written to disk, and a minimal image pushed to the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gpufleet.kcache.oci import OCI_MANIFEST, RegistryClient, sha256_digest
from gpufleet.kcache.reference import Reference

GPUFLEET = [sys.executable, "-m", "gpufleet.cli", "cache"]


def cache_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "KCACHE_", "COSIGN_"))
    }
    full_env.update(env or {})
    result = subprocess.run(
        [*GPUFLEET, *args], capture_output=True, text=True, env=full_env, timeout=180, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def write_keys(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def push_image(client: RegistryClient, ref: Reference, content: bytes) -> str:
    """A minimal OCI image at ``ref`` (one layer, ``content``); returns its digest."""
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    client.push_blob(ref.repository, config)
    client.push_blob(ref.repository, content)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256_digest(content), "size": len(content)}],
    }).encode()  # fmt: skip
    assert ref.tag is not None
    return client.push_manifest(ref.repository, ref.tag, manifest, OCI_MANIFEST)
