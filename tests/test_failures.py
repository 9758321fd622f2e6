"""Bad input and broken parties: a clear error naming the problem and the fix, never a hang."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TEXTS, write_config
from mpc_lm.errors import ConfigError, PartyFailure
from mpc_lm.launch import launch

ROOT = Path(__file__).resolve().parent.parent


def _party(cfg: Path, name: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mpc_lm.cli", "party", str(cfg), "--name", name],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def test_text_longer_than_bucket_stops_everyone_with_the_fix(tmp_path, tiny_models):
    long_text = "word " * 40
    cfg = write_config(tmp_path, tiny_models["bert"], texts=[TEXTS[0], long_text])
    started = time.monotonic()
    with pytest.raises(PartyFailure) as err:
        launch(cfg)
    msg = str(err.value)
    assert "hospital" in msg and "line 2" in msg and "job.seq_len" in msg and "job.truncate" in msg
    assert time.monotonic() - started < 60


def test_truncate_true_cuts_instead(tmp_path, tiny_models):
    cfg = write_config(tmp_path, tiny_models["bert"], texts=[TEXTS[0], "word " * 40])
    data = yaml.safe_load(cfg.read_text())
    data["job"]["truncate"] = True
    cfg.write_text(yaml.safe_dump(data))
    launch(cfg)
    rows = (tmp_path / "hospital.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "logits" in json.loads(rows[1])


def test_bucket_longer_than_the_model_allows(tmp_path, tiny_models):
    cfg = write_config(tmp_path, tiny_models["bert"], seq_len=64)  # model has 40 positions
    with pytest.raises(PartyFailure, match=r"job.seq_len=64 is longer than the model allows \(40"):
        launch(cfg)


def test_checkpoint_that_does_not_match_its_config(tmp_path, tiny_models):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["bert"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(PartyFailure) as err:
        launch(write_config(tmp_path, bad))
    assert "vendor" in str(err.value) and "does not match" in str(err.value)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(PartyFailure, match="not a Hugging Face checkpoint directory"):
        launch(write_config(tmp_path, tmp_path / "nothing-here"))


def test_missing_party_is_named_when_the_rendezvous_times_out(tmp_path, tiny_models):
    cfg = write_config(tmp_path, tiny_models["bert"],
                       timeouts={"startup_s": 4, "op_s": 10, "run_s": 60, "shutdown_s": 2})
    host = _party(cfg, "vendor")  # rank 0 hosts the store; hospital and dealer never come
    out, _ = host.communicate(timeout=60)
    assert host.returncode == 2
    assert "['hospital', 'dealer'] did not join" in out and "mpc-lm party CONFIG --name NAME" in out


def test_rendezvous_host_that_never_comes_is_named(tmp_path, tiny_models):
    cfg = write_config(tmp_path, tiny_models["bert"],
                       timeouts={"startup_s": 4, "op_s": 10, "run_s": 60, "shutdown_s": 2})
    guest = _party(cfg, "hospital")
    out, _ = guest.communicate(timeout=60)
    assert guest.returncode == 2 and "hosted by party 'vendor'" in out and "did not come" in out


def test_party_with_a_different_config_is_refused(tmp_path, tiny_models):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cfg_a = write_config(tmp_path / "a", tiny_models["bert"])
    port = yaml.safe_load(cfg_a.read_text())["rendezvous"]["port"]
    cfg_b = write_config(tmp_path / "b", tiny_models["bert"], batch_size=4)
    data = yaml.safe_load(cfg_b.read_text())
    data["rendezvous"]["port"] = port
    data["parties"] = yaml.safe_load(cfg_a.read_text())["parties"]
    cfg_b.write_text(yaml.safe_dump(data))
    procs = [_party(cfg_a, "vendor"), _party(cfg_b, "hospital"), _party(cfg_a, "dealer")]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert all(p.returncode == 2 for p in procs)
    assert any("joined with a different consortium config" in o for o in outs)


def test_port_in_use_is_reported_before_starting(tmp_path, tiny_models):
    cfg = write_config(tmp_path, tiny_models["bert"])
    port = yaml.safe_load(cfg.read_text())["rendezvous"]["port"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(ConfigError, match=f"rendezvous.port {port}"):
            launch(cfg)


@pytest.mark.slow  # the same for every role and both transports: tests/test_faults.py
def test_killed_party_stops_the_others_within_the_timeout(tmp_path, tiny_models):
    texts = TEXTS * 8  # long enough to be killed mid-run
    cfg = write_config(tmp_path, tiny_models["bert"], texts=texts, batch_size=2,
                       timeouts={"startup_s": 60, "op_s": 20, "run_s": 120, "shutdown_s": 2})
    procs = {n: _party(cfg, n, start_new_session=True) for n in ("vendor", "hospital", "dealer")}
    time.sleep(12)  # past start-up, inside the batches
    assert procs["hospital"].poll() is None, procs["hospital"].communicate()[0]
    os.killpg(procs["hospital"].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for name in ("vendor", "dealer"):
        out, _ = procs[name].communicate(timeout=60)
        assert procs[name].returncode != 0, out + procs["vendor"].communicate()[0]
        assert time.monotonic() - killed_at < 20 + 10
        assert "error:" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a host without a GPU")
def test_cuda_party_on_a_host_without_gpu_is_refused_at_once(tmp_path, tiny_models):
    cfg = write_config(tmp_path, tiny_models["bert"])
    data = yaml.safe_load(cfg.read_text())
    for party in data["parties"][:2]:  # the computing parties (config: one kind of device)
        party["device"] = "cuda:0"
    cfg.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    with pytest.raises(PartyFailure) as err:
        launch(cfg)
    assert ("hospital" in str(err.value) or "vendor" in str(err.value)) and "no usable CUDA device" in str(err.value)
    assert time.monotonic() - started < 45


def test_model_that_does_not_fit_names_the_fix():
    import torch

    from mpc_lm import resources
    from mpc_lm.errors import ResourceError

    need = resources.encoder_inference_bytes(110_000_000, 4096, 512, 30522, 12, 768, 3072)
    with pytest.raises(ResourceError, match="lower job.batch_size or job.seq_len"):
        resources.check_fits(need, torch.device("cpu"), "vendor", "encrypted inference")
