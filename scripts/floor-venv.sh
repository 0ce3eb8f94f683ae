#!/usr/bin/env bash
# Build a venv with every dependency at the lowest version pyproject.toml
# declares (scripts/floor-requirements.py), plus the test runner, so that
# `make test` can show the floors are true: the unit tests and the
# integration tests of the extras' client libraries run in it.
# It is rebuilt when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-floor}
stamp=$venv/.installed-floor
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
rm -rf "$venv"
PYTHON=${PYTHON:-python3} scripts/bootstrap-venv.sh "$venv"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" scripts/floor-requirements.py >"$constraints"
# The test tools are not floored: they are not what users install.
"$venv/bin/pip" install --quiet -c "$constraints" -e '.[all]' pytest pytest-asyncio kmock openapi-schema-validator
"$venv/bin/pip" check
echo "$want" >"$stamp"
