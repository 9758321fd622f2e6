"""GPU checks (run on a CUDA machine: pytest -m gpu). Skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import write_config
from mpc_lm import report
from mpc_lm.launch import launch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_all_parties_on_one_gpu_match_plaintext(tmp_path, tiny_models):
    cfg = write_config(tmp_path, tiny_models["bert"])
    data = yaml.safe_load(cfg.read_text())
    for party in data["parties"]:
        party["device"] = "cuda:0"
    cfg.write_text(yaml.safe_dump(data))
    summary = report.build(launch(cfg), check=True)
    fid = summary["fidelity"]["hospital"]
    assert fid["max_abs_logit_error"] < 0.05 and fid["top1_agreement"] == 1.0
