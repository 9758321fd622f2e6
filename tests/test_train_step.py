"""One encrypted training step (last encoder layer + head) against torch autograd, held to a cost budget.

``python -m mpc_lm.bench_train`` at a small shape: model owner, data owner and dealer as three
processes over loopback. The step's gradients (first step) must match torch autograd with exact
GELU, softmax and LayerNorm on the same weights and inputs; rounds and bytes are deterministic
(public shapes) and must stay within ``budgets.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpc_lm import bench_train

from _train_helpers import next_port

BUDGET = json.loads((Path(__file__).parent / "budgets.json").read_text())


@pytest.mark.parametrize("task", ["embedding", "sequence-classification"])
def test_training_step_matches_autograd_within_budget(tmp_path, task):
    out = tmp_path / "step.json"
    assert bench_train.main(["--batch", "2", "--seq", "16", "--hidden", "64", "--heads", "4", "--intermediate",
                             "128", "--steps", "2", "--task", task, "--port", str(next_port()), "--timeout", "300",
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    fid = result["fidelity"]
    # measured 0.0014 (embedding) and 0.0015 (sequence-classification); cosine >= 0.99999
    assert fid["worst_max_rel_error"] < 0.01, fid
    assert fid["worst_cosine"] > 0.9999, fid
    assert abs(fid["loss"] - fid["reference_loss"]) < 0.01, fid
    assert len(fid["per_tensor"]) == (14 if task == "embedding" else 16)
    first, second = result["steps"]
    for key, limit in BUDGET[f"train-step-{task}-2x16-h64"].items():
        assert first[key] == second[key], key  # the same public shapes, the same communication
        assert first[key] <= limit, f"{key}: {first[key]} exceeds the recorded budget {limit}"
    assert second["offline_s"] > 0 and result["preprocessing"] == "offline"
