"""Every long-running command whose listening address is taken fails with one line, exit 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from gpufleet.cli import app

LISTEN_OPTIONS = {"--port", "--metrics-port", "--server-port", "--bind-address", "--listen"}

# command -> arguments that reach its bind; {port} is a port held by the test.
CASES: dict[str, list[str]] = {
    "exporter": ["--simulate", "dgx-h100", "--disable-k8s", "--bind-address", "127.0.0.1",
                 "--port", "{port}"],
    "device-api serve": ["--socket", "{sock}", "--metrics-port", "{port}"],
    "device-api provider": ["--simulate", "dgx-h100", "--socket", "{sock}",
                            "--metrics-port", "{port}", "--node-name", "n1"],
    "inventory agent": ["--simulate", "l4", "--node", "n1", "--cluster", "c",
                        "--server-port", "{port}"],
    "inventory controller": ["--cluster", "c", "--server-port", "{port}"],
    "inventory check": ["--cluster", "c", "--command", "true", "--server-port", "{port}"],
    "cache operator": ["--server-port", "{port}"],
    "cache node": ["--simulate", "dgx-h100", "--node-name", "n1", "--csi-endpoint",
                   "unix://{sock}", "--kubelet-dir", "{tmp}", "--store", "{tmp}/store",
                   "--metrics-port", "{port}"],
}  # fmt: skip


def _listening_commands() -> set[str]:
    found: set[str] = set()

    def walk(command: object, path: list[str]) -> None:
        sub = getattr(command, "commands", None)
        if sub is not None:
            for name, child in sub.items():
                walk(child, [*path, name])
            return
        options = {opt for param in getattr(command, "params", []) for opt in param.opts}
        if options & LISTEN_OPTIONS:
            found.add(" ".join(path))

    walk(typer.main.get_command(app), [])
    return found


def test_the_cases_cover_every_command_that_listens() -> None:
    assert set(CASES) == _listening_commands()


@pytest.fixture
def taken_port() -> Iterator[int]:
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


@pytest.mark.parametrize("command", sorted(CASES))
def test_a_taken_port_is_one_line_naming_the_address_and_exit_2(
    command: str, taken_port: int, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    # connect() reads the file only; nothing listens there, and the bind comes first.
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters: [{name: d, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: d, user: {token: t}}]\n"
        "contexts: [{name: d, context: {cluster: d, user: d}}]\ncurrent-context: d\n"
    )
    sock = Path("/tmp") / f"gf-listen-{os.getpid()}-{taken_port}.sock"
    args = [a.format(port=taken_port, sock=sock, tmp=tmp_path) for a in CASES[command]]
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), LOG_LEVEL="error")
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", *command.split(), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert f":{taken_port}" in lines[0]
    assert "address already in use" in lines[0]


def test_a_socket_path_whose_directory_cannot_exist_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "device-api", "serve",
         "--socket", str(blocker / "device.sock"), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DEVICE_API_SOCKET" in lines[0]
