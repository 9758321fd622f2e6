"""GPT-2 (``GPT2LMHeadModel``) on secret shares.

Learned absolute positions (looked up with a secret position one-hot, since
left padding makes a text's first position private), pre-LayerNorm blocks,
GELU MLP, and the vocabulary head tied to the token embedding. HF's Conv1D
weights are already stored (in, out); the attention scale 1/sqrt(d) (and
1/(layer+1) when ``scale_attn_by_inverse_layer_idx``) is folded into the
query columns of the fused QKV projection.
"""

from __future__ import annotations

import math

import torch

from .. import layers
from ..config import Approximations
from ..errors import ModelError
from . import causal
from .causal import CausalArch


def arch_from_hf(model) -> CausalArch:
    cfg = model.config
    if cfg.model_type != "gpt2":
        raise ModelError(f"model_type {cfg.model_type!r} is not gpt2")
    if getattr(cfg, "add_cross_attention", False):
        raise ModelError("GPT-2 with cross-attention is not a causal LM mpc_lm supports")
    h, heads = cfg.n_embd, cfg.n_head
    return CausalArch(
        family="gpt2", vocab_size=cfg.vocab_size, hidden=h, layers=cfg.n_layer, heads=heads,
        kv_heads=heads, head_dim=h // heads, intermediate=cfg.n_inner or 4 * h,
        max_positions=cfg.n_positions, eps=cfg.layer_norm_epsilon, act=cfg.activation_function,
        tied=True, qkv_bias=True, mlp_bias=True,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )


def param_shapes(arch: CausalArch) -> dict[str, tuple[int, ...]]:
    h, i = arch.hidden, arch.intermediate
    shapes = {"emb.word": (arch.vocab_size, h), "emb.pos": (arch.max_positions, h)}
    for n in range(arch.layers):
        shapes.update({
            f"l{n}.ln1.weight": (h,), f"l{n}.ln1.bias": (h,),
            f"l{n}.attn.qkv.weight": (h, 3 * h), f"l{n}.attn.qkv.bias": (3 * h,),
            f"l{n}.attn.out.weight": (h, h), f"l{n}.attn.out.bias": (h,),
            f"l{n}.ln2.weight": (h,), f"l{n}.ln2.bias": (h,),
            f"l{n}.ff1.weight": (h, i), f"l{n}.ff1.bias": (i,),
            f"l{n}.ff2.weight": (i, h), f"l{n}.ff2.bias": (h,),
        })
    shapes.update({"norm.weight": (h,), "norm.bias": (h,)})
    return shapes


def canonical_state(hf: dict[str, torch.Tensor], arch: CausalArch, hf_config=None) -> dict[str, torch.Tensor]:
    """Model owner only: GPT2LMHeadModel state dict -> canonical tensors."""

    def get(name: str) -> torch.Tensor:
        for key in (name, "transformer." + name):
            if key in hf:
                return hf[key].detach().to(torch.float32)
        raise ModelError(f"checkpoint has no weight {name!r}, which this GPT-2 config needs")

    by_layer = bool(getattr(hf_config, "scale_attn_by_inverse_layer_idx", False))
    scale_attn = bool(getattr(hf_config, "scale_attn_weights", True))
    h = arch.hidden
    out = {"emb.word": get("wte.weight"), "emb.pos": get("wpe.weight")}
    for n in range(arch.layers):
        pre = f"h.{n}."
        scale = (1.0 / math.sqrt(arch.head_dim)) if scale_attn else 1.0
        if by_layer:
            scale /= n + 1
        w, b = get(pre + "attn.c_attn.weight").clone(), get(pre + "attn.c_attn.bias").clone()
        w[:, :h] *= scale
        b[:h] *= scale
        out[f"l{n}.attn.qkv.weight"], out[f"l{n}.attn.qkv.bias"] = w, b
        out[f"l{n}.attn.out.weight"] = get(pre + "attn.c_proj.weight")
        out[f"l{n}.attn.out.bias"] = get(pre + "attn.c_proj.bias")
        out[f"l{n}.ff1.weight"], out[f"l{n}.ff1.bias"] = get(pre + "mlp.c_fc.weight"), get(pre + "mlp.c_fc.bias")
        out[f"l{n}.ff2.weight"] = get(pre + "mlp.c_proj.weight")
        out[f"l{n}.ff2.bias"] = get(pre + "mlp.c_proj.bias")
        for ln, src in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"l{n}.{ln}.weight"], out[f"l{n}.{ln}.bias"] = get(pre + src + ".weight"), get(pre + src + ".bias")
    out["norm.weight"], out["norm.bias"] = get("ln_f.weight"), get("ln_f.bias")
    causal.check_shapes(out, param_shapes(arch))
    return out


def hidden_states(p, one_hot, key_mask, arch: CausalArch, ap: Approximations, start, cache, pos_one_hot):
    if pos_one_hot is None:
        raise ValueError("GPT-2 needs the secret position one-hots")
    x = layers.embed_tokens(one_hot, p["emb.word"]) + layers.embed_tokens(pos_one_hot, p["emb.pos"])
    return causal.run_layers(block, p, x, key_mask, arch, ap, start, cache)


def block(x, w: dict, key_mask, arch: CausalArch, ap: Approximations, start: int, cache):
    """One GPT-2 layer (pre-norm attention and MLP); ``w``: its weights without the ``l{n}.`` prefix,
    ``cache``: this layer's keys and values (a one-layer :class:`causal.KVCache`) or None."""
    a = causal.layer_norm(x, w["ln1.weight"], w["ln1.bias"], arch.eps, ap)
    x = x + causal.attention(a, w, "attn", arch, ap, key_mask, start, cache, 0)
    m = causal.layer_norm(x, w["ln2.weight"], w["ln2.bias"], arch.eps, ap)
    m = layers.activation(layers.linear(m, w["ff1.weight"], w["ff1.bias"]), arch.act, ap)
    return x + layers.linear(m, w["ff2.weight"], w["ff2.bias"])


def head(p, hidden, arch: CausalArch, ap: Approximations):
    x = causal.layer_norm(hidden, p["norm.weight"], p["norm.bias"], arch.eps, ap)
    return layers.mm(x, p["emb.word"].t())
