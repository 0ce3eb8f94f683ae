"""``gpufleet exporter`` as a subprocess: flags, errors, HTTP and HTTPS, SIGTERM."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.doubles.certificates import self_signed
from tests.polling import wait_until

pytestmark = pytest.mark.integration

GPUFLEET = [sys.executable, "-m", "gpufleet.cli"]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_EXPORTER_")}
    clean.pop("KUBERNETES_SERVICE_HOST", None)
    (tmp_path / "proc" / "self").mkdir(parents=True, exist_ok=True)
    clean.update({"NODE_NAME": "node-1", "GPU_EXPORTER_HOST_PROC": str(tmp_path / "proc")})
    return clean


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GPUFLEET, "exporter", *args], capture_output=True, text=True, env=env(tmp_path),
        timeout=60, check=False,
    )  # fmt: skip


def fetch(url: str, context: ssl.SSLContext | None = None) -> str:
    """The body at `url`, once the exporter listens (it is still starting at first)."""
    bodies: list[str] = []

    def answered() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:
                bodies.append(response.read().decode())
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    wait_until(answered, 20, f"an answer from {url}")
    return bodies[-1]


def fetch_collected(url: str, proc: subprocess.Popen[str] | None = None) -> str:
    """The metrics at `url` once the first collection has put GPU series there.

    With `proc`, the exporter exiting first fails the test with its stderr.
    """
    texts = [fetch(url)]

    def collected() -> bool:
        if "gpu_utilization{" in texts[-1]:
            return True
        if proc is not None:
            assert proc.poll() is None, proc.communicate()[1]
        texts[-1] = fetch(url)
        return "gpu_utilization{" in texts[-1]

    wait_until(collected, 60, f"GPU series at {url}")
    return texts[-1]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(tmp_path: Path, procs: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*GPUFLEET, "exporter", *args], env=env(tmp_path), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    procs.append(proc)
    return proc


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--simulate", "l4", "--interval", "0.1", "--disable-k8s"], "GPU_EXPORTER_INTERVAL"),
        (
            ["--simulate", "l4", "--process-labels", "pid,uid", "--disable-k8s"],
            "GPU_EXPORTER_PROCESS_LABELS",
        ),
        (
            ["--simulate", "l4", "--pod-label-allowlist", "(", "--disable-k8s"],
            "GPU_EXPORTER_POD_LABEL_ALLOWLIST",
        ),
        (
            ["--simulate", "l4", "--tls-cert-file", "/nonexistent", "--disable-k8s"],
            "GPU_EXPORTER_TLS_KEY_FILE",
        ),
        (["--simulate", "l4", "--enable-k8s", "--disable-k8s"], "contradict"),
        (["--simulate", "no-such-preset", "--port", "0", "--disable-k8s"], "no-such-preset"),
    ],
)
def test_bad_settings_stop_start_up_with_one_line_naming_the_problem(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = (
        run(tmp_path, "--disable-k8s", *args)
        if "--enable-k8s" not in args
        else run(tmp_path, *args)
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serves_parseable_metrics_over_http_and_stops_on_sigterm(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    proc = start(tmp_path, started, "--simulate", "dgx-h100", "--disable-k8s", "--bind-address",
                 "127.0.0.1", "--port", str(port), "--interval", "0.25")  # fmt: skip
    text = fetch_collected(f"http://127.0.0.1:{port}/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(families["gpu_utilization"].samples) == 8
    assert families["gpufleet_exporter_collect_duration_seconds"].type == "histogram"
    assert fetch(f"http://127.0.0.1:{port}/readyz").startswith("{")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_tls_flags_serve_https_only(tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    cert, key = self_signed("localhost", hosts=["localhost"]).write(
        tmp_path / "tls.crt", tmp_path / "tls.key"
    )
    port = free_port()
    start(tmp_path, started, "--simulate", "l4", "--disable-k8s", "--bind-address",
          "127.0.0.1", "--port", str(port), "--tls-cert-file", str(cert),
          "--tls-key-file", str(key))  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert))
    text = fetch(f"https://localhost:{port}/healthz", context)
    assert text == "ok"
    with (
        pytest.raises((urllib.error.URLError, ConnectionError)),
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5),
    ):
        pass


def test_help_names_every_environment_variable_it_documents(tmp_path: Path) -> None:
    # Help texts carry `[env NAME; default]`; rich markup would swallow them.
    result = run(tmp_path, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for variable in ("GPU_EXPORTER_BIND_ADDRESS", "GPU_EXPORTER_INTERVAL", "NODE_NAME"):
        assert f"[env {variable}" in text


def readme_try_it() -> tuple[list[str], str]:
    """The README's exporter example: the command's argv and the curl line after it."""
    section = (REPO / "README.md").read_text().split("\n## GPU exporter\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None
    command, curl = block.group(1).strip().splitlines()
    assert command.endswith("# try it")
    return shlex.split(command, comments=True), curl


def test_the_readmes_try_it_example_serves_gpu_and_process_series(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    argv, curl = readme_try_it()
    assert argv[:2] == ["gpufleet", "exporter"]
    documented = argv[argv.index("--port") + 1]
    match = re.fullmatch(r"curl -s localhost:(\d+)(/metrics) \| grep '(.+)'", curl)
    assert match is not None
    assert match.group(1) == documented
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    # The example's paths are relative to a clone's root, where a reader runs it.
    proc = subprocess.Popen(
        [*GPUFLEET, *argv[1:]], env=env(tmp_path), cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    started.append(proc)
    url = f"http://127.0.0.1:{port}{match.group(2)}"
    text = fetch_collected(url, proc)
    assert [line for line in text.splitlines() if re.search(match.group(3), line)]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    gpu_labels = {"hostname", "index", "devicename", "uuid", "pod", "namespace", "container"}
    process_labels = gpu_labels - {"pod", "namespace", "container"} | {
        "pid", "username", "pod_name", "pod_namespace", "container_name",
    }  # fmt: skip
    for name in ("gpu_utilization", "gpu_memory_used", "gpu_temperature"):
        assert {frozenset(s.labels) for s in families[name].samples} == {frozenset(gpu_labels)}
    for name in ("process_gpu_memory", "process_gpu_sm_utilization"):
        samples = families[name].samples
        assert {frozenset(s.labels) for s in samples} == {frozenset(process_labels)}
        assert sorted((s.labels["index"], s.labels["pid"]) for s in samples) == [
            ("0", "4242"), ("0", "4317"), ("3", "5120"),
        ]  # fmt: skip


def test_a_source_flag_overrides_the_simulate_variable(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*GPUFLEET, "exporter", "--fleet", str(REPO / "tests/data/fleets/two_l4.yaml"),
         "--disable-k8s", "--bind-address", "127.0.0.1", "--port", str(port)],
        env={**env(tmp_path), "GPU_EXPORTER_SIMULATE": "dgx-h100"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    started.append(proc)
    text = fetch_collected(f"http://127.0.0.1:{port}/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["devicename"] for s in families["gpu_utilization"].samples} == {"NVIDIA L4"}


def test_two_gpu_sources_are_refused_with_one_line(tmp_path: Path) -> None:
    result = run(tmp_path, "--simulate", "l4", "--fleet", "fleet.yaml", "--disable-k8s")
    assert result.returncode != 0
    assert "choose exactly one GPU source" in result.stderr
    assert "--simulate, --fleet" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_certificate_without_its_key_is_one_line_naming_both_variables(tmp_path: Path) -> None:
    # The model-level check used to print `invalid ExporterSettings={...}`: the
    # whole input, every other variable's value included.
    result = subprocess.run(
        [*GPUFLEET, "exporter", "--simulate", "l4"], capture_output=True, text=True, timeout=60,
        env={**env(tmp_path), "GPU_EXPORTER_TLS_CERT_FILE": str(tmp_path / "cert.pem")},
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "GPU_EXPORTER_TLS_CERT_FILE" in lines[0]
    assert "GPU_EXPORTER_TLS_KEY_FILE" in lines[0]
    assert "{" not in lines[0]
    assert "ExporterSettings" not in lines[0]
    assert str(tmp_path) not in lines[0]
