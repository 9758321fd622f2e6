"""Non-linear functions that causal language models need under MPC.

Same conventions as :mod:`mpc_lm.approx` (CrypTen ``MPCTensor`` inputs,
explicit parameters, cost in online rounds, ``C`` = one comparison, about
7-8 rounds). Tests: tests/test_causal_approx.py; figures: docs/causal-lm.md.

* :func:`silu` -- Llama's MLP activation, a Chebyshev fit like GELU's.
* :func:`log_ge1` -- natural log of values in [1, 2^k]: the exponent by one
  batched comparison, the mantissa by a polynomial. Used by the log-softmax.
* :func:`target_log_prob` -- log p(target) = z_t - logsumexp(z) without ever
  revealing a logit.
* :func:`argmax_one_hot` -- a secret one-hot of the maximum over the last
  dimension (a tournament tree, ties to the lower index like torch.argmax).
* :func:`gumbel_noise` -- Gumbel(0, 1) noise that no single party knows: each
  party shares Gumbel(-ln n, 1) noise of its own, the maximum of n of those
  is exactly Gumbel(0, 1) (max-stability).
* :func:`top_k_mask` -- a secret 0/1 mask of the k largest entries.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import torch

from . import approx
from .approx import mul_public_int
from ._compat import import_crypten

crypten = import_crypten()
from crypten.encoder import FixedPointEncoder  # noqa: E402

# ---------------------------------------------------------------- helpers


def reinterpret(x, precision_bits: int):
    """The same ring elements tagged with another fixed-point precision. Local, free.

    Lets fixed-point values travel in one batched multiplication with
    precision-0 (integer) tensors: multiplying raw ring elements by a 0/1
    integer needs no truncation, whatever scale they were meant to carry.
    """
    out = x.clone()
    out.encoder = FixedPointEncoder(precision_bits=precision_bits)
    return out


def _fixed_bits() -> int:
    return int(round(math.log2(FixedPointEncoder().scale)))


# ---------------------------------------------------------------- SiLU

SILU_BOUND, SILU_DEGREE = 11.0, 16


@lru_cache(maxsize=None)
def fit_silu(bound: float, degree: int) -> tuple[float, ...]:
    """Chebyshev coefficients of silu(x) - x/2 = (x/2) tanh(x/2) (an even function)
    in v = 2 (x/bound)^2 - 1, near-minimax on [-bound, bound] (deterministic IRLS)."""
    x = np.linspace(-bound, bound, 8001)
    v = 2 * (x / bound) ** 2 - 1
    basis = np.polynomial.chebyshev.chebvander(v, degree)
    target = 0.5 * x * np.tanh(0.5 * x)
    return tuple(float(c) for c in approx.minimax_fit(basis, target, 80))


def silu(x):
    """SiLU(x) = x sigmoid(x): 0 below -11, x above 11, x/2 + P(v) between.

    P is a degree-16 Chebyshev series in v = 2 (x/11)^2 - 1 fitted to
    (x/2) tanh(x/2) (fit error 1.2e-4); the tails err by at most
    11 sigmoid(-11) = 1.8e-4. Fixed point (16 bits) through the series: measured max
    error 7.5e-4, near |x| = 11 where |silu| ~ 11 (relative 7e-5). Cost: one C on 2 elements per input, 1 round
    for x^2, 4 for the series, 1 for the selection: C + 6 rounds.
    """
    lo, hi = approx.ge_many(x, [-SILU_BOUND, SILU_BOUND]).unbind(0)
    v = x.square() * (2 / SILU_BOUND**2) - 1
    inside = x * 0.5 + approx.chebyshev(v, fit_silu(SILU_BOUND, SILU_DEGREE))
    a, b = approx.mul_many([(lo - hi, inside), (hi, x)])
    return a + b


# ---------------------------------------------------------------- log


@lru_cache(maxsize=None)
def _ln_mantissa_coeffs(degree: int) -> tuple[float, ...]:
    t = np.linspace(-1, 1, 4001)
    return tuple(float(c) for c in np.polynomial.chebyshev.chebfit(t, np.log((t + 3) / 2), degree))


LN_DEGREE = 8


def log_ge1(x, hi_exp: int):
    """ln(x) for 1 <= x < 2^hi_exp.

    e = #{k in 1..hi_exp : x >= 2^k} (one batched comparison), r = x 2^-e in
    [1, 2) (2^-e is a secret linear combination of the 0/1 indicators with
    exact power-of-two coefficients, so one multiplication), then
    ln x = e ln 2 + P(2r - 3) with P a degree-8 Chebyshev fit of ln on [1, 2]
    (error 9e-8). Error ~ 2^-15 (fixed point of r). Cost: one C on hi_exp
    elements per input + 1 round + 3 rounds (series).
    """
    bits = _fixed_bits()
    if hi_exp > bits:
        raise ValueError(f"log_ge1 covers x < 2^{bits} at {bits}-bit precision, asked 2^{hi_exp}")
    ks = list(range(1, hi_exp + 1))
    ind = crypten.stack([x - float(2.0**k) for k in ks]).ge(0)  # (K, ...) precision-0 0/1
    exponent = approx.as_fixed(ind.sum(dim=0))
    # 2^bits * 2^-e = 2^bits + sum_k [x >= 2^k] (2^(bits-k) - 2^(bits-k+1)): exact integers
    weights = torch.tensor([(1 << (bits - k)) - (1 << (bits - k + 1)) for k in ks])
    weights = weights.reshape(len(ks), *([1] * (ind.dim() - 1)))
    scale = reinterpret(mul_public_int(ind, weights).sum(dim=0) + (1 << bits), bits)
    r = x * scale
    return exponent * math.log(2) + approx.chebyshev(r * 2 - 3, _ln_mantissa_coeffs(LN_DEGREE))


EXP_FLOOR, EXP_HALVINGS, EXP_DEGREE = 24.0, 2, 12


@lru_cache(maxsize=None)
def _exp_coeffs(floor: float, halvings: int, degree: int) -> tuple[float, ...]:
    t = np.linspace(-1, 1, 4001)
    y = (t - 1) * floor / 2 ** (halvings + 1)  # t in [-1, 1] <-> x in [-floor, 0]
    return tuple(float(c) for c in np.polynomial.chebyshev.chebfit(t, np.exp(y), degree))


def exp_log_softmax(x):
    """e^x for x <= 0, accurate enough for a log-softmax over a large vocabulary.

    x is clamped to >= -24 (e^-24 = 4e-11: even 10^5 such terms add < 4e-6 to
    a sum >= 1), then e^x = P(x / 4)^4 with P a degree-12 Chebyshev fit of
    e^y on [-6, 0] (error ~1e-8) and 2 squarings. Unlike
    (1 + x/256)^256 (relative error x^2/512, always low: 1.8 % at x = -3,
    which biases a logsumexp by ~0.01) the error is fixed point only: the
    base's error (a few 2^-16 from the series) grows 4-fold: measured absolute
    error 5.3e-4 (4 halvings with degree 8: 1.8e-3; 3 with 10: 9.4e-4).
    Cost: C + 1 (clamp) + 4 (series) + 2 (squarings) rounds.
    """
    shifted = x + EXP_FLOOR
    clamped = shifted * approx.as_fixed(shifted.ge(0)) - EXP_FLOOR  # max(x, -24)
    t = clamped * (2.0 / EXP_FLOOR) + 1
    result = approx.chebyshev(t, _exp_coeffs(EXP_FLOOR, EXP_HALVINGS, EXP_DEGREE))
    for _ in range(EXP_HALVINGS):
        result = result.square()
    return result


def target_log_prob(logits, target_one_hot):
    """log softmax(logits)[target] over the last dimension, never revealing a logit.

    ``target_one_hot`` is a precision-0 secret one-hot of the same shape.
    log p = (z_t - m) - ln(sum_j exp(z_j - m)) with m the row maximum
    (comparison tree, log2 V levels of C + 1), the exponentials by
    :func:`exp_log_softmax` (C + 7) and the sum, which lies in [1, V], through
    :func:`log_ge1` (C + 4). z_t costs one multiplication with the integer
    one-hot (exact, no truncation). Rounds: log2(V)(C + 1) + 2C + 12.
    """
    m = approx.row_max(logits)
    shifted = logits - m
    total = exp_log_softmax(shifted).sum(dim=-1)
    hi_exp = max(1, math.ceil(math.log2(logits.size(-1) + 1)))
    picked = (shifted * target_one_hot).sum(dim=-1)
    return picked - log_ge1(total, hi_exp)


# ---------------------------------------------------------------- argmax


ARGMAX_PAD = 2.0**14  # pads lose against every logit above -2^14


def argmax_one_hot(x):
    """(one-hot of the argmax over the last dim, precision 0; the maximum, fixed point).

    A tournament: the last dimension is padded to a power of two with -2^14,
    then each of log2(V) levels compares neighbouring winners a, b in one
    batched comparison, bit = [a >= b] (ties go to the lower index), and
    with ONE batched multiplication of the integer bit by the raw ring
    elements of [a - b | one-hot(a) | one-hot(b)] forms the new maximum
    b + bit (a - b) and the new one-hot [bit oh(a), oh(b) - bit oh(b)], whose
    width doubles. Level 0's one-hots are the public [1], [1]. Everything
    stays exact (integers times 0/1 bits); no party learns any comparison.

    With two parties under dealt comparison tables (``approx.comparison: tables``, the default) the
    comparison reads the whole 64-bit ring element (exact for any value, as CrypTen's circuit is) and
    the bit is multiplied while it is converted (:func:`mpc_lm.approx.bits_times`): 5 rounds per level
    (4 where the level's tables fit the wide form), against CrypTen's comparison and B2A plus the
    product (about 10). Cost: log2(V) levels of (C + 1 round).
    """
    n = x.size(-1)
    if n == 1:
        return _ones_like(x), x[..., 0]
    width = 1 << max(0, (n - 1).bit_length())
    if width > n:
        lead = tuple(x.size()[:-1])
        pad = (x[..., :1] * 0).expand(*lead, width - n) - ARGMAX_PAD
        x = crypten.cat([x, pad], dim=-1)
    bits_fixed = _fixed_bits()
    vals, onehot = x, None  # onehot: (..., pairs, block) precision 0
    while vals.size(-1) > 1:
        a, b = vals[..., 0::2], vals[..., 1::2]
        diff = a - b
        raw = reinterpret(diff, 0).unsqueeze(-1)
        if onehot is None:
            packed = crypten.cat([raw, _ones_like(raw)], dim=-1)  # (..., m, 2): [a - b | 1]
        else:
            packed = crypten.cat([raw, onehot[..., 0::2, :], onehot[..., 1::2, :]], dim=-1)
        bits = approx.ge_binary(diff, [0.0], lanes=(64, 0), form="wide")  # [a >= b], XOR shares, or None
        if bits is not None:  # one round: the bit converted inside its product
            (prod,) = approx.bits_times([(bits[0].unsqueeze(-1).expand(*packed.size()), packed)])
        else:  # CrypTen's comparison (its B2A included), then one product
            prod = packed * diff.ge(0).unsqueeze(-1)
        new_val = b + reinterpret(prod[..., 0], bits_fixed)
        if onehot is None:
            bit = prod[..., 1]
            new_oh = crypten.stack([bit, 1 - bit], dim=-1)  # (..., m, 2)
        else:
            block = onehot.size(-1)
            new_oh = crypten.cat([prod[..., 1 : 1 + block], onehot[..., 1::2, :] - prod[..., 1 + block :]], dim=-1)
        vals, onehot = new_val, new_oh
    oh = onehot.reshape(*onehot.size()[:-2], -1)
    return oh[..., :n], vals[..., 0]


def _ones_like(x):
    """A precision-0 sharing of ones with x's shape (rank 0 adds 1 to a zero sharing). Local."""
    out = reinterpret(x * 0, 0)
    return out + 1


def one_hot_to_ids(one_hot):
    """Secret ids from a precision-0 one-hot: a dot product with the public 0..V-1. Local."""
    v = one_hot.size(-1)
    out = mul_public_int(one_hot, torch.arange(v))
    return out.sum(dim=-1)


# ---------------------------------------------------------------- sampling


def party_generator(seed: int | None, rank: int, step: int) -> torch.Generator:
    """The local generator of one party's noise: ``os.urandom`` unless a (public, test) seed is given."""
    g = torch.Generator()
    if seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    else:
        g.manual_seed((seed * 1_000_003 + rank * 9_176 + step) & ((1 << 63) - 1))
    return g


def local_gumbel(shape, generator: torch.Generator, parties: int) -> torch.Tensor:
    """Gumbel(-ln n, 1) samples; the max of n independent such draws is Gumbel(0, 1)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u)) - math.log(parties)).to(torch.float32)


def gumbel_noise(shape, world_size: int, my_rank: int, seed: int | None, step: int, device):
    """Secret Gumbel(0, 1) noise: every party shares its own Gumbel(-ln n, 1) draw,
    the elementwise maximum is taken under MPC. Exact in distribution (up to
    fixed point); a party knows only a lower bound (its own draw) of each entry.
    Sharing is free; cost: (n - 1) x (C + 1 round).
    """
    from .offline import planning

    if planning():  # an offline plan's dry run: shapes only (mpc_lm/offline.py)
        device = "meta"
    total = None
    for src in range(world_size):
        if src == my_rank and torch.device(device).type != "meta":
            value = local_gumbel(shape, party_generator(seed, src, step), world_size)
        else:
            value = torch.zeros(shape)
        share = crypten.cryptensor(value.to(device), src=src, device=device)
        if total is None:
            total = share
        else:
            diff = share - total
            total = total + diff * approx.as_fixed(diff.ge(0))
    return total


TOPK_DROP = 2.0**12


def top_k_mask(x, k: int):
    """Secret 0/1 mask (precision 0) of the k largest entries of the last dim.

    k rounds of :func:`argmax_one_hot`, each winner pushed down by 2^12
    before the next. Cost: k (log2 V) (C + 1).
    """
    selected = None
    work = x
    for _ in range(k):
        oh, _ = argmax_one_hot(work)
        selected = oh if selected is None else selected + oh
        work = work - approx.as_fixed(oh) * TOPK_DROP
    return selected


def choose_next(logits, strategy: str, top_k: int, temperature: float, noise=None):
    """The next token as a secret one-hot (precision 0), chosen inside MPC.

    greedy: argmax(z). sample: argmax(z / T + g) over the top-k entries (all
    when k = 0) with g ~ Gumbel(0, 1) from :func:`gumbel_noise`
    (Gumbel-max: an exact sample of softmax(z / T) restricted to the top k).
    """
    if strategy == "greedy":
        return argmax_one_hot(logits)[0]
    scores = logits * (1.0 / temperature) + noise
    if top_k and top_k < logits.size(-1):
        keep = approx.as_fixed(top_k_mask(logits, top_k))
        scores = scores + (keep - 1) * TOPK_DROP
    return argmax_one_hot(scores)[0]
