"""Bench-only plumbing: the docker-registry a kernel cache bench pushes to and pulls from.

``own_registry`` starts a throwaway Debian ``docker-registry`` the way the tests
start theirs (``scripts/servers/registry.sh``), storage in a directory of the
bench's; ``find_test_registry`` finds the test servers' anonymous one instead
(``--registry test``). ``bench_kcache_pull.py`` and ``bench_kcache_startup.py``
both use them.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["answers", "find_test_registry", "own_registry", "read_registry"]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.testservers import STATE, read_facts  # noqa: E402


def answers(registry: str) -> bool:
    """Whether a registry answers ``GET /v2/`` with 200 on plain HTTP."""
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/", timeout=2) as response:
            return int(response.status) == 200
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def own_registry(state: Path) -> Iterator[str]:
    """A throwaway docker-registry, started as the tests start theirs, storage under `state`.

    `scripts/servers/registry.sh` (which installs Debian's docker-registry if
    need be) runs its registries with their state in `state`; the anonymous one
    is measured.
    """
    script = ROOT / "scripts" / "servers" / "registry.sh"
    env = state / "env"
    env.touch()
    subprocess.run(
        ["bash", str(script), "start", str(state)], check=True, stdout=subprocess.DEVNULL
    )
    try:
        registry = read_registry(env)
        if registry is None:
            sys.exit(f"kcache bench: {script} started no registry (see {state})")
        yield registry
    finally:
        subprocess.run(["bash", str(script), "stop", str(state)], check=False)


def read_registry(env: Path) -> str | None:
    """The anonymous registry named in a test-servers env file, if it answers."""
    registry = read_facts(env).get("GPUFLEET_TEST_REGISTRY")
    return registry if registry is not None and answers(registry) else None


def find_test_registry() -> str | None:
    """The test servers' anonymous registry, if `.testservers/env` names one that answers."""
    return read_registry(STATE / "env")
