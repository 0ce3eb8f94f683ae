"""The real image, as ``make image PUSH=...`` left it: its SBOM referrer and its signatures.

``make test`` runs ``make image PUSH=$REGISTRY/gpufleet`` before pytest, and that
runs scripts/image/publish.py, which writes build/image/publish.json. Without
that file these tests fail (they never skip): the image was not built and
published. The same checks on a synthetic image, without buildah, are in
test_image_supply_chain.py.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

import gpufleet
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.referrers import list_referrers
from tests.integration.kcache_cli_support import cache_cli, write_keys
from tests.sbom_support import ROOT, SBOM_TYPE, artifact, missing_from_sbom, pull_json

pytestmark = pytest.mark.integration

BUILD = ROOT / "build" / "image"
IN_IMAGE = "usr/share/doc/gpufleet/sbom.cdx.json"


@pytest.fixture(scope="module")
def record() -> dict[str, Any]:
    """build/image/publish.json, which make image's publish step writes."""
    path = BUILD / "publish.json"
    if not path.is_file():
        pytest.fail(
            f"{path.relative_to(ROOT)} is missing: run `make image PUSH=$REGISTRY/gpufleet` "
            "(make test runs make image before pytest)"
        )
    document: dict[str, Any] = json.loads(path.read_text())
    return document


@pytest.fixture(scope="module")
def image(record: dict[str, Any]) -> Reference:
    return Reference.parse(record["image"])


def test_the_sbom_artifact_refers_to_the_published_image(
    record: dict[str, Any], image: Reference
) -> None:
    digest = record["image_digest"]
    with RegistryClient(image.registry) as client:
        assert client.resolve(image.repository, image.tag or digest) == digest
        referrers, _ = list_referrers(client, image.repository, digest, artifact_type=SBOM_TYPE)
        manifest = artifact(client, image.repository, record["sbom"]["digest"])
    assert record["sbom"]["digest"] in [entry.digest for entry in referrers]
    assert manifest["subject"]["digest"] == digest
    assert manifest["artifactType"] == SBOM_TYPE


def test_the_pushed_sbom_is_the_built_one_and_lists_gpufleet_and_its_dependencies(
    record: dict[str, Any], image: Reference
) -> None:
    with RegistryClient(image.registry) as client:
        manifest = artifact(client, image.repository, record["sbom"]["digest"])
        (layer,) = manifest["layers"]
        document = pull_json(client, image.repository, layer["digest"])
    assert document == json.loads((BUILD / "context" / "sbom.cdx.json").read_bytes())
    assert missing_from_sbom(document, gpufleet.__version__) == []


def _file_in_layers(client: RegistryClient, repository: str, digest: str, name: str) -> bytes:
    """``name`` as the image's top-most layer holding it has it."""
    manifest, _, _ = client.get_manifest(repository, digest)
    for layer in reversed(json.loads(manifest)["layers"]):
        with tempfile.TemporaryFile() as blob:
            client.pull_blob(repository, layer["digest"], blob)
            blob.seek(0)
            with tarfile.open(fileobj=blob, mode="r:*") as archive:
                for member in archive:
                    if member.name.removeprefix("./") == name and member.isfile():
                        extracted = archive.extractfile(member)
                        assert extracted is not None
                        return extracted.read()
    raise AssertionError(f"no layer of {digest} holds {name}")


def test_the_image_holds_the_same_sbom(record: dict[str, Any], image: Reference) -> None:
    with RegistryClient(image.registry) as client:
        inside = _file_in_layers(client, image.repository, record["image_digest"], IN_IMAGE)
        manifest = artifact(client, image.repository, record["sbom"]["digest"])
        pushed = io.BytesIO()
        client.pull_blob(image.repository, manifest["layers"][0]["digest"], pushed)
    assert inside == pushed.getvalue()


@pytest.mark.parametrize("signature_format", ["cosign-v2", "cosign-v3"])
def test_gpufleet_verifies_the_image_with_the_public_key(
    record: dict[str, Any], signature_format: str
) -> None:
    public = ROOT / record["public_key"]
    verified = cache_cli(
        "verify", record["image"], "--key", str(public), "--format", signature_format
    )
    assert verified.stdout.strip() == record["image_digest"]


def test_gpufleet_refuses_the_image_with_another_key(
    record: dict[str, Any], tmp_path: Path
) -> None:
    _, other = write_keys(tmp_path, "other")
    refused = cache_cli("verify", record["image"], "--key", str(other), check=False)
    assert refused.returncode == 1
    assert "no valid signature by a trusted key" in refused.stderr
