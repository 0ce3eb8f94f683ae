"""The committed gRPC code is exactly what `make proto` generates from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "src" / "gpufleet" / "deviceapi" / "v1alpha1"
COMMITTED_PODRESOURCES = ROOT / "src" / "gpufleet" / "exporter" / "podmap" / "kubelet_v1"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both generated packages, freshly generated into a temp dir (never into src/)."""
    out = tmp_path_factory.mktemp("proto")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh")],
        env={
            **os.environ,
            "OUT": str(out / "deviceapi"),
            "OUT_PODRESOURCES": str(out / "podresources"),
            "PYTHON": sys.executable,
        },
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out


def _stale(generated: Path, committed: Path, names: list[str]) -> list[str]:
    return [n for n in names if (generated / n).read_bytes() != (committed / n).read_bytes()]


def test_regenerating_the_grpc_code_changes_nothing(regenerated: Path) -> None:
    names = ["gpu_pb2.py", "gpu_pb2.pyi", "gpu_pb2_grpc.py"]
    stale = _stale(regenerated / "deviceapi", COMMITTED, names)
    assert stale == [], f"run `make proto` and commit: {stale} differ from proto/"


def test_regenerating_the_kubelet_podresources_code_changes_nothing(regenerated: Path) -> None:
    names = ["api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"]
    stale = _stale(regenerated / "podresources", COMMITTED_PODRESOURCES, names)
    assert stale == [], f"run `make proto` and commit: {stale} differ from proto/"
