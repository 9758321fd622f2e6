#!/usr/bin/env bash
# Standard benchmark 2: BERT-base-sized random model, cost only (accuracy is meaningless).
# Writes benchmarks/results/bert-base-random-cost-<device>.{json,png,log}.
#   bash benchmarks/run_bert_base_cost.sh [cpu|cuda] [extra mpc-lm bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}; shift || true
PY=${PYTHON:-python}
OUT=benchmarks/results/bert-base-random-cost-$DEVICE
PYTHONPATH=. "$PY" -m mpc_lm.cli bench --model bert-base-random --task rotten-tomatoes --device "$DEVICE" \
  --json "$OUT.json" --plot "$OUT.png" --work-dir "${WORK_DIR:-runs/bench-bert-base-$DEVICE}" --no-progress "$@" \
  2>&1 | tee "$OUT.log"
