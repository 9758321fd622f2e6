"""Optimizers on secret shares: SGD with momentum, Adam and AdamW.

Every trainable tensor is flattened into one vector so an optimizer step is
a few rounds whatever the number of tensors (one batched comparison for Adam's
inverse square root per chunk of :data:`INV_SQRT_CHUNK` parameters, not one per
tensor; the chunks bound its memory: the comparison works on range-width
copies of its input). The optimizer asks the dealer on demand, chunk by chunk:
planned ahead (mpc_lm/offline.py), a whole layer's comparison tables would be
held at once.

Two maps keep the arithmetic equal to plaintext PyTorch training of the
Hugging Face model:

* canonical -> HF: the query columns of the fused QKV weight and bias are
  stored times s = 1/sqrt(d_head) (mpc_lm/models/encoders.py). With the public
  per-element ``scale`` (s on those columns, 1 elsewhere), w_hf = w / scale and
  g_hf = g * scale; the optimizer runs in the HF parameterisation and the update
  is multiplied by ``scale`` before it is applied to the canonical share.
* loss scaling: gradients arrive multiplied by the public ``loss_scale`` L
  (fixed point keeps 16 fractional bits; small gradients would vanish). SGD's
  momentum buffer is kept L-scaled and the step divides by L; Adam is
  scale-invariant, so m and v are kept for L*g and eps becomes L*eps.

Public factors go through :func:`mul_public`, which encodes a float with at
least 16 significant bits (CrypTen would round lr = 1e-4 to 7 / 2^16: 7 %).
Adam's 1/sqrt(v_hat + eps^2) is approx.inv_sqrt: a bucketed first guess over
``adam_v_range`` (one comparison on range-width elements per parameter) and
Newton iterations; v below the range gets the lowest bucket's guess, which
caps the step at roughly lr * m_hat * 2^(-lo/2) * 3.4 (a larger effective eps).
"""

from __future__ import annotations

import math

import torch

from . import approx
from ._compat import import_crypten
from .config import Training

crypten = import_crypten()

#: Parameters per Adam inverse-square-root call: its comparison holds one copy of the input per
#: octave of ``adam_v_range`` (32 by default) and several work tensors of that size, so one call over
#: an encoder layer's 1.8 M (MiniLM) to 7 M (BERT-base) parameters needed ~10 GB and more per party;
#: 2^17 keeps it to a few hundred MB.
INV_SQRT_CHUNK = 1 << 17


def mul_public(x, factor):
    """x * factor for a public float or tensor, keeping ~16 significant bits of ``factor``.

    Cost: local (two parties) or one truncation (more parties), like any public product.
    """
    f = torch.as_tensor(factor, dtype=torch.float64)
    top = f.abs().max().item()
    if top == 0:
        return x * 0
    bits = 16 - math.floor(math.log2(top))
    scaled = torch.round(f * 2.0**bits).long().to(x.device)
    if bits < 0:
        scaled, bits = scaled * 2 ** (-bits), 0
    # multiply the shares directly: ``x * int`` in CrypTen would encode the int
    # (times 2^16) first, and the larger product makes truncation fail more often
    y = x.clone()
    y._tensor.share = y._tensor.share * scaled
    if bits:
        y._tensor.div_(2**bits)
    return y


def lr_at(cfg: Training, step: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total``. Public.

    linear: (step + 1) / warmup * lr during warmup, then linear decay to 0 at ``total``.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


def flatten(tensors: list):
    return crypten.cat([t.reshape(-1) for t in tensors])


class SharedOptimizer:
    """One optimizer over the flattened trainable parameters (all shares)."""

    def __init__(self, cfg: Training, names: list[str], shapes: dict, scales: dict, like):
        self.cfg, self.names, self.shapes = cfg, list(names), {n: tuple(shapes[n]) for n in names}
        self.sizes = [math.prod(self.shapes[n]) for n in self.names]
        self.scale = torch.cat([
            (scales.get(n) if scales.get(n) is not None else torch.ones(1)).expand(self.shapes[n]).reshape(-1)
            for n in self.names]).double()
        total = sum(self.sizes)
        zero = lambda: crypten.cryptensor(torch.zeros(total), device=like.device)  # noqa: E731
        self.t = 0
        self.state = {"buf": zero()} if cfg.optimizer == "sgd" else {"m": zero(), "v": zero()}

    # ---------------------------------------------------------------- step
    def step(self, params: dict, grads: dict, lr: float) -> None:
        cfg, L = self.cfg, self.cfg.loss_scale
        g = mul_public(flatten([grads[n] for n in self.names]), self.scale)  # L * g_hf
        needs_w = cfg.weight_decay > 0
        w = flatten([params[n] for n in self.names]) if needs_w else None
        self.t += 1
        if cfg.optimizer == "sgd":
            if needs_w:  # coupled L2: g_hf += wd * w_hf
                g = g + mul_public(w, L * cfg.weight_decay / self.scale)
            buf = mul_public(self.state["buf"], cfg.momentum) + g if cfg.momentum else g
            self.state["buf"] = buf
            update = mul_public(buf, lr * self.scale / L)
        else:
            if cfg.optimizer == "adam" and needs_w:
                g = g + mul_public(w, L * cfg.weight_decay / self.scale)
            b1, b2 = cfg.betas
            m = mul_public(self.state["m"], b1) + mul_public(g, 1 - b1)
            v = mul_public(self.state["v"], b2) + mul_public(g.square(), 1 - b2)
            self.state["m"], self.state["v"] = m, v
            vhat = mul_public(v, 1 / (1 - b2**self.t)) + (L * cfg.eps) ** 2
            lo, hi = cfg.adam_v_range
            n = vhat.size(0)
            parts = [approx.inv_sqrt(vhat[i : i + INV_SQRT_CHUNK], lo, hi, 3) for i in range(0, n, INV_SQRT_CHUNK)]
            inv = parts[0] if len(parts) == 1 else crypten.cat(parts)
            update = mul_public(m * inv, lr / (1 - b1**self.t) * self.scale)
            if cfg.optimizer == "adamw" and needs_w:  # decoupled: w -= lr * wd * w
                update = update + mul_public(w, lr * cfg.weight_decay)
        offset = 0
        for name, size in zip(self.names, self.sizes):
            params[name] = params[name] - update[offset : offset + size].reshape(self.shapes[name])
            offset += size

    # ---------------------------------------------------------------- state
    def state_shares(self) -> dict:
        return {k: v for k, v in self.state.items()}

    def load_state_shares(self, state: dict, t: int) -> None:
        if set(state) != set(self.state):
            raise ValueError(f"optimizer state has {sorted(state)}, expected {sorted(self.state)}")
        self.state, self.t = dict(state), t
