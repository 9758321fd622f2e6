"""BERT, RoBERTa and DistilBERT encoders on secret shares.

One file for the encoder family: the public architecture (:class:`EncoderArch`,
derived by the model owner from the HF config and sent to every party), the
map from Hugging Face weight names to canonical ones (used by the model
owner alone), the public parameter shapes (used by everyone to receive
shares), and the secure forward pass, which follows ``modeling_bert.py``
line for line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .. import layers, offline
from ..config import Approximations
from ..errors import ModelError

FAMILIES = ("bert", "roberta", "distilbert")


@dataclass(frozen=True)
class EncoderArch:
    """Everything about the model that is public. Sent by the model owner."""

    family: str
    task: str  # "sequence-classification" or "embedding"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    position_offset: int  # RoBERTa counts positions from padding_idx + 1
    type_vocab: int
    eps: float
    act: str
    num_labels: int  # 0: embeddings are the output

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderArch":
        return cls(**d)

    @property
    def max_seq_len(self) -> int:
        return self.max_positions - self.position_offset


def arch_from_hf(cfg: dict, task: str, num_labels: int) -> EncoderArch:
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ModelError(
            f"model_type {family!r} is not an encoder family mpc_lm supports ({', '.join(FAMILIES)})"
        )
    if family == "distilbert":
        return EncoderArch(
            family, task, cfg["vocab_size"], cfg["dim"], cfg["n_layers"], cfg["n_heads"],
            cfg["hidden_dim"], cfg["max_position_embeddings"], 0, 0, 1e-12, cfg["activation"], num_labels,
        )
    if cfg.get("position_embedding_type", "absolute") not in (None, "absolute"):
        raise ModelError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported (absolute only)")
    offset = cfg.get("pad_token_id", 1) + 1 if family == "roberta" else 0
    return EncoderArch(
        family, task, cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"],
        cfg["num_attention_heads"], cfg["intermediate_size"], cfg["max_position_embeddings"],
        offset, cfg.get("type_vocab_size", 2), cfg.get("layer_norm_eps", 1e-12), cfg["hidden_act"], num_labels,
    )


# ------------------------------------------------------------------ weight names

_LAYER = {
    "bert": {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "out": "attention.output.dense", "ln1": "attention.output.LayerNorm",
        "ff1": "intermediate.dense", "ff2": "output.dense", "ln2": "output.LayerNorm",
    },
    "distilbert": {
        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
        "out": "attention.out_lin", "ln1": "sa_layer_norm",
        "ff1": "ffn.lin1", "ff2": "ffn.lin2", "ln2": "output_layer_norm",
    },
}
_LAYER["roberta"] = _LAYER["bert"]


def _prefixes(arch: EncoderArch) -> tuple[str, str]:
    base = "" if arch.task == "embedding" else f"{arch.family}."
    stack = "transformer.layer" if arch.family == "distilbert" else "encoder.layer"
    return base, stack


def param_shapes(arch: EncoderArch) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes, computable by every party."""
    h, i = arch.hidden, arch.intermediate
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (arch.vocab_size, h),
        "emb.pos": (arch.max_positions, h),
    }
    if arch.family != "distilbert":
        shapes["emb.type"] = (arch.type_vocab, h)
    shapes.update({"emb.ln.weight": (h,), "emb.ln.bias": (h,)})
    for n in range(arch.layers):
        shapes.update({
            f"l{n}.attn.qkv.weight": (h, 3 * h), f"l{n}.attn.qkv.bias": (3 * h,),
            f"l{n}.attn.out.weight": (h, h), f"l{n}.attn.out.bias": (h,),
            f"l{n}.ln1.weight": (h,), f"l{n}.ln1.bias": (h,),
            f"l{n}.ff1.weight": (h, i), f"l{n}.ff1.bias": (i,),
            f"l{n}.ff2.weight": (i, h), f"l{n}.ff2.bias": (h,),
            f"l{n}.ln2.weight": (h,), f"l{n}.ln2.bias": (h,),
        })
    if arch.num_labels:
        shapes.update({"head.pre.weight": (h, h), "head.pre.bias": (h,)} if arch.task != "embedding" else {})
        shapes.update({"head.out.weight": (h, arch.num_labels), "head.out.bias": (arch.num_labels,)})
    return shapes


