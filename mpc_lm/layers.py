"""Secure transformer building blocks: each reads like its plaintext twin.

Inputs and parameters are CrypTen ``MPCTensor`` shares; shapes are public.
Linear weights are stored as (in, out) so a projection is one ``matmul``
(one round); the attention scale 1/sqrt(d) is folded into the query weights
at conversion time (see mpc_lm/convert.py), and Q, K, V are one fused
projection. Approximations come from :mod:`mpc_lm.approx` with the
parameters of :class:`mpc_lm.config.Approximations` passed in explicitly.
"""

from __future__ import annotations

from . import approx
from .premask import mm
from .config import Approximations

# LayerNorm variance range covered by the inverse square root's first guess:
# measured on all-MiniLM-L6-v2 and BERT-base, LayerNorm inputs have
# variances between 0.002 and 130 (docs/accuracy.md).
VAR_LO_EXP, VAR_HI_EXP = -12, 14

# ``Approximations.mode == "crypten"`` (the benchmark's stock-CrypTen baseline)
# masks padded keys by adding -128 before CrypTen's softmax. Not "-inf": CrypTen's
# exp is (1 + x/256)^256, which is < 1e-9 for -490 < x < -20 but overflows the
# ring below -512; -128 keeps masked keys inside that window for score ranges < 360.
STOCK_MASK_PENALTY = 128.0


def layer_weights(p: dict, n: int) -> dict:
    """Layer ``n``'s parameters, named without their ``l{n}.`` prefix (what a repeated layer is given:
    mpc_lm/offline.py ``segment``)."""
    prefix = f"l{n}."
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


def linear(x, weight, bias=None):
    """x @ W + b with W stored (in, out). Cost: 1 round.

    ``weight`` may be a :class:`mpc_lm.premask.MaskedWeight` (its mask opened once per
    model): then the round opens only ``x``'s mask."""
    y = mm(x, weight)
    return y if bias is None else y + bias


def layer_norm(x, gamma, beta, eps: float, ap: Approximations):
    """(x - mean) / sqrt(var + eps) * gamma + beta over the last dimension.

    Cost: 1 round (centered^2 and centered * gamma together) + C + 3 per inv_sqrt iteration,
    the last one folded into the product (:func:`mpc_lm.approx.scaled_inv_sqrt`).
    Stock CrypTen mode: 1 + CrypTen's inv_sqrt + 2.
    """
    centered = x - x.mean(dim=-1, keepdim=True)
    if ap.mode == "crypten":  # stock CrypTen (benchmark baseline): its own NR initial guess
        var = centered.square().mean(dim=-1, keepdim=True)
        return centered * ((var + eps).inv_sqrt() * gamma) + beta
    squares, scaled = approx.mul_batch([(centered, centered), (centered, gamma)])
    var = squares.mean(dim=-1, keepdim=True)
    return approx.scaled_inv_sqrt(var + eps, scaled, VAR_LO_EXP, VAR_HI_EXP, ap.inv_sqrt_iterations,
                                  ap.guess_steps_per_octave, ap.first_guess == "linear") + beta


def layer_norm_linear(x, gamma, beta, eps: float, weight, bias, ap: Approximations, rows=None):
    """``(y, linear(rows(y), weight, bias))`` for ``y = layer_norm(x, gamma, beta, eps, ap)`` in 5 rounds instead of
    5 + 1 where the linear first guess applies and ``ap.fuse_norm_linear`` (:func:`mpc_lm.approx.normalized_linear`:
    the product with the weight travels beside the variances' comparison, the row's scale is applied to both
    at the end); otherwise the two layers. ``rows`` (optional) picks the rows the linear layer reads."""
    if ap.mode != "crypten" and ap.first_guess == "linear" and ap.fuse_norm_linear:
        centered = x - x.mean(dim=-1, keepdim=True)
        fused = approx.normalized_linear(centered, gamma, beta, weight, eps, VAR_LO_EXP, VAR_HI_EXP,
                                         ap.guess_steps_per_octave, rows)
        if fused is not None:
            y, z = fused
            return y + beta, z if bias is None else z + bias
    y = layer_norm(x, gamma, beta, eps, ap)
    return y, linear(y if rows is None else rows(y), weight, bias)


