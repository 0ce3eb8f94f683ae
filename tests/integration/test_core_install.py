"""`pip install gpufleet` without extras: the core commands work, the others name their extra.

Runs the commands of ``.venv-core``, a venv that holds the core only, built
from this tree by ``scripts/core-venv.sh`` (``make test`` does that first).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.core.extras import EXTRA_OF_MODULE
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / ".venv-core"
PYTHON = CORE / "bin" / "python"
GPUFLEET = CORE / "bin" / "gpufleet"


@pytest.fixture(scope="module", autouse=True)
def _core_venv() -> None:
    if not GPUFLEET.exists():
        pytest.fail(f"{CORE} is missing: run `make test`, or scripts/core-venv.sh first")


def gpufleet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"EXPORTER_TYPE", "MACHINE_ID", "KUBECONFIG", "PYTHONPATH"}
    }
    env.update({"CLUSTER_NAME": "core", "NODE_NAME": "node-1", "LOG_FORMAT": "text"})
    return subprocess.run(
        [str(GPUFLEET), *args], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("module", sorted(EXTRA_OF_MODULE))
def test_the_core_venv_holds_no_module_of_an_extra(module: str) -> None:
    found = subprocess.run(
        [str(PYTHON), "-c", f"import importlib.util as u; print(u.find_spec({module!r}))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert found.stdout.strip() == "None"


def test_every_extra_of_pyproject_is_named_for_its_modules() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    runtime = {name for name in extras if name not in {"all", "dev", "bench"}}
    assert set(EXTRA_OF_MODULE.values()) == runtime


@pytest.mark.parametrize(
    "group", [[], ["gpu"], ["inventory"], ["device-api"], ["gpus"], ["cache"], ["exporter"]]
)
def test_help_works_without_extras(group: list[str]) -> None:
    result = gpufleet(*group, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_gpu_list_and_smi_work_without_extras() -> None:
    listed = gpufleet("gpu", "list", "--simulate", "dgx-h100", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["devices"]) == 8
    smi = gpufleet("gpu", "smi", "--simulate", "l4")
    assert smi.returncode == 0, smi.stderr
    assert "<nvidia_smi_log>" in smi.stdout


def test_scan_to_stdout_and_sqlite_and_history_work_without_extras(tmp_path: Path) -> None:
    db = tmp_path / "inventory.db"
    scan = gpufleet(
        "inventory", "scan", "--simulate", "l4", "--machine-id", "i-1",
        "-e", "stdout,sqlite", "--db", str(db),
    )  # fmt: skip
    assert scan.returncode == 0, scan.stderr
    assert json.loads(scan.stdout.splitlines()[0])["machine"] == "i-1"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)
    history = gpufleet("inventory", "history", "--db", str(db), "--machine", "i-1", "--json")
    assert history.returncode == 0, history.stderr
    assert "i-1" in history.stdout


def test_cache_check_of_a_local_directory_works_without_extras(tmp_path: Path) -> None:
    result = gpufleet("cache", "check", str(tmp_path), "--simulate", "l4")
    # An empty directory is no cache: the command's own error, not a missing extra.
    assert "is not a Triton" in result.stderr
    assert "gpufleet[" not in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    directory = Path(os.path.realpath("/tmp")) / f"gf-core-{os.getpid()}-{time.monotonic_ns()}"
    directory.mkdir()
    sock = directory / "api.sock"
    server = subprocess.Popen(
        [str(GPUFLEET), "device-api", "serve", "--socket", str(sock),
         "--state-file", str(tmp_path / "state"), "--metrics-port", str(_free_port())],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def listening() -> bool:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            return sock.exists()

        wait_until(listening, 30, "the device API socket appearing")
        yield sock, server
    finally:
        server.terminate()
        server.wait(timeout=30)
        sock.unlink(missing_ok=True)
        directory.rmdir()


def test_the_device_api_and_its_client_work_without_extras(
    served: tuple[Path, subprocess.Popen[str]],
) -> None:
    sock, _ = served
    listed = gpufleet("gpus", "list", "--socket", str(sock), "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["items"] == []  # served, and empty: no provider yet


def test_the_gpu_exporter_works_without_extras_outside_kubernetes() -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"KUBERNETES_SERVICE_HOST"}}
    env.update({"GPU_EXPORTER_K8S": "off", "NODE_NAME": "node-1"})
    exporter = subprocess.Popen(
        [str(GPUFLEET), "exporter", "--simulate", "l4", "--port", str(port),
         "--bind-address", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        bodies: list[str] = []

        def served_metrics() -> bool:
            assert exporter.poll() is None, exporter.stderr.read() if exporter.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    bodies.append(r.read().decode())
            except OSError:
                return False
            return True

        wait_until(served_metrics, 30, "the exporter serving /metrics")
        up = [
            sample
            for family in text_string_to_metric_families(bodies[-1])
            for sample in family.samples
            if sample.name == "gpufleet_exporter_gpu_up"
        ]
        assert [(s.labels["devicename"], s.value) for s in up] == [("NVIDIA L4", 1.0)]
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)


NEEDS_AN_EXTRA = [
    (["inventory", "scan", "--simulate", "l4", "-e", "postgres"], "postgres"),
    (["inventory", "scan", "--simulate", "l4", "-e", "stdout,s3"], "s3"),
    (["inventory", "history", "--from", "postgres", "--moved"], "postgres"),
    (["inventory", "controller"], "k8s"),
    (["inventory", "check", "--command", "true"], "k8s"),
    (["inventory", "agent", "--simulate", "l4", "-e", "stdout"], "k8s"),
    (["cache", "inspect", "127.0.0.1:9/cache:1"], "kcache"),
    (["cache", "extract", "127.0.0.1:9/cache:1", "--store", "store"], "kcache"),
    (["cache", "build", ".", "--tag", "127.0.0.1:9/cache:1"], "kcache"),
    (["cache", "sign", "127.0.0.1:9/cache:1", "--key", "cosign.key"], "kcache"),
    (["cache", "verify", "127.0.0.1:9/cache:1", "--key", "cosign.pub"], "kcache"),
]


@pytest.mark.parametrize(
    ("args", "extra"), NEEDS_AN_EXTRA, ids=[" ".join(a[:2]) + f"-{e}" for a, e in NEEDS_AN_EXTRA]
)
def test_a_command_that_needs_an_extra_names_it_in_one_line(
    args: list[str], extra: str, tmp_path: Path
) -> None:
    result = gpufleet(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gpufleet: configuration error:"), result.stderr
    assert f"pip install 'gpufleet[{extra}]'" in last
    assert result.stdout == ""
