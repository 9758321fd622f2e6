#!/usr/bin/env bash
# The GPU measurements the docs list as pending, in one run on a CUDA machine
# (all parties on one GPU, gloo over loopback). Results land in benchmarks/results/*-cuda*.
#   bash benchmarks/run_gpu_pending.sh            # PYTHON=python3 by default
# Each step is independent: a failing step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHON="$PY"  # the scripts it calls run "$PYTHON" too
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
R=benchmarks/results
step() { echo "=== $*"; "$@" || echo "=== FAILED ($?): $*"; }

step "$PY" -m pytest -q -m gpu tests/test_gpu.py
# fidelity + cost of the demo model and the three families (docs/accuracy.md)
step "$PY" benchmarks/encoder_fidelity.py --device cuda --json "$R/encoder_fidelity_cuda.json"
# BERT-base shapes, one text at 128 tokens: mpc_lm vs stock CrypTen (docs/design.md, docs/bench.md)
step bash benchmarks/run_bert_base_cost.sh cuda --seq-len 128 --mpc-limit 1 --modes mpc crypten-naive
# the same with preprocessing.draws_ahead (docs/performance.md, lever 23: the AES draws out of the online phase)
cat > /tmp/draws-ahead-cuda.yaml <<'YAML'
name: draws-ahead
parties:
  - {name: model_owner, role: model_owner, device: cuda}
  - {name: data_owner, role: data_owner, device: cuda}
  - {name: dealer, role: dealer}
rendezvous: {host: 127.0.0.1, port: 29877}
preprocessing: {draws_ahead: true}
YAML
step "$PY" -m mpc_lm.cli bench --model bert-base-random --task rotten-tomatoes --device cuda --seq-len 128 \
  --mpc-limit 1 --train-limit 16 --eval-limit 8 --modes mpc --mpc-config /tmp/draws-ahead-cuda.yaml \
  --json "$R/bert-base-random-cost-cuda-seq128-draws-ahead.json" --no-progress
# GPT-2 small shapes: one generated token after a 64-token prompt (docs/causal-lm.md)
# (full_step: choose a token and run its forward pass; the last of the 3 steps only chooses)
"$PY" -m mpc_lm.bench_causal --device cuda --prompt 64 --new 3 > "$R/gpt2-small-step-cuda.json" \
  || echo "=== FAILED: bench_causal"
# one training step, last BERT-base layer + head, batch 8 x 128 (docs/performance.md, lever 14)
step "$PY" -m mpc_lm.bench_train --device cuda --steps 3 --json "$R/train-step-bert-base-cuda.json"
# MiniLM on Rotten Tomatoes, all four modes (docs/bench.md)
step bash benchmarks/run_minilm_rotten_tomatoes.sh cuda
