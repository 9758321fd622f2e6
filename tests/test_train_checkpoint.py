"""Checkpoint format, choice of the resume step, refusal of sets that do not belong together,
plus the optimizer's public-factor product and the config schema of job.kind train."""

from __future__ import annotations

import json

import pytest
import torch

from mpc_lm import checkpoint, optim, train
from mpc_lm._compat import import_crypten
from mpc_lm.config import ConfigError, Training, parse_config

crypten = import_crypten()


@pytest.fixture(scope="module", autouse=True)
def _crypten():
    crypten.init()
    yield


def cfg_dict(**train):
    return {"name": "t", "parties": [{"name": "vendor", "role": "model_owner"},
                                     {"name": "owner0", "role": "data_owner", "train_data": "a.jsonl"},
                                     {"name": "dealer", "role": "dealer"}],
            "model": {"path": "builtin:demo-minilm-sentiment", "task": "embedding"},
            "job": {"kind": "train", "train": train}}


def test_save_load_roundtrip_is_exact(tmp_path):
    w = crypten.cryptensor(torch.randn(3, 4))
    buf = crypten.cryptensor(torch.randn(12))
    checkpoint.save(tmp_path, "vendor", 0, 5, "rid", {"w": w}, {"buf": buf}, 5)
    [info] = checkpoint.list_complete(tmp_path, "vendor")
    assert info["step"] == 5 and info["run_id"] == "rid" and info["opt_t"] == 5
    params, opt, meta = checkpoint.load(tmp_path, "vendor", 5, ["w"], ["buf"], "cpu")
    assert torch.equal(params["w"]._tensor.share, w._tensor.share)  # the very same shares
    assert torch.equal(opt["buf"]._tensor.share, buf._tensor.share)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    w = {"w": crypten.cryptensor(torch.ones(2))}
    checkpoint.save(tmp_path, "vendor", 0, 1, "rid", w, {}, 1)
    checkpoint.save(tmp_path, "vendor", 0, 2, "rid", w, {}, 2)
    (tmp_path / "vendor" / "step-00000002" / "meta.json").unlink()  # killed while writing
    assert [i["step"] for i in checkpoint.list_complete(tmp_path, "vendor")] == [1]


def _info(step, rid="rid", party="vendor"):
    return {"step": step, "run_id": rid, "party": party, "format": checkpoint.FORMAT, "dir": f"d/{party}/{step}"}


def test_choose_latest_common_step():
    listings = {"vendor": [_info(1), _info(2), _info(3)], "owner0": [_info(1, party="owner0"), _info(2, party="owner0")]}
    assert checkpoint.choose(listings, "rid", "d") == 2
    assert checkpoint.choose({"vendor": [], "owner0": []}, "rid", "d") is None


def test_refuse_other_run():
    listings = {"vendor": [_info(2)], "owner0": [_info(2, rid="other", party="owner0")]}
    with pytest.raises(checkpoint.CheckpointError, match="belongs to run 'other'.*owner0|owner0.*belongs to run 'other'"):
        checkpoint.choose(listings, "rid", "d")


def test_refuse_sets_without_common_step():
    listings = {"vendor": [_info(4)], "owner0": [_info(2, party="owner0")]}
    with pytest.raises(checkpoint.CheckpointError, match="do not belong together.*'vendor' has steps \\[4\\]"):
        checkpoint.choose(listings, "rid", "d")
    with pytest.raises(checkpoint.CheckpointError, match="'owner0' has steps none"):
        checkpoint.choose({"vendor": [_info(4)], "owner0": []}, "rid", "d")


def test_run_id_ignores_cadence_but_not_hyperparameters():
    base = checkpoint.run_id(parse_config(cfg_dict(lr=0.1)))
    assert checkpoint.run_id(parse_config(cfg_dict(lr=0.1, checkpoint_every=3, resume=False))) == base
    assert checkpoint.run_id(parse_config(cfg_dict(lr=0.2))) != base


def test_config_requires_training_data_and_known_metric_parties():
    bad = cfg_dict()
    bad["parties"][1].pop("train_data")
    bad["parties"][1]["input"] = "x.txt"
    with pytest.raises(ConfigError, match="train_data"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="unknown parties"):
        parse_config(cfg_dict(reveal_metrics_to=["nobody"]))
    with pytest.raises(ConfigError, match="train_data"):
        parse_config({**cfg_dict(), "parties": [{"name": "v", "role": "model_owner", "train_data": "a"},
                                                 {"name": "o", "role": "data_owner", "train_data": "a"}],
                      "security": {"provider": "tfp", "insecure_development_mode": True}})


def test_mul_public_keeps_small_factors():
    x = torch.randn(1000)
    s = crypten.cryptensor(x)
    for f in (1e-6, 3e-4, 0.9, 1.0, 7.5):
        got = train.reveal_exact(optim.mul_public(s, f))
        assert (got - x * f).abs().max() <= abs(f) * 2e-5 + 2e-5
    lr = 1e-4  # CrypTen's own product rounds this to 7 / 2^16 (7 % off)
    x = torch.rand(1000) * 1000
    s = crypten.cryptensor(x)
    assert abs(train.reveal_exact(s * lr).sum() / (x.sum() * lr) - 1) > 0.01
    assert abs(train.reveal_exact(optim.mul_public(s, lr)).sum() / (x.sum() * lr) - 1) < 1e-3


def test_schedule_and_lr():
    cfg = Training(epochs=2, grad_accumulation=2, schedule="linear", warmup_steps=2, lr=1.0)
    steps = train.schedule(cfg, 3, 10)
    assert len(steps) == 4 and [len(m) for m in steps[0]] == [3, 3] and [len(m) for m in steps[1]] == [3, 1]
    assert sorted(i for s in steps[:2] for m in s for i in m) == list(range(10))
    assert [optim.lr_at(cfg, s, 4) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
    json.dumps(steps)
