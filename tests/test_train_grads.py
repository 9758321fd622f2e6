"""Per-layer gradient checks: mpc_lm.grads (on shares, one process) vs torch autograd.

The plaintext references use the exact functions (erf GELU, exact softmax,
exact LayerNorm); the secure side uses the MPC approximations, so tolerances
cover approximation plus 16-bit fixed point (stated per test).
"""

from __future__ import annotations

import math

import pytest
import torch

from mpc_lm import grads, train
from mpc_lm._compat import import_crypten
from mpc_lm.config import Approximations
from mpc_lm.models.encoders import EncoderArch, param_shapes

crypten = import_crypten()
AP = Approximations()


@pytest.fixture(scope="module", autouse=True)
def _crypten():
    crypten.init()
    yield


def enc(t):
    return crypten.cryptensor(t)


def plain(t):
    return train.reveal_exact(t)


def close(got, want, tol):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * max(scale, 1e-3), f"max error {err:.3g} vs scale {scale:.3g} (tol {tol})"


def test_layer_norm_backward():
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 16) * 2 + 0.5).requires_grad_()
    g = (torch.rand(16) + 0.5).requires_grad_()
    b = torch.randn(16).requires_grad_()
    dy = torch.randn(2, 3, 16)
    y = torch.nn.functional.layer_norm(x, (16,), g, b, 1e-12)
    y.backward(dy)
    ys, cache = grads.ln_fwd(enc(x.detach()), enc(g.detach()), enc(b.detach()), 1e-12, AP)
    dx, dg, db = grads.ln_bwd(cache, enc(dy), True)
    close(plain(ys), y.detach(), 2e-3)
    close(plain(dx), x.grad, 5e-3)
    close(plain(dg), g.grad, 5e-3)
    close(plain(db), b.grad, 1e-3)


def test_gelu_derivative_matches_autograd():
    x = torch.linspace(-6, 6, 241).requires_grad_()
    torch.nn.functional.gelu(x).sum().backward()
    y, d = grads.gelu_fwd(enc(x.detach()))
    close(plain(y), torch.nn.functional.gelu(x.detach()), 1e-3)
    assert (plain(d) - x.grad).abs().max() < 5e-3  # derivative of the degree-8 fit vs exact


def test_softmax_backward_with_mask():
    torch.manual_seed(1)
    s = torch.randn(2, 2, 4, 5).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)[:, None, None, :]
    p = torch.softmax(s.masked_fill(mask == 0, -1e9), -1)
    dp = torch.randn_like(p)
    p.backward(dp)
    ds = grads.softmax_bwd(enc(p.detach()), enc(dp))
    close(plain(ds), s.grad, 2e-3)


# ------------------------------------------------------------------ whole model vs a torch twin


def tiny_arch(task="sequence-classification", family="bert", act="gelu"):
    return EncoderArch(family, task, 50, 16, 2, 2, 32, 12, 0, 2, 1e-12, act, 2 if task else 0)


def torch_forward(p, ids, mask, arch, lora=None):
    """The canonical forward in plain torch with exact non-linearities."""
    h, heads = arch.hidden, arch.heads
    x = p["emb.word"][ids] + p["emb.pos"][: ids.size(1)] + p["emb.type"][0]
    ln = lambda t, n: torch.nn.functional.layer_norm(t, (h,), p[n + ".weight"], p[n + ".bias"], arch.eps)  # noqa: E731
    x = ln(x, "emb.ln")
    for n in range(arch.layers):
        qkv = x @ p[f"l{n}.attn.qkv.weight"] + p[f"l{n}.attn.qkv.bias"]
        if lora is not None:
            qkv = qkv + (x @ p[f"l{n}.attn.lora_A"]) @ (p[f"l{n}.attn.lora_B"] * lora.mask) * lora.scale
        b, t, _ = x.shape
        q, k, v = (qkv[..., i * h : (i + 1) * h].reshape(b, t, heads, -1).transpose(1, 2) for i in range(3))
        s = (q @ k.transpose(-1, -2)).masked_fill(mask[:, None, None, :] == 0, -1e9)
        ctx = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, h)
        x = ln(x + ctx @ p[f"l{n}.attn.out.weight"] + p[f"l{n}.attn.out.bias"], f"l{n}.ln1")
        a = torch.nn.functional.gelu(x @ p[f"l{n}.ff1.weight"] + p[f"l{n}.ff1.bias"])
        x = ln(x + a @ p[f"l{n}.ff2.weight"] + p[f"l{n}.ff2.bias"], f"l{n}.ln2")
    if arch.task == "embedding":
        m = mask.float()[..., None]
        pooled = (x * m).sum(1) / m.sum(1)
    else:
        pooled = torch.tanh(x[:, 0] @ p["head.pre.weight"] + p["head.pre.bias"])
    return pooled @ p["head.out.weight"] + p["head.out.bias"]


def random_params(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {}
    for name, shape in param_shapes(arch).items():
        if name.endswith("ln.weight") or name.endswith("ln1.weight") or name.endswith("ln2.weight"):
            p[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            p[name] = torch.randn(shape, generator=g) * (0.3 if len(shape) > 1 else 0.05)
    return p


@pytest.mark.parametrize("task,mode", [("sequence-classification", "all"),
                                       ("embedding", "last_k"), ("sequence-classification", "lora")])
def test_model_backward_matches_autograd(task, mode):
    arch = tiny_arch(task)
    p = random_params(arch)
    lora = None
    if mode == "lora":
        lora = grads.Lora.build(2, 4.0, ("q", "v"), arch.hidden, arch.heads)
        g = torch.Generator().manual_seed(5)
        for n in range(arch.layers):
            p[f"l{n}.attn.lora_A"] = torch.randn(arch.hidden, 4, generator=g) * 0.3
            p[f"l{n}.attn.lora_B"] = torch.randn(4, 3 * arch.hidden, generator=g) * 0.3 * lora.mask
    names = {"all": list(p), "last_k": [n for n in p if n.startswith(("l1.", "head."))],
             "lora": [n for n in p if "lora" in n or n.startswith("head.")]}[mode]
    first = {"all": -1, "last_k": 1, "lora": 0}[mode]
    ids = torch.tensor([[1, 5, 7, 9, 2, 0], [1, 3, 4, 2, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([1, 0])
    tp = {k: v.clone().requires_grad_(k in names) for k, v in p.items()}
    logits = torch_forward(tp, ids, mask, arch, lora)
    torch.nn.functional.cross_entropy(logits, labels).backward()

    sp = {k: enc(v) for k, v in p.items()}
    one_hot = crypten.cryptensor(torch.nn.functional.one_hot(ids, arch.vocab_size), precision=0)
    plan = grads.Plan(set(names), first, lora)
    slog, caches = grads.forward(sp, one_hot, enc(mask.float()), arch, AP, plan)
    close(plain(slog), logits.detach(), 1e-2)
    onehot_y = enc(torch.nn.functional.one_hot(labels, 2).float())
    dlogits, p_true, correct = grads.cross_entropy(slog, onehot_y, AP, 1.0 / 2)
    want_p = torch.softmax(logits.detach(), -1)
    close(plain(dlogits), (want_p - torch.nn.functional.one_hot(labels, 2)) / 2, 2e-2)
    assert plain(correct).tolist() == (logits.argmax(-1) == labels).float().tolist()
    got = grads.backward(caches, dlogits, sp, arch, plan)
    assert set(got) == set(names)
    for name in names:
        close(plain(got[name]), tp[name].grad, 3e-2)
