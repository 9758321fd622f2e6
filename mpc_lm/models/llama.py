"""Llama (``LlamaForCausalLM``: Llama 2/3, SmolLM, TinyLlama...) on secret shares.

RMSNorm, grouped-query attention with rotary position embedding at PUBLIC
slot positions (local: a multiplication by public cos/sin), and the
SiLU-gated MLP with the gate and up projections fused into one matmul. The
RoPE frequencies (including any ``rope_scaling`` such as Llama 3's) are
taken from the loaded HF model by the model owner and sent as part of the
public architecture; 1/sqrt(head_dim) is folded into W_q.
"""

from __future__ import annotations

import math

import torch

from .. import approx_causal, layers
from ..config import Approximations
from ..errors import ModelError
from . import causal
from .causal import CausalArch

FAMILIES = ("llama",)


def arch_from_hf(model) -> CausalArch:
    cfg = model.config
    if cfg.model_type not in FAMILIES:
        raise ModelError(f"model_type {cfg.model_type!r} is not a Llama family model ({FAMILIES})")
    if cfg.hidden_act != "silu":
        raise ModelError(f"hidden_act {cfg.hidden_act!r} has no secure implementation (silu)")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rotary = model.model.rotary_emb
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, (list, tuple)) else cfg.eos_token_id
    return CausalArch(
        family="llama", vocab_size=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
        heads=heads, kv_heads=kv, head_dim=head_dim, intermediate=cfg.intermediate_size,
        max_positions=cfg.max_position_embeddings, eps=cfg.rms_norm_eps, act="silu",
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(cfg, "attention_bias", False)), mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        inv_freq=tuple(float(f) for f in rotary.inv_freq.double().tolist()),
        rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
        bos_token_id=cfg.bos_token_id, eos_token_id=eos,
    )


def param_shapes(arch: CausalArch) -> dict[str, tuple[int, ...]]:
    h, i, d = arch.hidden, arch.intermediate, arch.head_dim
    qkv = (arch.heads + 2 * arch.kv_heads) * d
    shapes = {"emb.word": (arch.vocab_size, h)}
    for n in range(arch.layers):
        shapes.update({
            f"l{n}.ln1.weight": (h,), f"l{n}.attn.qkv.weight": (h, qkv),
            f"l{n}.attn.out.weight": (arch.heads * d, h), f"l{n}.ln2.weight": (h,),
            f"l{n}.mlp.gate_up.weight": (h, 2 * i), f"l{n}.mlp.down.weight": (i, h),
        })
        if arch.qkv_bias:
            shapes[f"l{n}.attn.qkv.bias"] = (qkv,)
            shapes[f"l{n}.attn.out.bias"] = (h,)
        if arch.mlp_bias:
            shapes.update({f"l{n}.mlp.gate_up.bias": (2 * i,), f"l{n}.mlp.down.bias": (h,)})
    shapes["norm.weight"] = (h,)
    if not arch.tied:
        shapes["head.weight"] = (h, arch.vocab_size)
    return shapes


def canonical_state(hf: dict[str, torch.Tensor], arch: CausalArch, hf_config=None) -> dict[str, torch.Tensor]:
    """Model owner only: LlamaForCausalLM state dict -> canonical tensors (transposed, fused, scaled)."""

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise ModelError(f"checkpoint has no weight {name!r}, which this Llama config needs")
        return hf[name].detach().to(torch.float32)

    scale = 1.0 / math.sqrt(arch.head_dim)
    out = {"emb.word": get("model.embed_tokens.weight")}
    for n in range(arch.layers):
        pre = f"model.layers.{n}."
        a = pre + "self_attn."
        out[f"l{n}.ln1.weight"] = get(pre + "input_layernorm.weight")
        out[f"l{n}.ln2.weight"] = get(pre + "post_attention_layernorm.weight")
        out[f"l{n}.attn.qkv.weight"] = torch.cat(
            [get(a + "q_proj.weight") * scale, get(a + "k_proj.weight"), get(a + "v_proj.weight")], 0).t()
        out[f"l{n}.attn.out.weight"] = get(a + "o_proj.weight").t()
        if arch.qkv_bias:
            out[f"l{n}.attn.qkv.bias"] = torch.cat(
                [get(a + "q_proj.bias") * scale, get(a + "k_proj.bias"), get(a + "v_proj.bias")], 0)
            out[f"l{n}.attn.out.bias"] = get(a + "o_proj.bias")
        m = pre + "mlp."
        out[f"l{n}.mlp.gate_up.weight"] = torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")], 0).t()
        out[f"l{n}.mlp.down.weight"] = get(m + "down_proj.weight").t()
        if arch.mlp_bias:
            out[f"l{n}.mlp.gate_up.bias"] = torch.cat([get(m + "gate_proj.bias"), get(m + "up_proj.bias")], 0)
            out[f"l{n}.mlp.down.bias"] = get(m + "down_proj.bias")
    out["norm.weight"] = get("model.norm.weight")
    if not arch.tied:
        out["head.weight"] = get("lm_head.weight").t()
    causal.check_shapes(out, param_shapes(arch))
    return {k: v.contiguous() for k, v in out.items()}


def mlp(x, w: dict, arch: CausalArch):
    """down(silu(gate(x)) * up(x)) with a layer's weights ``w`` (no ``l{n}.`` prefix).
    Cost: 1 (fused gate/up) + silu (C + 6) + 1 + 1 rounds."""
    gu = layers.linear(x, w["mlp.gate_up.weight"], w.get("mlp.gate_up.bias"))
    i = arch.intermediate
    hidden = approx_causal.silu(gu[..., :i]) * gu[..., i:]
    return layers.linear(hidden, w["mlp.down.weight"], w.get("mlp.down.bias"))


def hidden_states(p, one_hot, key_mask, arch: CausalArch, ap: Approximations, start, cache, pos_one_hot=None):
    x = layers.embed_tokens(one_hot, p["emb.word"])
    return causal.run_layers(block, p, x, key_mask, arch, ap, start, cache)


def block(x, w: dict, key_mask, arch: CausalArch, ap: Approximations, start: int, cache):
    """One Llama layer (RMSNorm, grouped-query attention with RoPE, gated MLP); ``w``: its weights
    without the ``l{n}.`` prefix, ``cache``: this layer's keys and values (one-layer) or None."""
    a = causal.rms_norm(x, w["ln1.weight"], arch.eps, ap)
    x = x + causal.attention(a, w, "attn", arch, ap, key_mask, start, cache, 0)
    m = causal.rms_norm(x, w["ln2.weight"], arch.eps, ap)
    return x + mlp(m, w, arch)


def head(p, hidden, arch: CausalArch, ap: Approximations):
    x = causal.rms_norm(hidden, p["norm.weight"], arch.eps, ap)
    return layers.mm(x, p["emb.word"].t() if arch.tied else p["head.weight"])
