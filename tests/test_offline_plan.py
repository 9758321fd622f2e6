"""The offline phase's planning inputs and the party's error classification (single process)."""

from __future__ import annotations

import pytest
import torch

from mpc_lm._compat import import_crypten
from mpc_lm import offline
from mpc_lm.party import _is_transport_error
from mpc_lm.tls_transport import PeerLost

crypten = import_crypten()


@pytest.fixture(scope="module", autouse=True)
def _crypten():
    if not crypten.is_initialized():
        crypten.init()
    yield


def test_planning_copies_hold_shapes_and_no_data():
    x = crypten.cryptensor(torch.randn(3, 4))
    before = x._tensor.share.clone()
    copied = offline._meta({"w": [x, 7], "b": (x[0],)})
    m = copied["w"][0]
    assert m.device.type == "meta" and m.size() == x.size() and copied["w"][1] == 7
    assert copied["b"][0].size() == torch.Size([4])
    # the real shares are untouched and the real device is what the plan records
    assert x.device.type == "cpu" and torch.equal(x._tensor.share, before)
    assert offline._device_of(copied) == torch.device("meta")
    assert offline._device_of({"w": [x]}) == torch.device("cpu")


def test_planning_context_leaves_the_real_generators_alone():
    x = crypten.cryptensor(torch.randn(5))
    g = crypten.generators["prev"][torch.device("cpu")]
    state = g.get_state().clone()
    with offline._dry():
        m = offline._meta(x)
        y = crypten.cat([m * m, m.ge(0)])  # a product, a comparison (fresh zero shares): shapes only
        assert y.device.type == "meta" and y.size() == torch.Size([10])
        assert torch.device("meta") in crypten.generators["prev"]
    assert torch.equal(g.get_state(), state)
    assert torch.device("meta") not in crypten.generators["prev"]


