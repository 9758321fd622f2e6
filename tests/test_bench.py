"""`mpc-lm bench`: the CI-sized run, its JSON schema, and the DP accounting.

One ``--quick`` run (all four modes, about 1-2 minutes on 2 CPU cores) is shared
by the tests of this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("opacus")


def _bench(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mpc_lm.cli", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    proc = _bench("--quick", "--json", str(tmp / "out.json"), "--plot", str(tmp / "out.png"),
                  "--work-dir", str(tmp / "work"), "--no-progress", cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc, json.loads((tmp / "out.json").read_text())


def test_quick_prints_all_four_modes_and_writes_valid_json(quick):
    from mpc_lm.bench.schema import SCHEMA

    tmp, proc, doc = quick
    jsonschema.validate(doc, SCHEMA)
    assert [r["mode"] for r in doc["modes"]] == ["plaintext", "dp", "mpc", "crypten-naive"]
    for mode in ("plaintext", "dp", "mpc", "crypten-naive"):
        assert mode in proc.stdout
    assert (tmp / "out.png").stat().st_size > 10_000
    rows = {r["mode"]: r for r in doc["modes"]}
    for mode in ("mpc", "crypten-naive"):
        r = rows[mode]
        assert r["mpc_phase"] == "inference" and r["eval_examples"] == doc["benchmark"]["sizes"]["mpc_limit"]
        assert r["bytes_per_party"] == max(p["bytes"] for n, p in r["parties"].items() if "bytes" in p)
        assert r["online_bytes"] > 0 and r["offline_bytes"] > 0 and r["rounds"] > 0
        assert r["wall_s"] < r["lan_s"] < r["wan_s"]
    assert rows["crypten-naive"]["approx"]["mode"] == "crypten" and rows["mpc"]["approx"]["mode"] == "mpc_lm"
    # our protocol reproduces the plaintext model's predictions
    assert rows["mpc"]["agreement"] == 1.0 and rows["mpc"]["max_abs_logit_error"] < 0.05
    assert rows["plaintext"]["epsilon"] is None and rows["dp"]["protects"]["output_model_dp"] is True


def test_dp_epsilon_matches_opacus_accountant(quick):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    _, _, doc = quick
    dp = next(r for r in doc["modes"] if r["mode"] == "dp")
    assert dp["accountant"] == "rdp" and dp["delta"] == pytest.approx(1 / dp["train_examples"])
    accountant = RDPAccountant()
    accountant.history = [(dp["noise_multiplier"], dp["sample_rate"], dp["steps"])]
    assert dp["epsilon"] == pytest.approx(accountant.get_epsilon(dp["delta"]), abs=1e-3)
    # the noise was calibrated to the target epsilon by Opacus for these settings
    sigma = get_noise_multiplier(target_epsilon=dp["target_epsilon"], target_delta=dp["delta"],
                                 sample_rate=dp["sample_rate"], epochs=dp["epochs"], accountant="rdp")
    assert dp["noise_multiplier"] == pytest.approx(sigma, rel=1e-6)
    assert dp["epsilon"] <= dp["target_epsilon"] + 1e-6


def test_network_model_formula():
    from mpc_lm.bench.netmodel import add_network_times, modelled_s

    assert modelled_s(1.0, 10, 1e9, "lan") == pytest.approx(1.0 + 10 * 0.2e-3 + 8e9 / 10e9)
    assert modelled_s(1.0, 10, 1e9, "wan") == pytest.approx(1.0 + 10 * 40e-3 + 8e9 / 400e6)
    row = add_network_times({"wall_s": 2.0, "rounds": 100, "offline_rounds": 50, "bytes_per_party": 5e8,
                             "online_bytes": 4e8})
    assert row["wan_s"] == pytest.approx(2.0 + 150 * 0.04 + 5e8 * 8 / 400e6)
    assert row["wan_online_s"] == pytest.approx(2.0 + 100 * 0.04 + 4e8 * 8 / 400e6)


def test_schema_rejects_a_row_without_cost_fields():
    from mpc_lm.bench.schema import SCHEMA

    doc = {"schema_version": 1, "benchmark": {"task": "t", "model": "m", "command": "c", "sizes": {},
                                              "quick": True, "device": "cpu", "network_model": {}},
           "machine": {"cpu": "x", "cpu_count": 2, "gpu": None}, "skipped": [],
           "modes": [{"mode": "mpc", "phase": "inference", "wall_s": 1.0}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)


def test_gpt2_cost_task_skips_with_a_clear_message(tmp_path):
    proc = _bench("--model", "gpt2-small-random", "--json", str(tmp_path / "g.json"), "--work-dir",
                  str(tmp_path / "w"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "g.json").read_text())
    from mpc_lm.bench.schema import SCHEMA

    jsonschema.validate(doc, SCHEMA)
    assert doc["modes"] == [] and len(doc["skipped"]) == 4
    assert "gpt2" in doc["skipped"][0]["reason"] and "skipped" in proc.stdout


def test_config_accepts_the_stock_crypten_switch():
    from mpc_lm.config import Approximations

    assert Approximations().mode == "mpc_lm"
    assert Approximations(mode="crypten").mode == "crypten"
    with pytest.raises(Exception):
        Approximations(mode="other")
