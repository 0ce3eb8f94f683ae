"""Two ``device-api serve`` processes on one state file: the second is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.deviceapi_harness import short_tmp

pytestmark = pytest.mark.integration

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))


def _serve(directory: Path, name: str, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [GPUFLEET, "device-api", "serve", "--socket", str(directory / f"{name}.sock"),
         "--state-file", str(state), "--metrics-port", "0"],
        env=dict(os.environ, LOG_LEVEL="warning"), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_serving(directory: Path, name: str, process: subprocess.Popen[str]) -> None:
    for _ in range(1000):  # a hang guard, not a timing
        if (directory / f"{name}.sock").exists():
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.02)
    pytest.fail("server did not start")


def test_a_second_server_on_one_state_file_is_refused_and_a_kill_frees_it() -> None:
    with short_tmp() as directory:
        state = directory / "state.db"
        first = _serve(directory, "a", state)
        try:
            _wait_serving(directory, "a", first)
            second = _serve(directory, "b", state)
            _, err = second.communicate(timeout=60)
            assert second.returncode == 1
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert "in use by another gpufleet process" in lines[0]
            assert str(state) in lines[0]
            assert not (directory / "b.sock").exists()
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
            third = _serve(directory, "c", state)
            try:
                _wait_serving(directory, "c", third)
            finally:
                third.send_signal(signal.SIGTERM)
                assert third.wait(timeout=30) == 0
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
