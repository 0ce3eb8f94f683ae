"""Tables on a terminal: at 80 and 100 columns every identifying value stays whole.

The commands run under a real pseudo-terminal of that width, as a person runs
them, and every serial, UUID, PCI bus id, node, machine and timestamp from
their ``--json`` output must appear unbroken on one line of the table.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

import pytest

from gpufleet.gpu import sim
from tests.integration.deviceapi_harness import start_provider, start_server

GPUFLEET = [sys.executable, "-m", "gpufleet.cli"]
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"EXPORTER_TYPE", "MACHINE_ID"}}
    return {**env, "CLUSTER_NAME": "test-cluster", "NODE_NAME": "node-1", **extra}


def gpufleet(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [*GPUFLEET, *args], capture_output=True, text=True, env=env or environment(),
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def on_a_terminal(columns: int, *args: str) -> list[str]:
    """What `gpufleet ARGS` shows on a terminal `columns` wide, escape codes removed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(
        [*GPUFLEET, *args], stdin=follower, stdout=follower, stderr=subprocess.DEVNULL,
        env=environment(COLUMNS=str(columns)),
    )  # fmt: skip
    os.close(follower)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 60)  # a hang guard
            assert ready, "the command wrote nothing for 60 s"
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        assert proc.wait(timeout=60) == 0
    text = _ESCAPE.sub("", b"".join(chunks).decode())
    lines = text.replace("\r\n", "\n").splitlines()
    assert all(len(line) <= columns for line in lines)
    return lines


def broken(values: set[str], lines: list[str]) -> list[str]:
    return sorted(v for v in values if not any(v in line for line in lines))


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize("preset", ["dgx-h100", "gb200", "mig-a100"])
def test_gpu_list_keeps_serials_uuids_and_pci_ids_whole(preset: str, columns: int) -> None:
    devices = json.loads(gpufleet("gpu", "list", "--simulate", preset, "--json"))["devices"]
    values = {d[key] for d in devices for key in ("serial", "uuid", "pci_bus_id")}
    assert len(values) >= 3 * len(devices) - 2  # gb200's boards share serials
    assert broken(values, on_a_terminal(columns, "gpu", "list", "--simulate", preset)) == []


@pytest.mark.parametrize("columns", [80, 100])
def test_inventory_history_keeps_every_identifying_field_whole(
    tmp_path: Path, columns: int
) -> None:
    db = str(tmp_path / "inv.db")
    for seed, machine in (
        ("1", "i-0123456789abcdef0"),
        ("1", "4c4c4544-0047-3510-8052-b4c04f4e4d32"),
    ):
        env = environment(NODE_NAME=f"gke-prod-gpu-pool-a100-{machine[-4:]}")
        gpufleet("inventory", "scan", "--simulate", "dgx-a100", "--seed", seed, "-e", "sqlite",
                 "--db", db, "--machine-id", machine, env=env)  # fmt: skip
    placements = json.loads(gpufleet("inventory", "history", "--db", db, "--moved", "--json"))
    assert len(placements) == 16
    keys = ("gpu", "uuid", "machine", "node", "first_seen", "last_seen")
    values = {p[key] for p in placements for key in keys}
    lines = on_a_terminal(columns, "inventory", "history", "--db", db, "--moved")
    assert broken(values, lines) == []


def test_a_lost_gpus_message_is_shown_however_narrow_the_terminal() -> None:
    fleet = str(Path(__file__).resolve().parents[1] / "data" / "fleets" / "h100_overrides.yaml")
    lines = on_a_terminal(80, "gpu", "list", "--fleet", fleet)
    assert "left out to fit 80 columns: product, cc, memory, mig" in [s.strip() for s in lines]
    assert "GPU 3: lost: nvmlDeviceGetMigMode: GPU is lost" in lines


@pytest.mark.parametrize("columns", [80, 100])
async def test_gpus_list_keeps_names_uuids_and_nodes_whole(columns: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="gf-tables-", dir="/tmp"))
    sock = directory / "device.sock"
    server = await start_server(sock)
    provider = await start_provider(sock, sim.open("gb200"))
    try:
        target = ("--socket", str(sock))
        listed = json.loads(await asyncio.to_thread(gpufleet, "gpus", "list", *target, "--json"))
        items = listed["items"]
        assert len(items) == 4
        values = {item["metadata"]["name"] for item in items}
        values |= {item["spec"][key] for item in items for key in ("uuid", "node")}
        lines = await asyncio.to_thread(on_a_terminal, columns, "gpus", "list", *target)
        assert broken(values, lines) == []
        name = items[0]["metadata"]["name"]
        shown = await asyncio.to_thread(on_a_terminal, columns, "gpus", "get", name, *target)
        assert broken({name, items[0]["spec"]["uuid"]}, shown) == []
    finally:
        await provider.close()
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)
