"""``scripts/image/publish.py``: the image's SBOM as an OCI 1.1 referrer, and its signatures.

No buildah here: a small synthetic image is pushed to the test registry with
gpufleet's own client, and publish.py runs against it as ``make image`` runs it
after ``buildah push``. The SBOM is sbom.py's of this very environment, which
holds gpufleet and every extra. The real image's checks are in
test_image_published.py.
"""

from __future__ import annotations

import json
import stat
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import gpufleet
from gpufleet.kcache.bundle import BUNDLE_MEDIA_TYPE
from gpufleet.kcache.oci import RegistryClient, sha256_digest
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.referrers import list_referrers, referrers_tag
from gpufleet.kcache.sign import signature_tag
from tests.conftest import require
from tests.integration.kcache_cli_support import cache_cli, push_image, write_keys
from tests.sbom_support import (
    PUBLISH,
    ROOT,
    SBOM,
    SBOM_TYPE,
    artifact,
    missing_from_sbom,
    pull_json,
    run_script,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(test_servers: dict[str, str]) -> str:
    (address,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    return address


@pytest.fixture(scope="module")
def sbom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sbom.py's SBOM of the running environment (gpufleet with every extra)."""
    output = tmp_path_factory.mktemp("sbom") / "sbom.cdx.json"
    done = run_script(SBOM, "--environment", sys.executable, "--output", str(output))
    assert done.returncode == 0, done.stderr
    return output


def new_image(registry: str) -> tuple[str, str]:
    ref = f"{registry}/gpufleet-supply/img-{uuid.uuid4().hex[:8]}:0.1.0"
    with RegistryClient(registry) as client:
        digest = push_image(client, Reference.parse(ref), uuid.uuid4().bytes)
    return ref, digest


def publish(ref: str, sbom: Path, build: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = run_script(PUBLISH, ref, "--sbom", str(sbom), "--build-dir", str(build), env=env)
    assert done.returncode == 0, done.stderr
    record: dict[str, Any] = json.loads((build / "publish.json").read_text())
    return record


@pytest.fixture(scope="module")
def published(
    registry: str, sbom: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str, Path, dict[str, Any]]:
    """(reference, image digest, build dir, publish.json) of one published synthetic image."""
    ref, digest = new_image(registry)
    build = tmp_path_factory.mktemp("build")
    return ref, digest, build, publish(ref, sbom, build)


def key_path(build: Path, record: dict[str, Any]) -> Path:
    """The public key publish.json names; ``build`` is where it lies for the tests here."""
    assert Path(record["public_key"]).parent == build / "keys"
    return ROOT / record["public_key"]  # relative to the repository root, or absolute


def test_the_sbom_is_a_referrer_of_the_image_digest(
    published: tuple[str, str, Path, dict[str, Any]],
) -> None:
    ref, digest, _, record = published
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as client:
        referrers, _ = list_referrers(client, parsed.repository, digest, artifact_type=SBOM_TYPE)
        assert [entry.digest for entry in referrers] == [record["sbom"]["digest"]]
        manifest = artifact(client, parsed.repository, record["sbom"]["digest"])
        image_manifest, media_type, _ = client.get_manifest(parsed.repository, digest)
    assert manifest["artifactType"] == SBOM_TYPE
    assert manifest["subject"] == {
        "mediaType": media_type, "digest": digest, "size": len(image_manifest),
    }  # fmt: skip
    assert [layer["mediaType"] for layer in manifest["layers"]] == [SBOM_TYPE]
    assert record["image_digest"] == digest


def test_the_registry_without_a_referrers_api_lists_it_in_the_tag_schema(
    published: tuple[str, str, Path, dict[str, Any]],
) -> None:
    ref, digest, _, record = published
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as client:
        assert client.get_referrers(parsed.repository, digest) is None  # docker-registry 2.8
        index, _, _ = client.get_manifest(parsed.repository, referrers_tag(digest))
    listed = {m["digest"]: m.get("artifactType") for m in json.loads(index)["manifests"]}
    assert listed[record["sbom"]["digest"]] == SBOM_TYPE
    assert listed[record["signatures"]["cosign-v3"]] == BUNDLE_MEDIA_TYPE


def test_the_pushed_sbom_is_the_file_and_lists_gpufleet_and_its_direct_dependencies(
    published: tuple[str, str, Path, dict[str, Any]], sbom: Path
) -> None:
    ref, _, _, record = published
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as client:
        manifest = artifact(client, parsed.repository, record["sbom"]["digest"])
        (layer,) = manifest["layers"]
        document = pull_json(client, parsed.repository, layer["digest"])
    assert layer["digest"] == sha256_digest(sbom.read_bytes())
    assert missing_from_sbom(document, gpufleet.__version__) == []


@pytest.mark.parametrize("signature_format", ["cosign-v2", "cosign-v3"])
def test_verify_accepts_the_image_with_the_public_key(
    published: tuple[str, str, Path, dict[str, Any]], signature_format: str
) -> None:
    ref, digest, build, record = published
    public = key_path(build, record)
    verified = cache_cli("verify", ref, "--key", str(public), "--format", signature_format)
    assert verified.stdout.strip() == digest


def test_verify_refuses_the_image_with_another_key(
    published: tuple[str, str, Path, dict[str, Any]], tmp_path: Path
) -> None:
    ref, _, _, _ = published
    _, other = write_keys(tmp_path, "other")
    refused = cache_cli("verify", ref, "--key", str(other), check=False)
    assert refused.returncode == 1
    assert "no valid signature by a trusted key" in refused.stderr
    assert "[cosign-v2]" in refused.stderr
    assert "[cosign-v3]" in refused.stderr


def test_publish_json_names_the_signature_manifests(
    published: tuple[str, str, Path, dict[str, Any]],
) -> None:
    ref, digest, _, record = published
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as client:
        v2 = client.resolve(parsed.repository, signature_tag(digest))
        bundles, _ = list_referrers(
            client, parsed.repository, digest, artifact_type=BUNDLE_MEDIA_TYPE
        )
    assert record["signatures"]["cosign-v2"] == v2
    assert [entry.digest for entry in bundles] == [record["signatures"]["cosign-v3"]]


def test_the_generated_key_is_private_made_once_and_never_printed(
    registry: str, sbom: Path, tmp_path: Path
) -> None:
    build = tmp_path / "build"
    first_ref, _ = new_image(registry)
    done = run_script(PUBLISH, first_ref, "--sbom", str(sbom), "--build-dir", str(build))
    assert done.returncode == 0, done.stderr
    key = build / "keys" / "cosign.key"
    public = (build / "keys" / "cosign.pub").read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = b"".join(key.read_bytes().splitlines()[1:-1]).decode()
    assert secret[:40] not in done.stdout + done.stderr
    second_ref, _ = new_image(registry)
    record = publish(second_ref, sbom, build)
    assert (build / "keys" / "cosign.pub").read_bytes() == public
    cache_cli("verify", second_ref, "--key", str(key_path(build, record)))


def test_publishing_again_adds_nothing(
    published: tuple[str, str, Path, dict[str, Any]], sbom: Path
) -> None:
    ref, digest, build, record = published
    assert publish(ref, sbom, build) == record
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as client:
        referrers, _ = list_referrers(client, parsed.repository, digest)
    assert len(referrers) == 2  # the SBOM and the cosign-v3 bundle, once each


def test_sign_key_signs_with_the_given_key(registry: str, sbom: Path, tmp_path: Path) -> None:
    ref, digest = new_image(registry)
    key, public = write_keys(tmp_path, "release")
    build = tmp_path / "build"
    record = publish(ref, sbom, build, env={"SIGN_KEY": str(key)})
    assert not (build / "keys" / "cosign.key").exists()
    assert key_path(build, record).read_bytes() == public.read_bytes()
    for signature_format in ("cosign-v2", "cosign-v3"):
        verified = cache_cli("verify", ref, "--key", str(public), "--format", signature_format)
        assert verified.stdout.strip() == digest


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--sbom", "{tmp}/absent.json"], {}, "absent.json"),
        ([], {"SIGN_KEY": "{tmp}/absent.key"}, "SIGN_KEY"),
        (["--sbom", "{sbom}", "--build-dir", "{tmp}/b"], {}, None),
        ([], {"SOURCE_DATE_EPOCH": "yesterday"}, "SOURCE_DATE_EPOCH"),
    ],
    ids=["missing-sbom", "missing-sign-key", "bad-reference", "bad-source-date-epoch"],
)
def test_bad_input_is_one_line_and_exit_2(
    registry: str,
    sbom: Path,
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    named: str | None,
) -> None:
    ref = "not a reference" if named is None else new_image(registry)[0]
    fill = {"tmp": str(tmp_path), "sbom": str(sbom)}
    args = [arg.format(**fill) for arg in args]
    if "--sbom" not in args:
        args += ["--sbom", str(sbom)]
    if "--build-dir" not in args:
        args += ["--build-dir", str(tmp_path / "build")]
    done = run_script(PUBLISH, ref, *args, env={k: v.format(**fill) for k, v in env.items()})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert (named or "not a reference") in done.stderr
    assert "Traceback" not in done.stderr


def test_an_image_the_registry_lacks_fails_with_exit_1(
    registry: str, sbom: Path, tmp_path: Path
) -> None:
    ref = f"{registry}/gpufleet-supply/absent-{uuid.uuid4().hex[:8]}:0.1.0"
    done = run_script(PUBLISH, ref, "--sbom", str(sbom), "--build-dir", str(tmp_path / "b"))
    assert done.returncode == 1
    assert "no such image" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "b" / "publish.json").exists()


def test_source_date_epoch_dates_the_sbom_artifact(
    registry: str, sbom: Path, tmp_path: Path
) -> None:
    ref, _ = new_image(registry)
    record = publish(ref, sbom, tmp_path / "build", env={"SOURCE_DATE_EPOCH": "1700000000"})
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as client:
        manifest = artifact(client, parsed.repository, record["sbom"]["digest"])
    assert manifest["annotations"] == {"org.opencontainers.image.created": "2023-11-14T22:13:20Z"}
