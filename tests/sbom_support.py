"""Checks shared by the image supply-chain tests: what an SBOM must list, how to publish."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from gpufleet.kcache.oci import OCI_MANIFEST, RegistryClient

ROOT = Path(__file__).resolve().parent.parent
PUBLISH = ROOT / "scripts" / "image" / "publish.py"
SBOM = ROOT / "scripts" / "image" / "sbom.py"
SBOM_TYPE = "application/vnd.cyclonedx+json"


def direct_dependencies() -> list[Requirement]:
    """gpufleet's own requirements and those of every extra ``all`` names, from pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    extras = project["optional-dependencies"]
    for text in extras["all"]:
        for name in sorted(Requirement(text).extras):
            requirements += [Requirement(item) for item in extras[name]]
    return requirements


def listed_versions(document: dict[str, Any]) -> dict[str, str]:
    """Component name (canonical) → version, as the SBOM lists them."""
    return {
        canonicalize_name(item["name"]): item.get("version", "")
        for item in document.get("components", [])
    }


def missing_from_sbom(document: dict[str, Any], version: str) -> list[str]:
    """What the SBOM lacks: gpufleet at ``version``, a direct dependency at a version in range."""
    listed = listed_versions(document)
    problems = []
    if listed.get("gpufleet") != version:
        problems.append(f"gpufleet {version} (listed: {listed.get('gpufleet')!r})")
    for requirement in direct_dependencies():
        found = listed.get(canonicalize_name(requirement.name))
        if not found or Version(found) not in requirement.specifier:
            problems.append(f"{requirement} (listed: {found!r})")
    return problems


def pull_json(client: RegistryClient, repository: str, digest: str) -> dict[str, Any]:
    """A blob the registry holds, parsed as JSON."""
    sink = io.BytesIO()
    client.pull_blob(repository, digest, sink)
    document: dict[str, Any] = json.loads(sink.getvalue())
    return document


def artifact(client: RegistryClient, repository: str, digest: str) -> dict[str, Any]:
    """The OCI manifest ``digest`` (an artifact manifest), parsed."""
    body, _, _ = client.get_manifest(repository, digest, accept=(OCI_MANIFEST,))
    document: dict[str, Any] = json.loads(body)
    return document


def run_script(
    script: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one of the image scripts with this interpreter, outside any SIGN_KEY/COSIGN_*."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REGISTRY_", "COSIGN_", "SIGN_KEY", "SOURCE_DATE_EPOCH"))
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True, text=True, env=full_env, timeout=300, check=False,
    )  # fmt: skip
