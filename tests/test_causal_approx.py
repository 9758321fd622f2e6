"""The causal-LM approximations against torch, in a single-process CrypTen world."""

from __future__ import annotations

import math

import pytest
import torch

from mpc_lm._compat import import_crypten

crypten = import_crypten()
from mpc_lm import approx_causal as ac  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def world():
    crypten.init()
    torch.manual_seed(0)
    yield


def enc(x):
    return crypten.cryptensor(x)


def test_silu_error():
    x = torch.linspace(-20, 20, 4001)
    got = ac.silu(enc(x)).get_plain_text()
    err = (got - torch.nn.functional.silu(x)).abs().max().item()
    assert err < 1e-3, err  # measured 7.5e-4, at |x| ~ 10.8 where silu ~ x (relative 7e-5)


def test_log_ge1():
    x = torch.cat([torch.linspace(1, 4, 300), torch.exp(torch.linspace(0, math.log(60000), 700))])
    got = ac.log_ge1(enc(x), 16).get_plain_text()
    err = (got - torch.log(x)).abs().max().item()
    assert err < 2e-4, err


def test_exp_log_softmax():
    x = torch.linspace(-40, 0, 4001)
    got = ac.exp_log_softmax(enc(x)).get_plain_text()
    err = (got - torch.exp(x)).abs().max().item()
    assert err < 8e-4, err  # measured 5.3e-4: a few 2^-16 from the series, times 4 (squarings)


def test_target_log_prob():
    z = torch.randn(3, 5, 300) * 4
    t = torch.randint(0, 300, (3, 5))
    oh = crypten.cryptensor(torch.nn.functional.one_hot(t, 300), precision=0)
    got = ac.target_log_prob(enc(z), oh).get_plain_text()
    want = torch.log_softmax(z, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    err = (got - want).abs().max().item()
    assert err < 3e-3, err


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_argmax_one_hot(n):
    z = torch.randn(4, n) * 3
    z[0, :] = 0.5  # all tied: the lowest index wins, like torch.argmax
    oh, top = ac.argmax_one_hot(enc(z))
    assert oh.encoder.scale == 1
    got = oh.get_plain_text()
    assert torch.equal(got.long(), torch.nn.functional.one_hot(z.argmax(-1), n))
    assert (top.get_plain_text() - z.max(-1).values).abs().max() < 1e-3
    assert torch.equal(ac.one_hot_to_ids(oh).get_plain_text().long(), z.argmax(-1))


def test_top_k_mask():
    z = torch.randn(2, 50)
    got = ac.top_k_mask(enc(z), 5).get_plain_text()
    want = torch.zeros_like(z).scatter(-1, z.topk(5, -1).indices, 1.0)
    assert torch.equal(got, want)


def test_gumbel_noise_distribution():
    g = ac.gumbel_noise((20000,), 1, 0, seed=3, step=0, device="cpu").get_plain_text()
    assert abs(g.mean().item() - 0.5772) < 0.03  # Euler-Mascheroni: the Gumbel(0, 1) mean
    assert abs(g.var().item() - math.pi**2 / 6) < 0.08


def test_gumbel_max_of_two_is_standard():
    # what two parties' Gumbel(-ln 2) draws combine into
    g1 = ac.local_gumbel((200000,), ac.party_generator(1, 0, 0), 2)
    g2 = ac.local_gumbel((200000,), ac.party_generator(1, 1, 0), 2)
    g = torch.maximum(g1, g2)
    assert abs(g.mean().item() - 0.5772) < 0.01
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03
