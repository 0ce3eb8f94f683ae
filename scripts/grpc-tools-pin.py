"""Print the grpcio-tools version pinned in pyproject.toml's dev extra.

The pin is the one place that says which generator wrote the committed gRPC
code; scripts/gen-proto.sh and tests/unit/test_deviceapi_generated.py read it
through this script.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pinned_grpc_tools(pyproject: Path = PYPROJECT) -> str:
    """The exact version of ``grpcio-tools==X`` in the dev extra; exits if it is no exact pin."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for requirement in extras["dev"]:
        match = re.fullmatch(r"grpcio-tools\s*==\s*([0-9][0-9A-Za-z.]*)", requirement.strip())
        if match:
            return match.group(1)
    sys.exit(f"{pyproject}: the dev extra must pin grpcio-tools==X.Y.Z exactly")


if __name__ == "__main__":
    print(pinned_grpc_tools())
