"""Faults: a party killed (-9) or stopped (SIGSTOP) mid-run ends every other party promptly,
with an error naming it and no process left behind; bad configs always give a ConfigError.

Ports 29900-29999 (tests/_tls_helpers.py).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _tls_helpers import party, port_block, tls_config
from conftest import TEXTS, write_config
from mpc_lm import pki
from mpc_lm.config import parse_config
from mpc_lm.errors import ConfigError

PARTIES = ["vendor", "hospital", "dealer"]
LONG = TEXTS * 8  # 40 texts in batches of 2: long enough to be interrupted mid-run


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    pki.create_consortium(d, PARTIES)
    return d


def _config(tmp_path, tiny_models, certs, backend, op_s):
    timeouts = {"startup_s": 90, "op_s": op_s, "run_s": 300, "shutdown_s": 2}
    if backend == "tls":
        return tls_config(tmp_path, tiny_models["bert"], certs, texts=LONG, batch_size=2, timeouts=timeouts)
    base = port_block(1)
    return write_config(tmp_path, tiny_models["bert"], texts=LONG, batch_size=2, timeouts=timeouts,
                        rendezvous={"host": "127.0.0.1", "port": base})


def _start(cfg, tmp_path):
    progress = tmp_path / "progress"
    env = {"MPC_LM_PROGRESS_DIR": str(progress)}
    procs = {n: party(cfg, n, tmp_path / f"{n}.log", env_extra=env) for n in PARTIES}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait until the parties are inside the batches
        states = [json.loads(p.read_text()) for p in progress.glob("*.json") if p.stat().st_size]
        if any(1 <= s["done"] < s["total"] - 3 for s in states):
            break
        dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
        assert not dead, (dead, {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in PARTIES})
        time.sleep(0.2)
    else:
        _kill_all(procs)
        pytest.fail("the run did not reach its batches in time")
    return procs


def _kill_all(procs):
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _wait_others(procs, victim, bound_s, started):
    ended = {}
    try:
        for name, p in procs.items():
            if name == victim:
                continue
            p.wait(timeout=max(0.1, bound_s - (time.monotonic() - started)) + 30)
            ended[name] = time.monotonic() - started
    finally:
        _kill_all(procs)
    return ended


# Every role on TLS, the data owner on gloo, in CI; the other gloo kills are marked slow.
KILLS = [("tls", v) for v in PARTIES] + [
    ("gloo", v) if v == "hospital" else pytest.param("gloo", v, marks=pytest.mark.slow) for v in PARTIES
]


@pytest.mark.parametrize("backend,victim", KILLS)
def test_kill_9_of_any_party_ends_the_others_within_the_timeout(tmp_path, tiny_models, certs, backend, victim):
    # TLS: a closed connection is noticed at once, whatever op_s is (120 s here);
    # gloo: the bound is timeouts.op_s (20 s).
    op_s = 120 if backend == "tls" else 20
    bound = 15 if backend == "tls" else op_s + 10
    cfg = _config(tmp_path, tiny_models, certs, backend, op_s)
    procs = _start(cfg, tmp_path)
    os.killpg(procs[victim].pid, signal.SIGKILL)
    killed = time.monotonic()
    ended = _wait_others(procs, victim, bound, killed)
    print(f"[{backend}] {victim} killed: others stopped after " + ", ".join(f"{n} {t:.2f}s" for n, t in ended.items()))
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in PARTIES}
    for name, took in ended.items():
        assert procs[name].returncode not in (0, None), logs[name][-3000:]
        assert took < bound, f"{name} took {took:.1f}s to stop after {victim} was killed"
        assert "error:" in logs[name]
        if backend == "tls":  # the message names the party that died
            assert f"'{victim}'" in logs[name].split("error:", 1)[1], logs[name][-2000:]
    assert set(ended) == set(PARTIES) - {victim}
    assert all(p.poll() is not None for p in procs.values())


def test_a_stopped_party_is_detected_by_heartbeat(tmp_path, tiny_models, certs):
    """SIGSTOP: the process is alive and its sockets open, but it sends nothing."""
    cfg = tls_config(tmp_path, tiny_models["bert"], certs, texts=LONG, batch_size=2,
                     timeouts={"startup_s": 90, "op_s": 300, "run_s": 600, "shutdown_s": 2})
    procs = _start(cfg, tmp_path)
    os.killpg(procs["hospital"].pid, signal.SIGSTOP)
    stopped = time.monotonic()
    silence_s = 6  # tls.silence_s in tls_config
    ended = _wait_others(procs, "hospital", silence_s + 15, stopped)
    print("hospital stopped: others ended after " + ", ".join(f"{n} {t:.2f}s" for n, t in ended.items()))
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in PARTIES}
    for name, took in ended.items():
        assert procs[name].returncode == 3, logs[name][-3000:]
        assert took < silence_s + 15, f"{name} took {took:.1f}s"
        assert "'hospital'" in logs[name].split("error:", 1)[1]
    assert any("sent nothing, not even a heartbeat" in logs[n] for n in ended)


def test_a_party_with_another_config_is_refused_on_tls(tmp_path, tiny_models, certs):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cfg_a = tls_config(tmp_path / "a", tiny_models["bert"], certs,
                       timeouts={"startup_s": 30, "op_s": 30, "run_s": 60, "shutdown_s": 2})
    data = yaml.safe_load(cfg_a.read_text())
    data["job"]["batch_size"] = 4
    cfg_b = tmp_path / "b" / "consortium.yaml"
    cfg_b.write_text(yaml.safe_dump(data))
    procs = {"vendor": party(cfg_a, "vendor", tmp_path / "vendor.log"),
             "hospital": party(cfg_b, "hospital", tmp_path / "hospital.log"),
             "dealer": party(cfg_a, "dealer", tmp_path / "dealer.log")}
    try:
        for p in procs.values():
            p.wait(timeout=120)
    finally:
        _kill_all(procs)
    logs = "".join((tmp_path / f"{n}.log").read_text() for n in PARTIES)
    assert all(p.returncode == 2 for p in procs.values()), logs[-3000:]
    assert "joined with a different consortium config" in logs


# ---- fuzzing the config --------------------------------------------------------------

def _valid(tmp: Path, certs: Path) -> dict:
    (tmp / "in.txt").write_text("hello\n")
    return {
        "name": "fuzz",
        "parties": [{"name": "vendor", "role": "model_owner"},
                    {"name": "hospital", "role": "data_owner", "input": str(tmp / "in.txt"),
                     "output": str(tmp / "out.jsonl")},
                    {"name": "dealer", "role": "dealer"}],
        "model": {"path": str(tmp / "model"), "task": "sequence-classification"},
        "job": {"kind": "classify", "seq_len": 16, "batch_size": 2},
        "rendezvous": {"host": "127.0.0.1", "port": 29999, "backend": "tls"},
        "timeouts": {"startup_s": 10, "op_s": 10, "run_s": 60, "shutdown_s": 2},
        "security": {"provider": "ttp"},
        "tls": {"ca": str(certs / "ca.pem"), "dir": str(certs), "ports": {"vendor": 29998},
                "advertise": {"hospital": "127.0.0.1:29997"}, "heartbeat_s": 1, "silence_s": 10},
        "run_dir": str(tmp / "runs"),
    }


_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["", "\x00", "/nonexistent/x.pem", "../..", "tls", "gloo",
                                           "0.0.0.0", "::1", "10.0.0.1", "localhost", "vendor", "dealer",
                                           "model_owner", "dealer.pem", "-1", "1e9", "cuda:0"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def _mutation(draw):
    value = st.one_of(_junk, st.sampled_from(["\x00", "a\x00b", "/", ".", "~/x", "x" * 300]))
    return draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "delete", "add"]), value),
                         min_size=1, max_size=4))


def _apply(data, mutations):
    data = copy.deepcopy(data)
    for pick, action, value in mutations:
        paths = [p for p in _paths(data) if p]
        path = paths[pick % len(paths)]
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if action == "set":
            parent[key] = value
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[str(value)[:8] or "x"] = value
        else:
            parent.append(value)
    return data


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory, certs):
    return _valid(tmp_path_factory.mktemp("fuzz"), certs)


def test_the_fuzz_base_config_is_valid(fuzz_base):
    assert parse_config(copy.deepcopy(fuzz_base)).rendezvous.backend == "tls"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutation())
def test_mutated_configs_give_a_config_error_and_nothing_else(fuzz_base, mutations):
    data = _apply(fuzz_base, mutations)
    try:
        parse_config(data, source="<fuzz>")
    except ConfigError as err:
        assert str(err).strip(), "a ConfigError without a message"


@pytest.mark.parametrize("value", [None, "\x00", "a\x00b", "", -1, 2**70, 1.5, [], {}, True, "/nonexistent"])
def test_every_field_set_to_a_bad_value_gives_a_config_error(fuzz_base, value):
    """Exhaustive single-field mutations, next to the random ones above."""
    for path in [p for p in _paths(fuzz_base) if p]:
        data = copy.deepcopy(fuzz_base)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        try:
            parse_config(data, source="<fuzz>")
        except ConfigError as err:
            assert str(err).strip()


def test_a_party_error_is_forwarded_to_the_others_on_tls(tmp_path, tiny_models, certs):
    """The hospital stops on its own error; the others hear why (ABORT) and the launcher names it."""
    from mpc_lm.errors import PartyFailure
    from mpc_lm.launch import launch

    cfg = tls_config(tmp_path, tiny_models["bert"], certs, texts=[TEXTS[0], "word " * 40],
                     timeouts={"startup_s": 90, "op_s": 120, "run_s": 300, "shutdown_s": 2})
    started = time.monotonic()
    with pytest.raises(PartyFailure) as err:
        launch(cfg)
    msg = str(err.value)
    assert "'hospital' failed first" in msg and "job.seq_len" in msg
    assert time.monotonic() - started < 90  # not op_s: the others were told at once
    logs = {n: next((tmp_path / "runs").glob(f"*/logs/{n}.log")).read_text() for n in ("vendor", "dealer")}
    assert all("party 'hospital' reported" in log or "'hospital'" in log for log in logs.values()), logs
