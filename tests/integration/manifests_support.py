"""Shared by the manifest tests: the kustomize overlays rendered by the real ``kubectl
kustomize``, the parts of what it renders, and one permission of a Role as a ``Rule``."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS_DIR = ROOT / "deploy" / "kustomize" / "overlays"

# The device API's overlay (server + NVML provider): its own tests in
# test_manifests_device_api.py.
DEVICE_API = "device-api"
IMAGE = "ghcr.io/gpufleet/gpufleet:0.1.0"
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "Pod"}

Manifest = dict[str, Any]


class Rule(NamedTuple):
    """One permission: a verb on a resource, in a Role's namespace or cluster-wide."""

    kind: str  # ClusterRole or Role
    namespace: str  # "" for a ClusterRole
    api_group: str
    resource: str
    verb: str
    resource_name: str = ""  # "" when the rule is not limited to named objects


@functools.cache
def render(overlay: str) -> tuple[Manifest, ...]:
    """The objects ``kubectl kustomize`` renders for ``overlay``; fails (never skips)."""
    return kustomize(OVERLAYS_DIR / overlay)


def kustomize(directory: Path) -> tuple[Manifest, ...]:
    """The objects ``kubectl kustomize`` renders for a kustomization directory."""
    kubectl = shutil.which(os.environ.get("KUBECTL", "kubectl"))
    if kubectl is None:
        pytest.fail(
            "kubectl is not on PATH: run `scripts/ensure-kubectl.sh` (as root) to install "
            "Debian's kubernetes-client, or set KUBECTL to a kubectl binary"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, *kinds: str) -> list[Manifest]:
    """The rendered objects of ``overlay`` of the given kinds."""
    return [obj for obj in render(overlay) if obj["kind"] in kinds]


def pod_spec(workload: Manifest) -> Manifest:
    """The pod spec of a workload object."""
    if workload["kind"] == "Pod":
        return workload["spec"]
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def containers(overlay: str) -> Iterator[tuple[Manifest, Manifest]]:
    """Each (pod spec, container) of every workload in ``overlay``, init containers included."""
    for workload in objects(overlay, *WORKLOAD_KINDS):
        spec = pod_spec(workload)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield spec, container


def effective_security(spec: Manifest, container: Manifest, field: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[field] if field in own else spec.get("securityContext", {}).get(field)


def env_of(container: Manifest) -> dict[str, Manifest]:
    """The container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def the_daemonset(overlay: str) -> Manifest:
    """The overlay's one DaemonSet."""
    (daemonset,) = objects(overlay, "DaemonSet")
    return daemonset
