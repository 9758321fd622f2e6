"""Hand-written forward/backward passes of the encoders on secret shares.

CrypTen's autograd cannot differentiate several ops the secure forward uses
(in-place Newton iterations, non-contiguous views), and it would re-derive
what the forward already computed. Each function here is a pair: ``*_fwd``
returns the output and a cache of the shares the backward needs (LayerNorm's
inverse std, softmax probabilities, GELU's derivative), ``*_bwd`` maps the
output gradient to the input gradient and the parameter gradients.

Conventions: weights are canonical (mpc_lm/models/encoders.py): (in, out),
fused QKV, 1/sqrt(d) folded into W_q; gradients are with respect to those
canonical tensors (the optimizer maps them to the Hugging Face
parameterisation, mpc_lm/optim.py). A backward is linear in its upstream
gradient, so the loss gradient may carry a public scale (``loss_scale``) for
fixed-point resolution. Rounds per layer: docs/training.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import approx, layers
from ._compat import import_crypten
from .config import Approximations
from .errors import ModelError

crypten = import_crypten()


def zeros(shape, like):
    """A sharing of zeros (pseudo-random zero shares: no communication)."""
    return crypten.cryptensor(torch.zeros(shape), device=like.device)


def _flat(x):
    return x.reshape(-1, x.size(-1))


# ------------------------------------------------------------------ linear, layer norm


def linear_bwd(x, weight, dy, need_w: bool, need_x: bool):
    """y = x W + b. Returns (dx, dW, db); dW/db only if ``need_w``.

    dW = x^T dy and dx = dy W^T are independent: their Beaver openings travel in one round
    (:func:`mpc_lm.approx.merged_round`). 1 round."""
    reqs = ([("matmul", _flat(x).t(), _flat(dy))] if need_w else []) + ([("matmul", dy, weight.t())] if need_x else [])
    out = approx.merged_round(reqs) if reqs else []
    dw = out.pop(0) if need_w else None
    db = _flat(dy).sum(0) if need_w else None
    dx = out.pop(0) if need_x else None
    return dx, dw, db


def ln_fwd(x, gamma, beta, eps: float, ap: Approximations):
    """LayerNorm keeping what its backward needs: x_hat, 1/std and gamma x_hat.

    centered^2 and centered gamma in one round, 1/std (approx.inv_sqrt), then x_hat and
    gamma x_hat = (centered gamma) / std in one round: C + 3 rounds with the linear guess
    (``approx.first_guess: linear`` where it applies; else the bucket guess and Newton steps)."""
    centered = x - x.mean(dim=-1, keepdim=True)
    squares, scaled = approx.mul_batch([(centered, centered), (centered, gamma)])  # gamma (H,): H-wide opening
    inv = approx.inv_sqrt(squares.mean(dim=-1, keepdim=True) + eps, layers.VAR_LO_EXP, layers.VAR_HI_EXP,
                          ap.inv_sqrt_iterations, ap.guess_steps_per_octave, ap.first_guess == "linear")
    xhat, gx = approx.mul_batch([(centered, inv), (scaled, inv)])
    return gx + beta, dict(xhat=xhat, inv=inv, gx=gx, gamma=gamma)


def ln_bwd(cache, dy, need_params: bool):
    """dx = inv (dxh - mean(dxh)) - (xh inv) mean(dxh xh), dxh = dy gamma. 2 rounds.

    dxh xh = dy (gamma xh) is a product of dy with a cached share, so it travels beside
    dy gamma, xh inv (independent of dy) and dy xh (for dgamma); the second round scales
    both terms."""
    pairs = [("mul", dy, cache["gamma"]), ("mul", dy, cache["gx"]), ("mul", cache["xhat"], cache["inv"])]
    dxhat, t, xi, *rest = approx.merged_round(pairs + ([("mul", dy, cache["xhat"])] if need_params else []))
    dgamma = _flat(rest[0]).sum(0) if need_params else None
    dbeta = _flat(dy).sum(0) if need_params else None
    proj = t.mean(dim=-1, keepdim=True)
    a, b = approx.merged_round([("mul", dxhat - dxhat.mean(dim=-1, keepdim=True), cache["inv"]),
                                ("mul", xi, proj)])
    return a - b, dgamma, dbeta


# ------------------------------------------------------------------ activations


def _cheb_basis(v, degree: int) -> dict:
    """T_1..T_degree of v (approx.chebyshev_basis, kept for the derivative series)."""
    return approx.chebyshev_basis(v, degree)


def _series(T, v, coeffs):
    return approx.chebyshev_series(T, v, coeffs)


def gelu_fwd(x):
    """approx.gelu and its derivative from the same pieces.

    Inside [-4, 4], gelu = x/2 + P(v), v = 2 (x/4)^2 - 1, so
    gelu' = 1/2 + P'(v) * x / 4 with P' the Chebyshev derivative series
    (numpy chebder, degree 7, on the T_k already computed); 1 above 4, 0
    below -4; the derivative is the exact derivative of the piecewise
    polynomial the forward uses.

    Under ``tables`` with a dealer of ``select_fma`` (two parties): the comparison
    beside the basis to T_4 (3 rounds, as approx.gelu); then one round makes the
    value m (x/2 + low + T_4 top) + h x (``select_fma``) and T_4 top' of the
    derivative's series P' = low' + T_4 top' (the same halves); one more makes the
    derivative m (1/2 + (x/4) P'(v)) + h (``select_fma`` with X = 1): 5 rounds.
    Otherwise: the comparison, the basis to T_8, x P'(v), the selections: ~10 rounds.
    """
    bound, degree = approx.GELU_BOUND, approx.GELU_DEGREE
    folded = approx._dealt_available("select_fma")  # asked first: making the protocol asks for its tables
    protocol = approx._ge_protocol(x, [-bound, bound], coarse=True, form="deep") if folded else None
    if protocol is not None:
        return approx.lockstep(_gelu_fwd_folded(x, protocol))[0]
    lo, hi = approx.ge_many(x, [-bound, bound]).unbind(0)
    v = x.square() * (2 / bound**2) - 1
    coeffs = approx.fit_even_odd("gelu", bound, degree)
    T = _cheb_basis(v, degree)
    inside = x * 0.5 + _series(T, v, coeffs)
    dcoeffs = np.polynomial.chebyshev.chebder(np.array(coeffs))
    (xq,) = approx.mul_many([(x, _series(T, v, dcoeffs))])
    dinside = xq * (4 / bound**2) + 0.5
    middle = lo - hi
    a, b, d = approx.mul_many([(middle, inside), (hi, x), (middle, dinside)])
    return a + b, d + hi


def _gelu_fwd_folded(x, compare):
    """:func:`gelu_fwd` under ``tables`` and ``select_fma``, as an approx.lockstep protocol (5 rounds)."""
    bound, degree = approx.GELU_BOUND, approx.GELU_DEGREE
    below, (v, T) = yield from approx.together(compare, approx._gelu_basis(x))
    coeffs = approx.fit_even_odd("gelu", bound, degree)
    low, factor, top = approx._chebyshev_halves(T, v, coeffs)
    dlow, dfactor, dtop = approx._chebyshev_halves(T, v, np.polynomial.chebyshev.chebder(np.array(coeffs)))
    bits = approx._inside_above(below)
    value, dtail = yield [("select_fma", bits, crypten.stack([x * 0.5 + low, factor, top, x])),
                          ("mul", dfactor, dtop)]
    ones = x * 0 + 1.0
    (deriv,) = yield [("select_fma", bits, crypten.stack([ones * 0.5, x * (4 / bound**2), dlow + dtail, ones]))]
    return value, deriv


def act_fwd(x, name: str, ap: Approximations):
    """Activation value and derivative (both shares)."""
    if name in ("gelu", "gelu_new", "gelu_python", "gelu_pytorch_tanh"):
        if ap.gelu != "poly":
            raise ModelError(f"training supports approx.gelu: poly only (got {ap.gelu!r})")
        return gelu_fwd(x)
    if name == "relu":
        bit = approx.as_fixed(x.ge(0))
        return x * bit, bit
    raise ModelError(f"activation {name!r} has no secure backward (gelu, relu)")


# ------------------------------------------------------------------ attention


def softmax_bwd(probs, dprobs, inner=None):
    """dS = P * (dP - sum(dP * P)). 2 rounds; 1 if ``inner`` = sum(dP * P) is given (the
    attention's backward has it from its context, :func:`attention_bwd`). Masked keys have
    P = 0, so dS = 0."""
    if inner is None:
        inner = (dprobs * probs).sum(dim=-1, keepdim=True)
    return probs * (dprobs - inner)


@dataclass
class Lora:
    """LoRA adapters on the fused QKV projection (block-diagonal B, one block per target).

    ``scale`` is the public (3H,) column factor alpha / r, times 1/sqrt(d) on the
    query columns (folded like W_q); ``mask`` keeps B block-diagonal.
    """

    rank: int
    targets: tuple[str, ...]
    scale: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def build(cls, rank: int, alpha: float, targets, hidden: int, heads: int) -> "Lora":
        targets = tuple(t for t in ("q", "k", "v") if t in targets)
        scale = torch.zeros(3 * hidden)
        mask = torch.zeros(len(targets) * rank, 3 * hidden, dtype=torch.int64)
        for j, t in enumerate(targets):
            col = "qkv".index(t)
            fold = 1.0 / math.sqrt(hidden // heads) if t == "q" else 1.0
            scale[col * hidden : (col + 1) * hidden] = alpha / rank * fold
            mask[j * rank : (j + 1) * rank, col * hidden : (col + 1) * hidden] = 1
        return cls(rank, targets, scale, mask)


def attention_fwd(x, key_mask, p: dict, pre: str, heads: int, ap: Approximations, lora: Lora | None):
    qkv = layers.linear(x, p[f"{pre}.qkv.weight"], p[f"{pre}.qkv.bias"])
    xa = None
    if lora is not None:
        xa = approx.matmul(x, p[f"{pre}.lora_A"])
        qkv = qkv + approx.matmul(xa, p[f"{pre}.lora_B"]) * lora.scale.to(x.device)
    h = x.size(-1)
    q, k, v = (layers.split_heads(qkv[..., i * h : (i + 1) * h], heads) for i in range(3))
    scores = approx.matmul(q, k.transpose(-1, -2))
    probs = approx.masked_softmax(scores, key_mask, ap.exp_iterations, ap.reciprocal_iterations,
                                   ap.guess_steps_per_octave, ap.max_arity, ap.exp)
    heads_ctx = approx.matmul(probs, v)
    ctx = layers.merge_heads(heads_ctx)
    out = layers.linear(ctx, p[f"{pre}.out.weight"], p[f"{pre}.out.bias"])
    return out, dict(x=x, xa=xa, q=q, k=k, v=v, probs=probs, ctx=ctx, heads_ctx=heads_ctx)


def attention_bwd(c: dict, dout, p: dict, pre: str, train: set, grads: dict, lora: Lora | None, need_x: bool):
    dctx, dw, db = linear_bwd(c["ctx"], p[f"{pre}.out.weight"], dout, f"{pre}.out.weight" in train, True)
    if dw is not None:
        grads[f"{pre}.out.weight"], grads[f"{pre}.out.bias"] = dw, db
    heads = c["q"].size(1)
    dctx = layers.split_heads(dctx, heads)
    # sum_j dP_ij P_ij = dctx_i . (P V)_i: softmax's inner sum from the context, beside dP and dV
    dprobs, dv, inner = approx.merged_round([("matmul", dctx, c["v"].transpose(-1, -2)),
                                             ("matmul", c["probs"].transpose(-1, -2), dctx),
                                             ("mul", dctx, c["heads_ctx"])])
    dscores = softmax_bwd(c["probs"], dprobs, inner.sum(dim=-1, keepdim=True))
    dq, dk = approx.merged_round([("matmul", dscores, c["k"]), ("matmul", dscores.transpose(-1, -2), c["q"])])
    dqkv = crypten.cat([layers.merge_heads(t) for t in (dq, dk, dv)], dim=-1)
    x = c["x"]
    dx, dw, db = linear_bwd(x, p[f"{pre}.qkv.weight"], dqkv, f"{pre}.qkv.weight" in train, need_x)
    if dw is not None:
        grads[f"{pre}.qkv.weight"], grads[f"{pre}.qkv.bias"] = dw, db
    if lora is not None:
        dz = dqkv * lora.scale.to(dqkv.device)
        grads[f"{pre}.lora_B"] = approx.matmul(_flat(c["xa"]).t(), _flat(dz)) * lora.mask.to(dz.device)
        dxa = approx.matmul(dz, p[f"{pre}.lora_B"].t())
        grads[f"{pre}.lora_A"] = approx.matmul(_flat(x).t(), _flat(dxa))
        if need_x:
            dx = dx + approx.matmul(dxa, p[f"{pre}.lora_A"].t())
    return dx


# ------------------------------------------------------------------ encoder layer, embeddings


def layer_fwd(x, key_mask, p: dict, n: int, arch, ap: Approximations, lora: Lora | None, keep: bool = True):
    """An encoder layer with the caches of its backward. ``keep=False`` (a frozen block below the
    trained ones, no adapters): the inference layer (mpc_lm/layers.py: the softmax normalised after
    the product with V, GELU without its derivative, LayerNorms without caches), no cache."""
    if not keep and lora is None:
        attn = layers.self_attention(x, key_mask, p, f"l{n}.attn", arch.heads, ap)
        x1 = layers.layer_norm(x + attn, p[f"l{n}.ln1.weight"], p[f"l{n}.ln1.bias"], arch.eps, ap)
        a = layers.activation(layers.linear(x1, p[f"l{n}.ff1.weight"], p[f"l{n}.ff1.bias"]), arch.act, ap)
        h2 = layers.linear(a, p[f"l{n}.ff2.weight"], p[f"l{n}.ff2.bias"])
        return layers.layer_norm(x1 + h2, p[f"l{n}.ln2.weight"], p[f"l{n}.ln2.bias"], arch.eps, ap), None
    attn, ca = attention_fwd(x, key_mask, p, f"l{n}.attn", arch.heads, ap, lora)
    x1, c1 = ln_fwd(x + attn, p[f"l{n}.ln1.weight"], p[f"l{n}.ln1.bias"], arch.eps, ap)
    a, da = act_fwd(layers.linear(x1, p[f"l{n}.ff1.weight"], p[f"l{n}.ff1.bias"]), arch.act, ap)
    h2 = layers.linear(a, p[f"l{n}.ff2.weight"], p[f"l{n}.ff2.bias"])
    x2, c2 = ln_fwd(x1 + h2, p[f"l{n}.ln2.weight"], p[f"l{n}.ln2.bias"], arch.eps, ap)
    return x2, dict(attn=ca, ln1=c1, x1=x1, a=a, da=da, ln2=c2)


def layer_bwd(c: dict, dx2, p: dict, n: int, train: set, grads: dict, lora: Lora | None, need_x: bool):
    def put(name, dw, db):
        if dw is not None:
            grads[f"l{n}.{name}.weight"], grads[f"l{n}.{name}.bias"] = dw, db

    ds2, dg, db = ln_bwd(c["ln2"], dx2, f"l{n}.ln2.weight" in train)
    put("ln2", dg, db)
    da, dw, db = linear_bwd(c["a"], p[f"l{n}.ff2.weight"], ds2, f"l{n}.ff2.weight" in train, True)
    put("ff2", dw, db)
    dh1 = da * c["da"]
    dx1, dw, db = linear_bwd(c["x1"], p[f"l{n}.ff1.weight"], dh1, f"l{n}.ff1.weight" in train, True)
    put("ff1", dw, db)
    ds1, dg, db = ln_bwd(c["ln1"], ds2 + dx1, f"l{n}.ln1.weight" in train)
    put("ln1", dg, db)
    dx = attention_bwd(c["attn"], ds1, p, f"l{n}.attn", train, grads, lora, need_x)
    return ds1 + dx if need_x else None


def embed_fwd(p: dict, one_hot, arch, ap: Approximations, keep: bool = True):
    """Embeddings and their LayerNorm; ``keep=False`` (frozen): the inference LayerNorm, no cache."""
    seq = one_hot.size(1)
    x = layers.embed_tokens(one_hot, p["emb.word"])
    x = x + p["emb.pos"][arch.position_offset : arch.position_offset + seq]
    if "emb.type" in p:
        x = x + p["emb.type"][0]
    if not keep:
        return layers.layer_norm(x, p["emb.ln.weight"], p["emb.ln.bias"], arch.eps, ap), None
    y, cache = ln_fwd(x, p["emb.ln.weight"], p["emb.ln.bias"], arch.eps, ap)
    return y, dict(ln=cache, one_hot=one_hot)


def embed_bwd(c: dict, dy, p: dict, arch, train: set, grads: dict):
    dx, dg, db = ln_bwd(c["ln"], dy, "emb.ln.weight" in train)
    if dg is not None:
        grads["emb.ln.weight"], grads["emb.ln.bias"] = dg, db
    if "emb.word" in train:
        grads["emb.word"] = approx.matmul(_flat(c["one_hot"]).t(), _flat(dx))
        seq, off = dx.size(1), arch.position_offset
        dpos = dx.sum(0)
        parts = ([zeros((off, arch.hidden), dx)] if off else []) + [dpos]
        rest = arch.max_positions - off - seq
        grads["emb.pos"] = crypten.cat(parts + ([zeros((rest, arch.hidden), dx)] if rest else []), dim=0)
        if "emb.type" in p:
            dtype = dpos.sum(0).unsqueeze(0)
            grads["emb.type"] = crypten.cat([dtype, zeros((arch.type_vocab - 1, arch.hidden), dx)], 0) \
                if arch.type_vocab > 1 else dtype


# ------------------------------------------------------------------ head and loss


def head_fwd(p: dict, hidden, mask, arch, ap: Approximations, pool=None):
    """Logits as encoders.head, with caches. Needs a classification head.

    ``pool`` (embedding task, optional): the mean pooling's weights mask / count, shared by the
    data owner with the mask (it knows both), which saves the count's reciprocal."""
    if arch.task == "embedding":
        seq = mask.size(-1)
        if pool is not None:
            weights = pool
        else:
            count = mask.sum(dim=-1, keepdim=True)
            weights = mask * approx.reciprocal(count, -1, max(1, seq.bit_length()), ap.reciprocal_iterations,
                                               ap.guess_steps_per_octave)
        pooled = (hidden * weights.unsqueeze(-1)).sum(dim=1)
        logits = layers.linear(pooled, p["head.out.weight"], p["head.out.bias"])
        return logits, dict(pooled=pooled, weights=weights, shape=hidden.size())
    cls = hidden[:, 0]
    pre = layers.linear(cls, p["head.pre.weight"], p["head.pre.bias"])
    if arch.family == "distilbert":
        act, dact = act_fwd(pre, "relu", ap)
    else:
        act, dact = approx.tanh(pre), None
    logits = layers.linear(act, p["head.out.weight"], p["head.out.bias"])
    return logits, dict(cls=cls, act=act, dact=dact, shape=hidden.size())


def head_bwd(c: dict, dlogits, p: dict, arch, train: set, grads: dict, need_x: bool):
    pooled = c.get("pooled", c.get("act"))
    dpooled, dw, db = linear_bwd(pooled, p["head.out.weight"], dlogits, "head.out.weight" in train,
                                 need_x or arch.task != "embedding")
    if dw is not None:
        grads["head.out.weight"], grads["head.out.bias"] = dw, db
    if arch.task == "embedding":
        return dpooled.unsqueeze(1) * c["weights"].unsqueeze(-1) if need_x else None
    dact = c["dact"] if c["dact"] is not None else 1 - c["act"].square()
    dpre = dpooled * dact
    dcls, dw, db = linear_bwd(c["cls"], p["head.pre.weight"], dpre, "head.pre.weight" in train, need_x)
    if dw is not None:
        grads["head.pre.weight"], grads["head.pre.bias"] = dw, db
    if not need_x:
        return None
    b, t, h = c["shape"]
    return crypten.cat([dcls.unsqueeze(1), zeros((b, t - 1, h), dcls)], dim=1)


def cross_entropy(logits, labels, ap: Approximations, grad_scale: float, metrics: bool = True):
    """Softmax cross-entropy against shared one-hot ``labels`` (B, C).

    Returns (dlogits = (softmax - labels) * grad_scale, p_true, correct) where
    p_true is the predicted probability of the true class (for the loss, revealed
    only to whom the config names) and correct the 0/1 [true logit is the max]
    (None unless ``metrics``). The exponential is softmax's (``approx.exp``: clipped
    where available), the reciprocal's last Newton step folded into the normalisation.
    Cost: row max, exp (4 rounds clipped), C + 2, 1 round; + 1 comparison for ``correct``.
    """
    shifted = logits - approx.row_max(logits, ap.max_arity)
    e = approx.exp_shifted(shifted, None, ap.exp, ap.exp_iterations)
    hi_exp = max(1, math.ceil(math.log2(logits.size(-1))) + 1)
    probs = approx.scaled_reciprocal(e.sum(dim=-1, keepdim=True), e, -1, hi_exp, ap.reciprocal_iterations,
                                     ap.guess_steps_per_octave)
    if not metrics:
        return (probs - labels) * grad_scale, (probs * labels).sum(-1), None
    p_true, s_true = (t.sum(-1) for t in approx.mul_many([(probs, labels), (shifted, labels)]))
    correct = approx.as_fixed(approx.ge0(s_true))  # the true logit minus the max is >= 0
    return (probs - labels) * grad_scale, p_true, correct


# ------------------------------------------------------------------ whole model


@dataclass
class Plan:
    """What is trained: parameter names, and the lowest block that needs a backward.

    ``first`` is -1 when the embeddings train, n for encoder layer n, and
    ``layers`` when only the head trains. Blocks below ``first`` run forward only.
    """

    train: set
    first: int
    lora: Lora | None = None
    extra: dict = field(default_factory=dict)


def forward(p: dict, one_hot, mask, arch, ap: Approximations, plan: Plan, pool=None):
    """Logits and the caches of the blocks at or above ``plan.first``. ``pool``: see :func:`head_fwd`."""
    x, c = embed_fwd(p, one_hot, arch, ap, keep=plan.first < 0)
    logits, caches = forward_layers(p, x, mask, arch, ap, plan, pool=pool)
    if plan.first < 0:
        caches["emb"] = c
    return logits, caches


def forward_layers(p: dict, x, mask, arch, ap: Approximations, plan: Plan, start: int = 0, pool=None):
    """Logits from the hidden states ``x`` entering encoder layer ``start``, with the caches
    of the blocks at or above ``plan.first`` (``mpc_lm.bench_train``'s step starts from
    shared hidden states)."""
    caches: dict = {}
    key_mask = mask.unsqueeze(1).unsqueeze(1)
    for n in range(start, arch.layers):
        x, c = layer_fwd(x, key_mask, p, n, arch, ap, plan.lora, keep=n >= plan.first)
        if n >= plan.first:
            caches[n] = c
    logits, caches["head"] = head_fwd(p, x, mask, arch, ap, pool)
    return logits, caches


def backward(caches: dict, dlogits, p: dict, arch, plan: Plan) -> dict:
    """Gradients of every trainable parameter (canonical names)."""
    grads: dict = {}
    dx = head_bwd(caches["head"], dlogits, p, arch, plan.train, grads, plan.first < arch.layers)
    for n in reversed(range(max(plan.first, 0), arch.layers)):
        dx = layer_bwd(caches[n], dx, p, n, plan.train, grads, plan.lora, need_x=n > plan.first or plan.first < 0)
    if plan.first < 0:
        embed_bwd(caches["emb"], dx, p, arch, plan.train, grads)
    return grads
