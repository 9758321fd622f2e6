#!/usr/bin/env bash
# The test suite: installs into ./.venv first if needed (same step as install.sh), then pytest.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if ! "$VENV/bin/python" -c "from mpc_lm._compat import import_crypten; import_crypten(); import pytest, jsonschema, hypothesis" 2>/dev/null; then
  bash install.sh --no-run
fi
exec "$VENV/bin/python" -m pytest -q "$@"
