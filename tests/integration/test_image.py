"""The container image `make image` built (`scripts/image/build.sh`, docs/image.md).

These tests do not build: they read what the build left in build/image/ (image.json, the
OCI archive), run the image from buildah's storage with `buildah run`, and read the pushed
manifest back from the test registry. `make test` runs `make image PUSH=$REGISTRY/gpufleet
REPRO_CHECK=1` after the test servers start; without it they fail and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gpufleet
from tests.conftest import require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "image"
MAX_BYTES = 350 * 1000 * 1000
# The storage and isolation `make image` uses (buildah 1.28 ignores STORAGE_DRIVER in the
# environment, so the driver is named on the command line).
BUILDAH_ENV = {"STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
# The README's main job (`make run`), inside the image: three VMs, the third on DGX #1's GPUs.
MAIN_JOB = """
set -e
export CLUSTER_NAME=demo SQLITE_PATH=/tmp/inventory.db LOG_FORMAT=text
gpufleet inventory scan --simulate dgx-h100 --seed 1 --node node-a --machine-id i-0a \
    -e stdout,sqlite
gpufleet inventory scan --simulate dgx-h100 --seed 2 --node node-b --machine-id i-0b -e sqlite
gpufleet inventory scan --simulate dgx-h100 --seed 1 --node node-c --machine-id i-0c -e sqlite
gpufleet inventory history --moved
"""


@pytest.fixture(scope="module")
def record() -> dict[str, Any]:
    """build/image/image.json, which `make image` writes."""
    path = OUT / "image.json"
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make image` (make test does)")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run buildah with the storage `make image` used; output as text."""
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: run scripts/image/ensure-tools.sh (make test does)")
    return subprocess.run(
        ["buildah", "--storage-driver", BUILDAH_ENV["STORAGE_DRIVER"], *args],
        env={**os.environ, **BUILDAH_ENV},
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )


@pytest.fixture(scope="module")
def container(record: dict[str, Any]) -> Iterator[str]:
    """A working container of the built image (buildah from); removed afterwards."""
    made = buildah("from", "--pull=never", record["name"], check=False)
    if made.returncode != 0:
        pytest.fail(
            f"{record['name']} is not in buildah's storage: run `make image`\n{made.stderr}"
        )
    name = made.stdout.strip().splitlines()[-1]
    yield name
    buildah("rm", name, check=False)


def run_in(container: str, *command: str) -> subprocess.CompletedProcess[str]:
    """`buildah run` COMMAND in the container, as the image's own user."""
    return buildah("run", "--isolation", "chroot", container, "--", *command, check=False)


