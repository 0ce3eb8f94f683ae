"""The facts ``scripts/test-servers.sh`` publishes, read the one way tests and benchmarks share.

Each server script appends ``GPUFLEET_TEST_<NAME>=value`` lines to
``.testservers/env`` (see ``tests/integration/test_server_facts.py`` for why
the prefix). A benchmark that starts a throwaway server with the same script
reads that server's own env file the same way.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["STATE", "read_facts"]

STATE = Path(__file__).resolve().parent.parent / ".testservers"
"""Where ``scripts/test-servers.sh`` keeps its state and its ``env`` file."""


def read_facts(env_file: Path = STATE / "env") -> dict[str, str]:
    """``KEY=VALUE`` lines of ``env_file``; empty when no server ever wrote one."""
    if not env_file.is_file():
        return {}
    pairs = (line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}