def _head_names(arch: EncoderArch) -> dict[str, str]:
    if arch.task == "embedding":
        return {"head.out": "head"}
    return {
        "bert": {"head.pre": "bert.pooler.dense", "head.out": "classifier"},
        "roberta": {"head.pre": "classifier.dense", "head.out": "classifier.out_proj"},
        "distilbert": {"head.pre": "pre_classifier", "head.out": "classifier"},
    }[arch.family]


def canonical_state(hf: dict[str, torch.Tensor], arch: EncoderArch) -> dict[str, torch.Tensor]:
    """Model owner only: HF state dict -> canonical tensors (transposed, QKV fused, scaled).

    Raises ModelError naming the first missing weight or wrong shape.
    """
    base, stack = _prefixes(arch)
    emb = f"{base}embeddings."

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise ModelError(
                f"checkpoint has no weight {name!r}, which a {arch.family} "
                f"{arch.task} model with this config needs: the checkpoint does not match its config.json"
            )
        return hf[name].detach().to(torch.float32)

    out = {"emb.word": get(emb + "word_embeddings.weight"), "emb.pos": get(emb + "position_embeddings.weight")}
    if arch.family != "distilbert":
        out["emb.type"] = get(emb + "token_type_embeddings.weight")
    out["emb.ln.weight"], out["emb.ln.bias"] = get(emb + "LayerNorm.weight"), get(emb + "LayerNorm.bias")
    names = _LAYER[arch.family]
    scale = 1.0 / math.sqrt(arch.hidden // arch.heads)
    for n in range(arch.layers):
        pre = f"{base}{stack}.{n}."
        w = {k: get(pre + names[k] + ".weight") for k in ("q", "k", "v", "out", "ff1", "ff2")}
        b = {k: get(pre + names[k] + ".bias") for k in ("q", "k", "v", "out", "ff1", "ff2")}
        out[f"l{n}.attn.qkv.weight"] = torch.cat([w["q"] * scale, w["k"], w["v"]], 0).t()
        out[f"l{n}.attn.qkv.bias"] = torch.cat([b["q"] * scale, b["k"], b["v"]], 0)
        for k, dst in (("out", "attn.out"), ("ff1", "ff1"), ("ff2", "ff2")):
            out[f"l{n}.{dst}.weight"], out[f"l{n}.{dst}.bias"] = w[k].t(), b[k]
        for ln in ("ln1", "ln2"):
            out[f"l{n}.{ln}.weight"] = get(pre + names[ln] + ".weight")
            out[f"l{n}.{ln}.bias"] = get(pre + names[ln] + ".bias")
    if arch.num_labels:
        for dst, src in _head_names(arch).items():
            out[f"{dst}.weight"], out[f"{dst}.bias"] = get(src + ".weight").t(), get(src + ".bias")
    check_shapes(out, param_shapes(arch))
    return out


def check_shapes(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if name not in state:
            raise ModelError(f"canonical weight {name!r} is missing (internal conversion error)")
        if tuple(state[name].shape) != tuple(shape):
            raise ModelError(
                f"weight {name!r} has shape {tuple(state[name].shape)} but the architecture "
                f"config implies {tuple(shape)}: the checkpoint does not match its config.json"
            )


# ------------------------------------------------------------------ secure forward


def encode(p: dict, one_hot, mask, arch: EncoderArch, ap: Approximations, pool: bool = False, then=None):
    """Hidden states (B, T, H) of secret token ids (one-hot) and a secret 0/1 mask (B, T); with ``pool``, their
    mean over the real tokens (B, H), the last LayerNorm and the pooling as one protocol
    (:func:`mpc_lm.layers.layer_norm_mean_pool`); with ``then`` (a weight name), the hidden states and the
    first token's product with that linear layer, the last LayerNorm fused with it.

    Each LayerNorm that a linear layer reads (the next layer's fused QKV, FF1) is fused with it
    (:func:`mpc_lm.layers.layer_norm_linear`: one round fewer each where it applies).
    """
    seq = one_hot.size(1)
    x = layers.embed_tokens(one_hot, p["emb.word"])
    x = x + p["emb.pos"][arch.position_offset : arch.position_offset + seq]
    if "emb.type" in p:
        x = x + p["emb.type"][0]  # single-segment input: token type 0 (public)
    # The layers repeat: an offline plan records one block and one norm-and-projection edge and reuses
    # their dealer requests for the others (mpc_lm/offline.py segment); online they simply run.
    x, qkv = offline.segment("norm-linear", layers.layer_norm_linear, x, p["emb.ln.weight"], p["emb.ln.bias"],
                             arch.eps, p["l0.attn.qkv.weight"], p["l0.attn.qkv.bias"], ap)
    key_mask = mask.unsqueeze(1).unsqueeze(1)
    for n in range(arch.layers):
        ln = (offline.segment("encoder-block", _block, x, qkv, key_mask, layers.layer_weights(p, n), arch.heads,
                              arch.eps, arch.act, ap),
              p[f"l{n}.ln2.weight"], p[f"l{n}.ln2.bias"])
        if n < arch.layers - 1:
            x, qkv = offline.segment("norm-linear", layers.layer_norm_linear, *ln, arch.eps,
                                     p[f"l{n + 1}.attn.qkv.weight"], p[f"l{n + 1}.attn.qkv.bias"], ap)
        elif pool:
            return layers.layer_norm_mean_pool(*ln, mask, arch.eps, ap)
        elif then is not None:
            return layers.layer_norm_linear(*ln, arch.eps, p[f"{then}.weight"], p[f"{then}.bias"], ap,
                                            rows=lambda t: t[:, 0])
        else:
            x = layers.layer_norm(*ln, arch.eps, ap)
    return layers.mean_pool(x, mask, ap) if pool else x


def _block(x, qkv, key_mask, w: dict, heads: int, eps: float, act: str, ap: Approximations):
    """One encoder layer up to its second LayerNorm's input: attention (``qkv``: its fused projection, already
    made), the first LayerNorm fused with FF1, the activation, FF2. ``w``: the layer's weights, named without
    its ``l{n}.`` prefix."""
    attn = layers.self_attention(x, key_mask, w, "attn", heads, ap, qkv=qkv)
    x, h = layers.layer_norm_linear(x + attn, w["ln1.weight"], w["ln1.bias"], eps, w["ff1.weight"], w["ff1.bias"], ap)
    return x + layers.linear(layers.activation(h, act, ap), w["ff2.weight"], w["ff2.bias"])


def head(p: dict, hidden, mask, arch: EncoderArch, ap: Approximations, pre=None):
    """Logits (B, num_labels), or pooled embeddings (B, H) when the model has no head. For ``embedding``
    models ``hidden`` is already pooled (:func:`encode` with ``pool``); ``pre``: the classifier's first
    product, already made (:func:`encode` with ``then``)."""
    if arch.task == "embedding":
        if not arch.num_labels:
            return hidden
        return layers.linear(hidden, p["head.out.weight"], p["head.out.bias"])
    if pre is None:
        pre = layers.linear(hidden[:, 0], p["head.pre.weight"], p["head.pre.bias"])
    pre = layers.activation(pre, "relu", ap) if arch.family == "distilbert" else layers.tanh(pre, ap)
    return layers.linear(pre, p["head.out.weight"], p["head.out.bias"])


def forward(p: dict, one_hot, mask, arch: EncoderArch, ap: Approximations):
    if arch.task == "embedding":
        return head(p, encode(p, one_hot, mask, arch, ap, pool=True), mask, arch, ap)
    hidden, pre = encode(p, one_hot, mask, arch, ap, then="head.pre")
    return head(p, hidden, mask, arch, ap, pre=pre)
