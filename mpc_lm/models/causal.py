"""Decoder-only (causal) language models on secret shares: what GPT-2 and Llama share.

The public architecture :class:`CausalArch` is derived by the model owner
(:mod:`mpc_lm.models.gpt2`, :mod:`mpc_lm.models.llama`) and sent to every
party. The secure forward pass takes

* ``one_hot`` (B, t, V): secret token ids, precision 0 (exact integers);
* ``pos_one_hot`` (B, t, P) (GPT-2 only): secret position ids, precision 0.
  Prompts are LEFT-padded to the public bucket, so a text's positions start
  at the (private) number of pad slots; the data owner shares them;
* ``key_mask`` (B, S): secret 0/1, 1 for real tokens, S covering every slot
  of the run (prompt bucket + tokens to generate);
* ``start``: public index of the first slot of this call (0 for the prompt,
  T + s when decoding step s with a cache).

Causality is public (slot j may see slot i <= j) and is multiplied into the
secret key mask share by share (exact, local). Llama's rotary embedding uses
the PUBLIC slot index as position: rotation by public cos/sin is a local
multiplication, and since RoPE depends only on position differences, the
left padding changes nothing (pad keys are masked). With a
:class:`KVCache` the keys and values of earlier slots stay in secret shares
and each decoding step processes one slot.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import torch

from .. import approx, layers, offline
from ..config import Approximations

# RMSNorm / LayerNorm input ranges for the inverse square root's first guess.
# Real decoders carry "massive activations" in a few channels of the residual
# stream: RMSNorm inputs of SmolLM2-135M have mean squares from 0.007 to 9.0e5
# (2^19.8; docs/causal-lm.md), hence the wide range.
NORM_LO_EXP, NORM_HI_EXP = -14, 22


@dataclass(frozen=True)
class CausalArch:
    """Everything about a causal LM that is public. Sent by the model owner."""

    family: str  # "gpt2" or "llama"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int
    eps: float
    act: str
    tied: bool
    qkv_bias: bool
    mlp_bias: bool
    inv_freq: tuple[float, ...] = field(default=())  # llama: RoPE frequencies (head_dim / 2)
    rope_scale: float = 1.0  # llama: HF's attention_scaling of cos/sin
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inv_freq"] = list(self.inv_freq)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CausalArch":
        return cls(**{**d, "inv_freq": tuple(d.get("inv_freq", ()))})

    @property
    def positions_secret(self) -> bool:
        return self.family == "gpt2"


def family_module(family: str):
    from . import gpt2, llama

    return {"gpt2": gpt2, "llama": llama}[family]


def param_shapes(arch: CausalArch) -> dict[str, tuple[int, ...]]:
    return family_module(arch.family).param_shapes(arch)


# ------------------------------------------------------------------ cache


class KVCache:
    """Per layer, keys and values (B, kv_heads, slots so far, head_dim) in secret shares."""

    def __init__(self, n_layers: int):
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].size(2)

    def extend(self, layer: int, k, v):
        if self.k[layer] is not None:
            k = approx_causal_cat(self.k[layer], k)
            v = approx_causal_cat(self.v[layer], v)
        self.k[layer], self.v[layer] = k, v
        return k, v


def approx_causal_cat(a, b):
    from .._compat import import_crypten

    return import_crypten().cat([a, b], dim=2)


# ------------------------------------------------------------------ blocks


def rms_norm(x, gamma, eps: float, ap: Approximations):
    """x / sqrt(mean(x^2) + eps) * gamma. Cost: 1 round (x^2 and x gamma together) + C + 3 per
    inv_sqrt iteration, the last folded into the product (:func:`mpc_lm.approx.scaled_inv_sqrt`)."""
    squares, scaled = approx.mul_batch([(x, x), (x, gamma)])
    ms = squares.mean(dim=-1, keepdim=True)
    return approx.scaled_inv_sqrt(ms + eps, scaled, NORM_LO_EXP, NORM_HI_EXP, ap.inv_sqrt_iterations,
                                  ap.guess_steps_per_octave)


def layer_norm(x, gamma, beta, eps: float, ap: Approximations):
    """(x - mean) / sqrt(var + eps) * gamma + beta; cost as :func:`rms_norm`."""
    centered = x - x.mean(dim=-1, keepdim=True)
    squares, scaled = approx.mul_batch([(centered, centered), (centered, gamma)])
    var = squares.mean(dim=-1, keepdim=True)
    return approx.scaled_inv_sqrt(var + eps, scaled, NORM_LO_EXP, NORM_HI_EXP, ap.inv_sqrt_iterations,
                                  ap.guess_steps_per_octave) + beta


def rope_tables(arch: CausalArch, start: int, length: int):
    """Public cos/sin (length, head_dim) for slots start .. start + length - 1."""
    inv = torch.tensor(arch.inv_freq, dtype=torch.float64)
    pos = torch.arange(start, start + length, dtype=torch.float64)
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * arch.rope_scale).float(), (emb.sin() * arch.rope_scale).float()


def apply_rope(x, cos, sin):
    """x cos + rotate_half(x) sin, x (B, heads, t, d), public cos/sin: local (1 truncation)."""
    from .._compat import import_crypten

    crypten = import_crypten()
    half = x.size(-1) // 2
    rotated = crypten.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.to(x.device), sin.to(x.device)  # x's device: also "meta" in an offline plan
    return x * cos + rotated * sin


def _heads(x, n: int, d: int):
    b, t, _ = x.size()
    return x.reshape(b, t, n, d).permute(0, 2, 1, 3)


def _repeat_kv(x, rep: int):
    """(B, kv, S, d) -> (B, kv * rep, S, d), head i using kv head i // rep (HF's repeat_kv). Local."""
    if rep == 1:
        return x
    b, kv, s, d = x.size()
    return x.unsqueeze(2).expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d)