def layer_norm_mean_pool(x, gamma, beta, mask, eps: float, ap: Approximations):
    """``mean_pool(layer_norm(x, gamma, beta, eps, ap), mask, ap)`` in 6 rounds instead of 5 + 4 where the linear
    first guess applies (:func:`mpc_lm.approx.normalized_mean`: the count's guess beside the LayerNorm, the mask
    on centered * gamma, the pooling sum as one product); otherwise the two layers. Mean pooling of normalised
    rows adds beta exactly: sum_t m_t beta / sum_t m_t = beta."""
    if ap.mode != "crypten" and ap.first_guess == "linear":
        centered = x - x.mean(dim=-1, keepdim=True)
        pooled = approx.normalized_mean(centered, gamma, eps, mask, VAR_LO_EXP, VAR_HI_EXP,
                                        max(1, mask.size(-1).bit_length()), ap.guess_steps_per_octave)
        if pooled is not None:
            return pooled + beta
    return mean_pool(layer_norm(x, gamma, beta, eps, ap), mask, ap)


def activation(x, name: str, ap: Approximations):
    if name in ("gelu", "gelu_new", "gelu_python", "gelu_pytorch_tanh"):
        if ap.gelu == "poly" and ap.mode != "crypten":  # stock CrypTen has no poly GELU: erf
            return approx.gelu(x)
        if ap.gelu in ("poly", "erf"):
            return x * (x.mul(0.7071067811865476).erf() + 1) * 0.5
        return x * (x * 1.702).sigmoid()
    if name == "relu":
        return x.relu() if ap.mode == "crypten" else approx.relu(x)
    raise ValueError(f"activation {name!r} has no secure implementation (gelu, relu)")


def split_heads(x, heads: int):
    """(B, T, H) -> (B, heads, T, H / heads). Local."""
    b, t, h = x.size()
    return x.reshape(b, t, heads, h // heads).permute(0, 2, 1, 3)


def merge_heads(x):
    """(B, heads, T, d) -> (B, T, heads * d). Local."""
    b, n, t, d = x.size()
    return x.permute(0, 2, 1, 3).reshape(b, t, n * d)


def self_attention(x, key_mask, p: dict, prefix: str, heads: int, ap: Approximations, qkv=None):
    """Multi-head self-attention with a secret padding mask.

    ``key_mask`` is (B, 1, 1, T), 1 for real tokens. Cost: 1 round (fused QKV; none when ``qkv``, the
    projection of ``x``, is given: :func:`layer_norm_linear`) + 1 (scores) + masked_softmax_matmul (the
    softmax and the context: masked_softmax's rounds under ``tables``, + 1 otherwise) + 1 (output projection).
    """
    if qkv is None:
        qkv = linear(x, p[f"{prefix}.qkv.weight"], p[f"{prefix}.qkv.bias"])
    hidden = x.size(-1)
    q, k, v = (split_heads(qkv[..., i * hidden : (i + 1) * hidden], heads) for i in range(3))
    scores = approx.matmul(q, k.transpose(-1, -2))  # 1/sqrt(d) already folded into W_q
    if ap.mode == "crypten":  # stock softmax; padding masked additively (see STOCK_MASK_PENALTY)
        context = merge_heads((scores + (key_mask - 1) * STOCK_MASK_PENALTY).softmax(-1).matmul(v))
    else:  # normalised after the product with V (approx.masked_softmax_matmul)
        context = merge_heads(approx.masked_softmax_matmul(scores, key_mask, v, ap.exp_iterations,
                                                           ap.reciprocal_iterations, ap.guess_steps_per_octave,
                                                           ap.max_arity, ap.exp, ap.first_guess == "linear"))
    return linear(context, p[f"{prefix}.out.weight"], p[f"{prefix}.out.bias"])


def embed_tokens(one_hot, table):
    """Embedding lookup of secret token ids as (B, T, V) one-hot @ (V, H). 1 round.

    The one-hot rows are shared with precision 0 (exact 0/1 integers), so the
    product needs no fixed-point truncation.
    """
    return mm(one_hot, table)


def mean_pool(hidden, mask, ap: Approximations):
    """Masked mean over tokens: sum(h * m) / sum(m). The count is private.

    Cost: 1 round + reciprocal of a count in [1, T].
    """
    m = mask.unsqueeze(-1)
    total = (hidden * m).sum(dim=1)
    count = m.sum(dim=1)
    seq = mask.size(-1)
    hi_exp = max(1, seq.bit_length())
    if ap.mode == "crypten":
        return total * count.reciprocal()
    return approx.scaled_reciprocal(count, total, -1, hi_exp, ap.reciprocal_iterations, ap.guess_steps_per_octave,
                                    coarse=True, linear=ap.first_guess == "linear")  # count <= T


def tanh(x, ap: Approximations):
    """tanh: :func:`mpc_lm.approx.tanh`, or CrypTen's stock ``tanh`` when ``ap.mode == "crypten"``."""
    return x.tanh() if ap.mode == "crypten" else approx.tanh(x)