@pytest.mark.parametrize("err, transport", [
    (RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"), True),
    (PeerLost("party 'a' has finished and closed its connection"), True),
    (RuntimeError("Attempted to set the storage of a tensor on device cpu"), False),
])
def test_internal_errors_are_not_reported_as_lost_contact(err, transport):
    assert _is_transport_error(err) is transport


@pytest.mark.parametrize("function", ["_get_additive_PRSS", "_setup_generators", "masks", "plan"])
def test_a_planned_chunk_may_name_only_the_dealer_functions(function):
    """A plan chunk is answered function by function: a name outside the dealer's functions (its
    seeded generators, its kept weight masks) is refused before anything is drawn or sent."""
    message = {"function": "plan", "device": "cpu", "requests": [("square", "cpu", ((2,),), {}),
                                                                  (function, "cpu", ((2,),), {})]}
    with pytest.raises(RuntimeError, match="unknown planned request"):
        offline.serve_plan(object(), message)


def _planning_model(shapes: dict, extra=("emb.word",)):
    """Shape-only secret parameters of these shapes, the matrices premasked (ids 0, 1, ... by name order)."""
    from mpc_lm import premask

    names = premask.matmul_names(shapes, extra)
    p = {n: offline._meta(crypten.cryptensor(torch.zeros(s))) for n, s in shapes.items()}
    for wid, n in enumerate(names):
        empty = torch.empty(shapes[n], dtype=torch.long, device="meta")
        p[n] = premask.MaskedWeight(wid, p[n], empty, empty)
    return p


@pytest.fixture
def _dealer():
    """CrypTen's TTP provider is the planned dealer (as in every party with a dealer)."""
    offline.install()
    before = crypten.cfg.mpc.provider
    crypten.cfg.mpc.provider = "TTP"
    yield
    crypten.cfg.mpc.provider = before


@pytest.mark.parametrize("task, labels", [("sequence-classification", 3), ("embedding", 0)])
def test_reused_layer_plans_equal_the_full_plan(_dealer, task, labels):
    """A plan that records one encoder layer and reuses it for the others lists exactly the requests
    (functions, sizes, the premasked weight each product uses) of a plan that runs every layer."""
    from mpc_lm.config import Approximations
    from mpc_lm.models import encoders

    arch = encoders.EncoderArch(family="bert", task=task, vocab_size=50, hidden=16, layers=4, heads=2,
                                intermediate=32, max_positions=20, position_offset=0, type_vocab=2, eps=1e-12,
                                act="gelu", num_labels=labels)
    p = _planning_model(encoders.param_shapes(arch))
    one_hot = crypten.cryptensor(torch.zeros(2, 7, 50))
    mask = crypten.cryptensor(torch.ones(2, 7))
    args = (p, one_hot, mask, arch, Approximations())
    full, full_sizes = offline.plan(encoders.forward, args, reuse_segments=False)
    reused, reused_sizes = offline.plan(encoders.forward, args, reuse_segments=True)
    assert reused == full and reused_sizes == full_sizes
    used = [req[2][1] for req in full if req[0] == "masked"]
    assert len(set(used)) > arch.layers * 3  # every layer's own weights, not the first layer's again


@pytest.mark.parametrize("family, kv_cache", [("gpt2", True), ("gpt2", False), ("llama", True)])
def test_reused_layer_plans_equal_the_full_plan_of_a_generation(_dealer, family, kv_cache):
    """The same for a whole generation (prefill and steps, keys and values cached per layer)."""
    from mpc_lm.causal_job import generate_batch
    from mpc_lm.config import Approximations, Generation
    from mpc_lm.models import causal

    llama = family == "llama"
    arch = causal.CausalArch(family=family, vocab_size=40, hidden=16, layers=3, heads=4, kv_heads=2 if llama else 4,
                             head_dim=4, intermediate=24, max_positions=16, eps=1e-5, act="silu" if llama else "gelu_new",
                             tied=not llama, qkv_bias=not llama, mlp_bias=not llama,
                             inv_freq=(1.0, 0.1) if llama else ())
    p = _planning_model(causal.family_module(family).param_shapes(arch), ("emb.word", "emb.pos"))
    one_hot = crypten.cryptensor(torch.zeros(2, 5, 40))
    mask = crypten.cryptensor(torch.ones(2, 8))
    pos = None if llama else crypten.cryptensor(torch.zeros(2, 8, 16))
    gen = Generation(max_new_tokens=3, kv_cache=kv_cache)

    def generate(p, o, m, q):
        return generate_batch(p, o, m, q, arch, Approximations(), gen, 0, 1, torch.device("cpu"))

    args = (p, one_hot, mask, pos)
    full, full_sizes = offline.plan(generate, args, reuse_segments=False)
    reused, reused_sizes = offline.plan(generate, args, reuse_segments=True)
    assert reused == full and reused_sizes == full_sizes
    assert len({req[2][1] for req in full if req[0] == "masked"}) > arch.layers * 3


def test_a_segment_that_reads_weights_it_was_not_given_is_refused(_dealer):
    """A segment must get the weights it multiplies by as arguments: a weight it finds elsewhere would
    be planned with the first segment's id for every later one."""
    from mpc_lm import premask

    meta = torch.empty(4, 4, dtype=torch.long, device="meta")
    hidden = premask.MaskedWeight(9, offline._meta(crypten.cryptensor(torch.zeros(4, 4))), meta, meta)
    x = crypten.cryptensor(torch.zeros(2, 4))

    def body(x):
        return offline.segment("leaky", lambda y: premask.mm(y, hidden), x)

    with pytest.raises(RuntimeError, match="not among its arguments"):
        offline.plan(body, (x,))


def test_operation_counts_are_written_only_when_asked(tmp_path, monkeypatch):
    """MPC_LM_OP_COUNT (mpc_lm/opcount.py): the aten operations of a block, by name, in one JSON file per run."""
    import json

    import torch

    from mpc_lm import opcount

    monkeypatch.delenv(opcount.ENV, raising=False)
    with opcount.counting(0) as counter:
        torch.ones(3).add(1)
    assert counter is None and not list(tmp_path.iterdir())
    monkeypatch.setenv(opcount.ENV, str(tmp_path / "ops"))
    with opcount.counting(1):
        torch.ones(3).add(1).mul_(2)
    files = list((tmp_path / "ops").glob("ops-1-*.json"))
    assert len(files) == 1
    got = json.loads(files[0].read_text())
    assert got["ops"]["aten.add.Tensor"] == 1 and got["ops"]["aten.mul_.Tensor"] == 1
    assert got["total"] == sum(got["ops"].values())
