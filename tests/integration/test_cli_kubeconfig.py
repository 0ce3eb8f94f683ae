"""A command that needs the API, run without a usable kubeconfig: one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

GPUFLEET = [sys.executable, "-m", "gpufleet.cli"]


def run(tmp_path: Path, kubeconfig: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"KUBECONFIG", "KUBERNETES_SERVICE_HOST", "HOME"}
    }
    env.update({"HOME": str(home), "CLUSTER_NAME": "test"})
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run(
        [*GPUFLEET, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def assert_one_line_about(result: subprocess.CompletedProcess[str], path: Path, what: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    assert what in lines[0]
    assert "KUBERNETES_SERVICE_HOST is unset" in lines[0]
    assert "Expected key" not in result.stderr
    assert "Traceback" not in result.stderr


def test_no_kubeconfig_at_all_names_the_default_file(tmp_path: Path) -> None:
    result = run(tmp_path, None, "inventory", "controller")
    assert_one_line_about(result, tmp_path / "home" / ".kube" / "config", "missing")


def test_a_missing_kubeconfig_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    assert_one_line_about(run(tmp_path, missing, "inventory", "controller"), missing, "missing")


def test_an_empty_kubeconfig_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert_one_line_about(run(tmp_path, empty, "inventory", "controller"), empty, "empty")
