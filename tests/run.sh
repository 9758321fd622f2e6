#!/usr/bin/env bash
# The test suite: installs into ./.venv first if needed (same step as install.sh), then pytest.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if ! "$VENV/bin/python" -c "import mpc_lm, crypten, pytest" 2>/dev/null; then
  bash install.sh --no-run
fi
exec "$VENV/bin/python" -m pytest -q "$@"