def attention(x, p: dict, prefix: str, arch: CausalArch, ap: Approximations, key_mask, start: int,
              cache: KVCache | None, layer: int):
    """Causal (grouped-query) self-attention of slots start..start+t-1 over slots 0..start+t-1.

    Cost: 1 round (fused QKV) + 1 (scores) + masked_softmax_matmul (+ 1 for the context where the
    normalisation cannot follow the product) + 1 (output).
    """
    h, kv, d = arch.heads, arch.kv_heads, arch.head_dim
    t = x.size(1)
    qkv = layers.linear(x, p[f"{prefix}.qkv.weight"], p.get(f"{prefix}.qkv.bias"))
    q = _heads(qkv[..., : h * d], h, d)
    k = _heads(qkv[..., h * d : (h + kv) * d], kv, d)
    v = _heads(qkv[..., (h + kv) * d :], kv, d)
    if arch.inv_freq:
        cos, sin = rope_tables(arch, start, t)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.extend(layer, k, v)
    elif start:
        raise ValueError("decoding from a nonzero start needs a KV cache")
    total = k.size(2)
    k, v = _repeat_kv(k, h // kv), _repeat_kv(v, h // kv)
    scores = approx.matmul(q, k.transpose(-1, -2))  # (B, h, t, total); 1/sqrt(d) folded into W_q
    causal = (torch.arange(total)[None, :] <= torch.arange(start, start + t)[:, None]).long()
    mask = approx.mul_public_int(key_mask[:, :total].unsqueeze(1).unsqueeze(1), causal)
    context = layers.merge_heads(approx.masked_softmax_matmul(scores, mask, v, ap.exp_iterations,
                                                              ap.reciprocal_iterations, ap.guess_steps_per_octave,
                                                              ap.max_arity, ap.exp, ap.first_guess == "linear"))
    return layers.linear(context, p[f"{prefix}.out.weight"], p.get(f"{prefix}.out.bias"))


def run_layers(block, p: dict, x, key_mask, arch: CausalArch, ap: Approximations, start: int,
               cache: KVCache | None):
    """``x`` after every layer, ``block(x, w, key_mask, arch, ap, start, layer_cache)`` each with its weights
    ``w`` (named without the ``l{n}.`` prefix) and a one-layer view of ``cache``. An offline plan records one
    layer and reuses its dealer requests for the others (mpc_lm/offline.py segment)."""
    for n in range(arch.layers):
        k, v = (cache.k[n], cache.v[n]) if cache is not None else (None, None)
        x, k, v = offline.segment(f"{arch.family}-layer", functools.partial(_layer, block), x,
                                  layers.layer_weights(p, n), key_mask, arch, ap, start, cache is not None, k, v)
        if cache is not None:
            cache.k[n], cache.v[n] = k, v
    return x


def _layer(block, x, w: dict, key_mask, arch: CausalArch, ap: Approximations, start: int, cached: bool, k, v):
    """``block`` on one layer, its cached keys and values passed in and returned (no effect elsewhere)."""
    one = None
    if cached:
        one = KVCache(1)
        one.k[0], one.v[0] = k, v
    x = block(x, w, key_mask, arch, ap, start, one)
    return (x, one.k[0], one.v[0]) if cached else (x, None, None)


def forward_hidden(p: dict, one_hot, key_mask, arch: CausalArch, ap: Approximations, start: int = 0,
                   cache: KVCache | None = None, pos_one_hot=None):
    """Final hidden states (B, t, H), before the final norm."""
    return family_module(arch.family).hidden_states(p, one_hot, key_mask, arch, ap, start, cache, pos_one_hot)


def lm_head(p: dict, hidden, arch: CausalArch, ap: Approximations):
    """Final norm and vocabulary projection: logits (..., V). Cost: norm + 1 round."""
    return family_module(arch.family).head(p, hidden, arch, ap)


def logits(p: dict, one_hot, key_mask, arch: CausalArch, ap: Approximations, start: int = 0,
           cache: KVCache | None = None, pos_one_hot=None, last_only: bool = False):
    hidden = forward_hidden(p, one_hot, key_mask, arch, ap, start, cache, pos_one_hot)
    if last_only:
        hidden = hidden[:, -1]
    return lm_head(p, hidden, arch, ap)


def check_shapes(state: dict, shapes: dict) -> None:
    from .encoders import check_shapes as check

    check(state, shapes)


def attention_scale(arch: CausalArch) -> float:
    return 1.0 / math.sqrt(arch.head_dim)