def test_version_inside_the_image_is_the_package_version(container: str) -> None:
    done = run_in(container, "gpufleet", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["gpufleet", gpufleet.__version__]


def test_the_readme_main_job_runs_inside_the_image(container: str) -> None:
    done = run_in(container, "sh", "-c", MAIN_JOB)
    assert done.returncode == 0, done.stderr
    readings = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    # The first scan to stdout: 8 H100s of node-a on machine i-0a.
    assert len(readings) == 8
    assert {(r["node"], r["machine"], r["model"]) for r in readings} == {
        ("node-a", "i-0a", "NVIDIA H100 80GB HBM3")
    }
    # The history finds DGX #1's GPUs again on i-0c: every serial of the first scan moved.
    history = done.stdout.split("\n", len(readings))[-1]
    for reading in readings:
        assert reading["gpu"] in history
    assert "i-0a" in history
    assert "i-0c" in history


def test_the_default_user_is_not_root(container: str, record: dict[str, Any]) -> None:
    done = run_in(container, "python3", "-c", "import os; print(os.getuid(), os.getgid())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["65532", "65532"]
    config = json.loads(buildah("inspect", "--type", "image", record["name"]).stdout)["OCIv1"]
    assert config["config"]["User"] == "65532:65532"
    assert config["config"]["Entrypoint"] == ["gpufleet"]


def test_no_compilers_pip_or_wheels_in_the_runtime_image(container: str) -> None:
    probe = """
import glob, os, shutil
for tool in ("gcc", "cc", "c++", "g++", "clang", "make", "pip", "pip3"):
    if shutil.which(tool):
        print("tool", tool, shutil.which(tool))
try:
    import pip
    print("module pip", pip.__file__)
except ImportError:
    pass
for pattern in ("/wheels", "/root/.cache", "/tmp/pip-*", "/opt/gpufleet/**/*.whl",
                "/opt/gpufleet/lib/python3*/site-packages/pip*"):
    for path in glob.glob(pattern, recursive=True):
        print("file", path)
"""
    done = run_in(container, "/opt/gpufleet/bin/python3", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def test_the_sbom_is_in_the_image(container: str) -> None:
    done = run_in(container, "cat", "/usr/share/doc/gpufleet/sbom.cdx.json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bomFormat"] == "CycloneDX"


def test_the_runtime_image_is_at_most_350_mb_uncompressed(record: dict[str, Any]) -> None:
    manifest = json.loads(buildah("inspect", "--type", "image", record["name"]).stdout)["Manifest"]
    layers = json.loads(manifest)["layers"]
    size = sum(layer["size"] for layer in layers)
    assert size == record["size"]
    assert size <= MAX_BYTES


def test_the_oci_archive_holds_the_image(record: dict[str, Any]) -> None:
    archive = ROOT / record["archive"]
    assert archive.name == f"gpufleet-{gpufleet.__version__}.oci.tar"
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        names = set(tar.getnames())
    (manifest,) = index["manifests"]
    assert manifest["digest"] == record["archive_digest"]
    assert manifest["annotations"]["org.opencontainers.image.ref.name"] == (
        f"gpufleet:{gpufleet.__version__}"
    )
    assert "blobs/sha256/" + manifest["digest"].removeprefix("sha256:") in names


def test_the_pushed_manifest_has_the_oci_labels(
    record: dict[str, Any], test_servers: dict[str, str], tmp_path: Path
) -> None:
    from gpufleet.kcache.oci import RegistryClient

    (registry,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    assert record["pushed"] == f"{registry}/gpufleet:{gpufleet.__version__}", (
        "the image was not pushed to this test registry: run `make image PUSH=$REGISTRY/gpufleet`"
    )
    (tmp_path / "docker").mkdir()
    with RegistryClient(registry, docker_config=tmp_path / "docker") as client:
        data, _, digest = client.get_manifest("gpufleet", gpufleet.__version__)
        assert digest == record["pushed_digest"]
        config_digest = json.loads(data)["config"]["digest"]
        blob = tmp_path / "config.json"
        with blob.open("wb") as sink:
            client.pull_blob("gpufleet", config_digest, sink)
    labels = json.loads(blob.read_bytes())["config"]["Labels"]
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert labels["org.opencontainers.image.version"] == gpufleet.__version__
    assert labels["org.opencontainers.image.revision"].removesuffix("-dirty") == revision
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")


def test_a_second_build_gives_the_same_gpufleet_layer(record: dict[str, Any]) -> None:
    repro = record["reproducibility"]
    assert repro["checked"], "build/image/image.json: no second build; run make image REPRO_CHECK=1"
    assert record["gpufleet_layer"] is not None
    assert repro["second_build"]["gpufleet_layer"] == record["gpufleet_layer"]
    assert record["gpufleet_layer"] in {layer["digest"] for layer in record["layers"]}


def test_containerfile_defaults_match_the_package() -> None:
    text = (ROOT / "Containerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG BASE=docker\.io/library/python:3\.11-slim$", text, re.M)
    assert re.search(rf"^ARG VERSION={re.escape(gpufleet.__version__)}$", text, re.M)
    assert 'ENTRYPOINT ["gpufleet"]' in text
