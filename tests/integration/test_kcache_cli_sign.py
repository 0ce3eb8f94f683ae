"""``gpufleet cache sign/verify --format``: both cosign formats, real CLI and registry."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.referrers import referrers_tag
from gpufleet.kcache.sign import signature_tag
from tests.conftest import require
from tests.integration.kcache_cli_support import cache_cli, push_image, write_keys

pytestmark = pytest.mark.integration


@pytest.fixture
def image(test_servers: dict[str, str]) -> tuple[str, str]:
    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    ref = f"{registry}/kcache-cli-sign/img-{uuid.uuid4().hex[:8]}:v1"
    with RegistryClient(registry) as client:
        digest = push_image(client, Reference.parse(ref), uuid.uuid4().bytes)
    return ref, digest


def _has_tag(ref: str, tag: str) -> bool:
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as client:
        return client.resolve(parsed.repository, tag) is not None


def test_sign_format_cosign_v3_attaches_a_bundle_that_verify_finds(
    tmp_path: Path, image: tuple[str, str]
) -> None:
    ref, digest = image
    key, pub = write_keys(tmp_path, "ci")
    signed = cache_cli("sign", ref, "--key", str(key), "--format", "cosign-v3")
    assert signed.stdout.strip().startswith("sha256:")
    assert _has_tag(ref, referrers_tag(digest))
    assert not _has_tag(ref, signature_tag(digest))
    assert cache_cli("verify", ref, "--key", str(pub)).stdout.strip() == digest
    only_v3 = cache_cli("verify", ref, "--key", str(pub), "--format", "cosign-v3")
    assert only_v3.stdout.strip() == digest
    only_v2 = cache_cli("verify", ref, "--key", str(pub), "--format", "cosign-v2", check=False)
    assert only_v2.returncode == 1
    assert "is unsigned" in only_v2.stderr
    assert "[cosign-v2]" in only_v2.stderr
    assert "Traceback" not in only_v2.stderr


def test_sign_defaults_to_the_cosign_v2_sig_tag(tmp_path: Path, image: tuple[str, str]) -> None:
    ref, digest = image
    key, pub = write_keys(tmp_path, "ci")
    cache_cli("sign", ref, "--key", str(key))
    assert _has_tag(ref, signature_tag(digest))
    assert not _has_tag(ref, referrers_tag(digest))
    assert cache_cli("verify", ref, "--key", str(pub)).stdout.strip() == digest
    only_v3 = cache_cli("verify", ref, "--key", str(pub), "--format", "COSIGN-V3", check=False)
    assert only_v3.returncode == 1
    assert "[cosign-v3]" in only_v3.stderr


def test_verify_with_another_key_names_the_key_file_and_exits_1(
    tmp_path: Path, image: tuple[str, str]
) -> None:
    ref, _ = image
    key, _ = write_keys(tmp_path, "ci")
    _, other = write_keys(tmp_path, "other")
    cache_cli("sign", ref, "--key", str(key), "--format", "cosign-v3")
    refused = cache_cli("verify", ref, "--key", str(other), check=False)
    assert refused.returncode == 1
    assert "no valid signature by a trusted key" in refused.stderr
    assert "'other.pub'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_unknown_format_is_a_usage_error(tmp_path: Path, image: tuple[str, str]) -> None:
    ref, _ = image
    key, _ = write_keys(tmp_path, "ci")
    refused = cache_cli("sign", ref, "--key", str(key), "--format", "cosign-v4", check=False)
    assert refused.returncode == 2
    assert "--format" in refused.stderr
    assert "Traceback" not in refused.stderr
