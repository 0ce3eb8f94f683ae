#!/usr/bin/env bash
# Build a venv that holds gpufleet's core only (`pip install .`, no extras),
# as a user who runs `pip install gpufleet` gets it. The dependencies are
# installed once; gpufleet itself is reinstalled from the working tree on
# every call, so the venv never tests stale code.
# tests/integration/test_core_install.py runs its commands.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-core}
PYTHON=${PYTHON:-python3} scripts/bootstrap-venv.sh "$venv"
"$venv/bin/pip" install --quiet .
"$venv/bin/pip" install --quiet --force-reinstall --no-deps .
"$venv/bin/pip" check
