"""The consortium config: validation errors name the key, the value and the fix."""

from __future__ import annotations

import pytest

from mpc_lm.config import Role, load_config, parse_config
from mpc_lm.errors import ConfigError, InsecureConfigError


def base(**over):
    cfg = {
        "parties": [
            {"name": "vendor", "role": "model_owner"},
            {"name": "hospital", "role": "data_owner", "input": "x.txt"},
            {"name": "dealer", "role": "dealer"},
        ],
        "model": {"path": "builtin:demo-minilm-sentiment", "task": "embedding"},
    }
    cfg.update(over)
    return cfg


def test_shipped_configs_are_valid():
    for name in ("demo-2party.yaml", "demo-3party.yaml"):
        cfg = load_config(f"launch/{name}")
        assert cfg.security.provider == "ttp" and cfg.dealer is not None


def test_ranks_follow_listed_order_and_dealer_is_last():
    cfg = parse_config(base(parties=[
        {"name": "dealer", "role": "dealer"},
        {"name": "h", "role": "data_owner", "input": "x"},
        {"name": "v", "role": "model_owner"},
    ]))
    assert [cfg.rank_of(n) for n in ("h", "v", "dealer")] == [0, 1, 2]
    assert cfg.world_size == 2 and cfg.party_at(2).role == Role.DEALER


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c["parties"].append({"name": "x", "role": "spy"}), "parties.3.role"),
    (lambda c: c["parties"].append({"name": "v2", "role": "model_owner"}), "exactly one party must have role model_owner; found 2"),
    (lambda c: c["parties"].pop(1), "at least one party must have role data_owner"),
    (lambda c: c["parties"].pop(2), "add a party with role: dealer"),
    (lambda c: c["parties"].append({"name": "vendor", "role": "compute"}), "repeated: ['vendor']"),
    (lambda c: c["parties"][1].pop("input"), "data owner 'hospital' needs 'input'"),
    (lambda c: c["parties"][0].update(device="tpu"), "device 'tpu'"),
    (lambda c: c["parties"][0].update(device="cuda:1"), "one kind of device, cpu or cuda (vendor: cuda:1, hospital: cpu)"),
    (lambda c: c["parties"][0].update(input="a.txt"), "only data_owner parties take 'input'"),
    (lambda c: c.update(jobb={}), "jobb: unknown key"),
    (lambda c: c.update(job={"seq_len": 1}), "job.seq_len"),
    (lambda c: c.update(rendezvous={"port": 70000}), "rendezvous.port"),
    (lambda c: c.update(timeouts={"op_s": -1}), "timeouts.op_s"),
])
def test_bad_configs_get_clear_errors(mutate, needle):
    cfg = base()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        parse_config(cfg, source="test.yaml")
    assert needle in str(err.value)
    assert "test.yaml" in str(err.value)


def test_tfp_is_refused_without_the_named_insecure_mode():
    cfg = base(security={"provider": "tfp"})
    cfg["parties"].pop(2)
    with pytest.raises(InsecureConfigError, match="insecure_development_mode"):
        parse_config(cfg)
    cfg["security"]["insecure_development_mode"] = True
    assert parse_config(cfg).security.provider == "tfp"


def test_runtime_refuses_tfp_even_if_validation_was_bypassed():
    from mpc_lm.runtime import _configure_crypten

    cfg = base(security={"provider": "tfp", "insecure_development_mode": True})
    cfg["parties"].pop(2)
    ok = parse_config(cfg)
    forged = ok.model_copy(update={"security": ok.security.model_copy(update={"insecure_development_mode": False})})
    with pytest.raises(InsecureConfigError):
        _configure_crypten(forged)


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "parties:\n - {name: v, role: model_owner}\n - {name: h, role: data_owner, input: in.txt}\n"
        " - {name: d, role: dealer}\nmodel: {path: ckpt}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.party("h").input == tmp_path / "in.txt"
    assert cfg.model.path == str(tmp_path / "ckpt")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("parties: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_digest_changes_with_content():
    a, b = parse_config(base()), parse_config(base(name="other"))
    assert a.digest() != b.digest() and a.digest() == parse_config(base()).digest()


def test_cached_builds_are_self_contained_and_a_broken_one_is_rebuilt(tmp_path):
    """``demo.build_once`` (the demo checkpoint, the causal-LM examples under $MPC_LM_CACHE): a directory
    with an entry that no longer resolves (a link into a deleted environment) is built again."""
    from mpc_lm.demo import build_once

    builds = []

    def build(out):
        builds.append(out)
        (out / "config.json").write_text("{}")
        (out / "weights.bin").write_bytes(b"w")

    target = tmp_path / "model-v1"
    assert build_once(target, build, ready="config.json") == target and len(builds) == 1
    assert build_once(target, build, ready="config.json") == target and len(builds) == 1  # cached
    (target / "weights.bin").unlink()
    (target / "weights.bin").symlink_to(tmp_path / "deleted-venv" / "weights.bin")  # dangling
    assert build_once(target, build, ready="config.json") == target and len(builds) == 2
    assert (target / "weights.bin").read_bytes() == b"w"
    assert not list(tmp_path.glob(".stale-*")) and not list(tmp_path.glob(".building-*"))
