#!/usr/bin/env bash
# Standard benchmark 1: real all-MiniLM-L6-v2 on Rotten Tomatoes, all four modes (docs/bench.md).
# Writes benchmarks/results/minilm-rotten-tomatoes-<device>.{json,png,log}.
#   bash benchmarks/run_minilm_rotten_tomatoes.sh [cpu|cuda] [extra mpc-lm bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}; shift || true
PY=${PYTHON:-python}
OUT=benchmarks/results/minilm-rotten-tomatoes-$DEVICE
PYTHONPATH=. "$PY" -m mpc_lm.cli bench --model minilm --task rotten-tomatoes --device "$DEVICE" \
  --json "$OUT.json" --plot "$OUT.png" --work-dir "${WORK_DIR:-runs/bench-minilm-$DEVICE}" --no-progress "$@" \
  2>&1 | tee "$OUT.log"
