"""The gpufleet command line as the CLI tests run it: a subprocess with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["GPUFLEET", "gpufleet"]

GPUFLEET = [sys.executable, "-m", "gpufleet.cli"]


def gpufleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in {"EXPORTER_TYPE", "MACHINE_ID"}}
    full_env.update({"CLUSTER_NAME": "test-cluster", "NODE_NAME": "node-1"})
    full_env.update(env or {})
    return subprocess.run(
        [*GPUFLEET, *args], capture_output=True, text=True, env=full_env, timeout=60, check=False
    )
