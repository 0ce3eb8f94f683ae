"""The committed gRPC code is exactly what `make proto` generates from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "src" / "gpufleet" / "deviceapi" / "v1alpha1"


def test_regenerating_the_grpc_code_changes_nothing(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh")],
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    names = ["gpu_pb2.py", "gpu_pb2.pyi", "gpu_pb2_grpc.py"]
    stale = [n for n in names if (tmp_path / n).read_bytes() != (COMMITTED / n).read_bytes()]
    assert stale == [], f"run `make proto` and commit: {stale} differ from proto/"
