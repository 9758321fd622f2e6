#!/usr/bin/env bash
# Standard benchmark 3: GPT-2-small-sized random model, cost only. Skips (exit 0, with the reason)
# until GPT-2 under MPC (mpc_lm/models/gpt2.py) is wired into the benchmark.
#   bash benchmarks/run_gpt2_small_cost.sh [cpu|cuda] [extra mpc-lm bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}; shift || true
PY=${PYTHON:-python}
OUT=benchmarks/results/gpt2-small-random-cost-$DEVICE
PYTHONPATH=. "$PY" -m mpc_lm.cli bench --model gpt2-small-random --task rotten-tomatoes --device "$DEVICE" \
  --json "$OUT.json" --work-dir "${WORK_DIR:-runs/bench-gpt2-$DEVICE}" --no-progress "$@" 2>&1 | tee "$OUT.log"
