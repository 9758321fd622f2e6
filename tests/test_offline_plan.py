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
