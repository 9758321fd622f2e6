"""Non-linear functions on secret shares, each with its cost and error.

All functions take CrypTen ``MPCTensor`` inputs and explicit parameters (no
global config is read here). Costs are per call, in *online rounds*: one
round is one batched opening between the computing parties (a Beaver
multiplication or one layer of a comparison circuit). With the TTP dealer,
party 0 additionally makes one request/response exchange with the dealer per
multiplication. ``C`` below stands for one comparison (CrypTen's ``_ltz``:
arithmetic-to-binary conversion with a log-depth adder, about 7-8 rounds,
and 64 binary AND triples per element). Error bounds are for exact
arithmetic; 16-bit fixed point adds about 2^-16 per multiplication.
Measured figures: docs/accuracy.md; tests: tests/test_approx.py.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from . import offline, ring, tables
from ._compat import import_crypten, plain_ring

crypten = import_crypten()
from crypten.encoder import FixedPointEncoder  # noqa: E402

# ---------------------------------------------------------------- helpers


def mul_public_int(x, t):
    """x * t for a public integer (or integer tensor, broadcasting), exactly: shares times t. Local.

    Unlike ``x * float``, which rounds the factor to the fixed-point grid, and ``x * int``,
    which CrypTen encodes and truncates, this multiplies the shares and keeps x's encoder.
    """
    out = x.clone()
    share = out._tensor.share
    # on the plain ring tensor: CrypTen's CUDALongTensor multiplies in place, so it cannot broadcast to a
    # larger shape (a causal mask (B, 1, 1, T) times (t, T))
    factor = torch.as_tensor(t).to(device=share.device, dtype=torch.long)
    out._tensor.share = _like(share, plain_ring(share) * factor)
    return out


def as_fixed(bits):
    """Re-encode a 0/1 comparison result (precision 0) as fixed point. Local, free."""
    encoder = FixedPointEncoder()
    out = mul_public_int(bits, int(encoder.scale))
    out.encoder = encoder
    return out


# ---------------------------------------------------------------- comparisons

#: How comparisons are computed: "tables" (lanes16's widths, each sign read from dealt tables: mpc_lm/tables.py),
#: "lanes16" (packed32, and 16-bit truncated lanes where ge0(coarse=True)), "packed32" (two 32-bit lanes per ring word;
#: 2 parties; inputs |x| < packed_limit(), 2^15 at 16 fractional bits) or "crypten" (CrypTen's 64-bit circuit). Set once
#: per process from ``approx.comparison`` by the party runtime (docs/performance.md).
COMPARISON = {"method": "crypten"}

#: The methods with 2-party packed circuits: "tables" has lanes16's widths, its signs from dealt tables.
_PACKED = ("packed32", "lanes16", "tables")


def packed_limit() -> float:
    """|x| (real units) below which packed32 comparisons are exact: 2^31 ring units."""
    return 2.0 ** (31 - crypten.cfg.encoder.precision_bits)


def _lane_mask(k: int, lane_bits: int = 32) -> int:
    """Bits k..lane_bits-1 of every lane of an int64, as a signed value."""
    lane = ((1 << lane_bits) - 1) ^ ((1 << k) - 1)
    word = 0
    for j in range(64 // lane_bits):
        word |= lane << (j * lane_bits)
    return word - (1 << 64) if word >= 1 << 63 else word


def _ltz_packed(x):
    """[x < 0] for |x| < 2^31 ring units, 2 parties: a 32-bit adder on two lanes per word.

    The low 32 bits of the two arithmetic shares are the two addends; their sum
    mod 2^32 is x mod 2^32, whose bit 31 is the sign when |x| < 2^31. The carry
    into bit 31 comes from a Kogge-Stone prefix over bits 0..30: one AND round for
    the generate bits, then 5 rounds (shifts 1, 2, 4, 8, 16) with the propagate
    and generate ANDs batched; then one opening for the bit's conversion to
    arithmetic (B2A). Two lanes per int64 halve the bytes of every AND.
    Rounds: 7. Bytes per element per party: about 2 x 8 x 10 / 2 + 8 = 88 (CrypTen's
    64-bit circuit: about 270).
    """
    return _ltz_lanes(x, 32, 0)


def _ltz_lanes(x, lane_bits: int, drop: int):
    """[x < 0] from bits [drop, drop + lane_bits) of each share, 64 / lane_bits lanes per word, 2 parties.

    floor(x0 / 2^drop) + floor(x1 / 2^drop) = floor(x / 2^drop) - c, c in {0, 1}, and the
    2^64 wrap of the share sum vanishes modulo 2^lane_bits (drop + lane_bits <= 64). So the
    adder's top bit is the sign of floor(x / 2^drop) - c: exact for |x| < 2^(drop + lane_bits - 1)
    ring units, except that x in [0, 2^drop) may read as negative. ``drop`` 0 is exact
    (:func:`_ltz_packed`). Rounds: 2 + log2(lane_bits) (AND layers) + 1 (B2A).
    """
    return _ltz_of_lanes(_lane_values(x, lane_bits, drop), lane_bits, x)


def _lane_values(x, lane_bits: int, drop: int) -> torch.Tensor:
    """This party's bits [drop, drop + lane_bits) of its share of x, as integers (local).

    The two parties' values add up to floor(x / 2^drop) - c mod 2^lane_bits, c in {0, 1}
    (see :func:`_ltz_lanes`); differences of them are shares of differences, exactly.
    """
    if drop + lane_bits > 64:
        raise ValueError(f"lanes of {lane_bits} bits from bit {drop} do not fit a 64-bit ring element")
    plain = plain_ring(x._tensor.share)
    return (plain >> drop) & ((1 << lane_bits) - 1) if lane_bits < 64 else plain


def _lane_adder(values: torch.Tensor, lane_bits: int):
    """Protocol (for :func:`lockstep`): the top bit of each lane of the sum of both parties' ``values``
    mod 2^lane_bits, as single-bit XOR shares (a BinarySharedTensor of ``values``' shape).

    A Kogge-Stone adder on 64 / lane_bits lanes per word: one AND round for the generate bits,
    then log2(lane_bits) rounds with the propagate and generate ANDs batched (the last one only
    the generate bits).
    """
    from crypten.mpc.primitives import BinarySharedTensor

    if 64 % lane_bits:
        raise ValueError(f"the adder packs lanes that divide 64 bits, not {lane_bits}")
    lanes = 64 // lane_bits
    rank = crypten.communicator.get().get_rank()
    size = values.size()
    n = values.numel()
    word = tables.pack_lanes(values.reshape(-1), lane_bits)
    zero = torch.zeros_like(word)
    mine = BinarySharedTensor.from_shares(word if rank == 0 else zero)
    theirs = BinarySharedTensor.from_shares(word if rank == 1 else zero)
    p0 = mine ^ theirs  # propagate bits: local
    p = p0
    (g,) = yield [("and", mine, theirs)]  # generate bits
    shifts = [1 << i for i in range(lane_bits.bit_length() - 1)]  # 1, 2, ..., lane_bits / 2
    for i, k in enumerate(shifts):
        mask = torch.tensor(_lane_mask(k, lane_bits), dtype=torch.long, device=word.device)
        g_shift = (g << k) & mask
        if i == len(shifts) - 1:  # the last level needs only the generate bits
            (pg,) = yield [("and", p, g_shift)]
            g = g ^ pg
        else:
            (both,) = yield [("and", BinarySharedTensor.stack([p, p]),
                              BinarySharedTensor.stack([g_shift, (p << k) & mask]))]
            g, p = g ^ both[0], both[1]
    top = p0 ^ (g << 1)  # the top bit of each lane: sum bit = propagate xor carry-in
    bits = BinarySharedTensor.stack([(top >> (j * lane_bits + lane_bits - 1)) & 1 for j in range(lanes)])
    return bits.permute(1, 0).reshape(-1)[:n].reshape(size)


def _sign(values: torch.Tensor, lane_bits: int):
    """Protocol: the top bit of each lane of the sum of both parties' ``values`` mod 2^lane_bits, as
    single-bit XOR shares. Under ``tables`` (when the provider deals them) by a dealt comparison table
    (mpc_lm/tables.py: 2 rounds for 16-bit lanes, 3 for 32); otherwise by :func:`_lane_adder`."""
    if COMPARISON["method"] == "tables":
        dealt = tables.key(values.numel(), lane_bits, values.device)
        if dealt is not None:
            return tables.sign_protocol(values, lane_bits, dealt)
    return _lane_adder(values, lane_bits)


def _converted(bits, like):
    """Single-bit XOR shares as 0/1 arithmetic shares of scale 1 (CrypTen's B2A, one round), in an
    MPCTensor cloned from ``like`` (same shape)."""
    from crypten.mpc.primitives.beaver import B2A_single_bit

    out = like.clone()
    out._tensor = B2A_single_bit(bits)
    out.encoder._scale = 1
    return out


def _ltz_of_lanes(values: torch.Tensor, lane_bits: int, like):
    """[v < 0] for v the lane-wise sum of both parties' ``values`` mod 2^lane_bits, read as signed:
    :func:`_sign`, then B2A. ``like``: an MPCTensor of the same shape, cloned for the result."""
    (bits,) = lockstep(_sign(values, lane_bits))
    return _converted(bits, like)


#: ``lanes16`` comparisons read bits COARSE_DROP .. COARSE_DROP+15 of the shares: |x| < 2^(COARSE_DROP-1)
#: real units (512), and x in [0, 2^(COARSE_DROP-16)) (2^-6) may read as negative.
COARSE_DROP = 10

#: Under ``tables`` the row max compares bits MAX_DROP .. MAX_DROP+9 of the shares (10-bit lanes, one
#: table chunk: the comparison is its opening alone): |differences| < 2^(MAX_DROP-7) real units (256),
#: and the winner may be up to 2 x 2^(MAX_DROP-16) (1.0) below the true maximum (softmax is shift-invariant).
MAX_LANES, MAX_DROP = 10, 15


def ge0(x, coarse: bool = False):
    """[x >= 0] as a 0/1 share with scale 1 (like CrypTen's ``ge``), by :data:`COMPARISON`.

    ``coarse=True`` marks callers whose result may flip for x in [0, 2^-6) (a piecewise function
    continuous at the threshold, a max of nearly equal values) with |x| < 512: under ``lanes16``
    they use the truncated 16-bit lanes.
    """
    method = COMPARISON["method"]
    if method in _PACKED and crypten.communicator.get().get_world_size() == 2:
        if coarse and method != "packed32":
            return 1 - _ltz_lanes(x, 16, COARSE_DROP)
        return 1 - _ltz_packed(x)
    return x.ge(0)


def ge_bits(x, thresholds, packed_ok: bool = True, coarse: bool = False, form: str = "narrow"):
    """[x >= t] for each public t as 0/1 shares of scale 1, shape (K, *x.shape), in ONE comparison call.

    ``packed_ok=False`` marks inputs that may exceed packed_limit(): CrypTen's 64-bit circuit, or
    under ``tables`` tables over the whole 64-bit ring element; ``coarse`` as in :func:`ge0`.
    Under ``tables``, one opening for all thresholds (:func:`_ge_protocol`).
    """
    if COMPARISON["method"] == "tables":
        bits = ge_binary(x, thresholds, coarse and packed_ok, lanes=None if packed_ok else (64, 0), form=form)
        if bits is not None:
            return _converted(bits, x.unsqueeze(0).expand(len(thresholds), *x.size()))
    t = torch.tensor([float(v) for v in thresholds], device=x.device).view(-1, *([1] * x.dim()))
    stacked = x.unsqueeze(0).expand(len(thresholds), *x.size()) - t
    return ge0(stacked, coarse) if packed_ok else stacked.ge(0)


def ge_many(x, thresholds, packed_ok: bool = True, coarse: bool = False):
    """[x >= t] for each public t, as fixed-point 0/1, in ONE comparison call.

    Cost: C on ``len(thresholds) * x.numel()`` elements, rounds of a single C.
    """
    return as_fixed(ge_bits(x, thresholds, packed_ok, coarse))


def _lanes(coarse: bool, lanes=None) -> tuple[int, int]:
    """(lane bits, dropped bits) of a packed comparison: ``lanes`` where the caller names them (under
    ``tables``), the truncated 16-bit lanes where ``coarse`` allows (not under ``packed32``), else the
    exact 32-bit lanes."""
    method = COMPARISON["method"]
    if method == "tables" and lanes is not None:
        return lanes
    return (16, COARSE_DROP) if coarse and method != "packed32" else (32, 0)


def _ge_protocol(x, thresholds, coarse: bool = False, lanes=None, form: str = "narrow"):
    """A :func:`lockstep` protocol for [x < t] for each public t as single-bit XOR shares (shape
    (K, *x.shape); flip with ``^ 1`` for [x >= t]), or None when :data:`COMPARISON` has no packed
    circuit here (CrypTen's circuit or more than two parties).

    Under ``tables`` all K thresholds share one opening and one table per element of x
    (:func:`mpc_lm.tables.sign_protocol`'s ``offsets``): the lanes are x's, and t, encoded, is
    subtracted from the opened value; with truncated lanes t rounds up to the lanes' grid, so
    x in [t, t + 2^(COARSE_DROP - 15)) may read as below t (2^-6 when t is on the grid, as GELU's are)."""
    method = COMPARISON["method"]
    if method not in _PACKED or crypten.communicator.get().get_world_size() != 2:
        return None
    lane_bits, drop = _lanes(coarse, lanes)
    if method == "tables":
        dealt = tables.key(x.numel(), lane_bits, x.device, form)
        if dealt is not None:
            encoded = (torch.tensor([float(v) for v in thresholds]) * x.encoder.scale).long()  # as CrypTen encodes t
            offsets = [-((-t) >> drop) for t in encoded.tolist()]  # ceil(t / 2^drop)
            return tables.sign_protocol(_lane_values(x, lane_bits, drop), lane_bits, dealt, offsets, form)
    t = torch.tensor([float(v) for v in thresholds], device=x.device).view(-1, *([1] * x.dim()))
    stacked = x.unsqueeze(0).expand(len(thresholds), *x.size()) - t
    return _sign(_lane_values(stacked, lane_bits, drop), lane_bits)


def ge_binary(x, thresholds, coarse: bool = False, lanes=None, form: str = "narrow"):
    """[x >= t] for each public t as single-bit XOR shares (BinarySharedTensor, shape (K, *x.shape)),
    before any conversion, for :func:`bits_times`; None when :data:`COMPARISON` has no packed
    circuit here (CrypTen's circuit or more than two parties): then use :func:`ge_many`.
    ``lanes`` (lane bits, dropped bits): other truncated lanes under ``tables`` (the row max's);
    ``form``: the tables' chunks (:func:`mpc_lm.tables.widths`): "wide" for few elements with many
    thresholds, "deep" for comparisons beside a longer protocol."""
    protocol = _ge_protocol(x, thresholds, coarse, lanes, form)
    return None if protocol is None else lockstep(protocol)[0] ^ 1


def mul_many(pairs):
    """Products of several same-shape pairs in one batched round."""
    if len(pairs) == 1:
        a, b = pairs[0]
        return [a * b]
    left = crypten.stack([a for a, _ in pairs])
    right = crypten.stack([b for _, b in pairs])
    return list((left * right).unbind(0))


def _like(template, share):
    """``share`` wrapped as CrypTen keeps ``template``'s shares (CUDALongTensor on the GPU)."""
    from crypten.cuda import CUDALongTensor

    return share if torch.is_tensor(template) else CUDALongTensor(share)


def merged_round(requests):
    """Several independent secure operations whose openings travel in ONE ``all_reduce``.

    Each request is one of:

    * ``("mul", x, y)``: x * y of two MPCTensors (any shapes, broadcasting as ``*``; ``y is x``
      is a square: one opening, CrypTen's square pair); recombined and truncated like CrypTen's
      ``mul``;
    * ``("and", x, y)``: x & y of two BinarySharedTensors (two parties only: the XOR of the
      masked words is read from their sum, which for two parties tells each party the other's
      masked word, as an XOR opening does);
    * ``("products", values, pairs)``: values[i] * values[j] for each (i, j) in ``pairs``, the
      values (MPCTensors of one shape) each opened ONCE however many products use them (a dealer
      mask per value and c = a_i a_j per pair); returns the list of products, truncated like ``mul``;
    * ``("matmul", x, y)``: x @ y of two MPCTensors (a Beaver matmul triple), truncated like ``mul``;
    * ``("sum", t, None)``: the sum over the parties of a plain int64 tensor ``t`` (an opening of
      values this party already masked, e.g. :func:`mpc_lm.tables.sign_protocol`'s c);
    * ``("bit_mul", b, v)``: b * v for single-bit XOR shares b and an MPCTensor v of the same
      shape, the bit's conversion included (two parties): with a dealer bit triple (r as XOR and
      arithmetic shares, a ring tensor b', c = r b'), z = b xor r is opened as packed bits (64 per
      word; each party reads the other's word from the sum) together with v - b', and
      b v = z v + (1 - 2 z)(r v) with r v = c + r (v - b'). No truncation (b is 0/1);
    * ``("bit_square", b, u)``: b * u^2 for single-bit XOR shares b and an MPCTensor u of the same
      shape (two parties): with a dealer bit-square tuple (r as XOR and arithmetic shares, a mask
      a of u, a^2, r a, r a^2), z = b xor r (packed bits) and d = u - a are opened together;
      u^2 = d^2 + 2 d a + a^2, r u^2 = r d^2 + 2 d (r a) + r a^2, and b u^2 = z u^2 + (1 - 2 z) r u^2,
      truncated once like a square;
    * ``("select4", bits, cols)``: the winner of each group of four, sum_i W_i x_i, from the six pairwise
      bits [x_i >= x_j] (i < j, in :data:`GROUP_PAIRS` order; single-bit XOR shares, shape (6, *g)) and the
      values ``cols`` (an MPCTensor (4, *g)), W_i the AND of x_i's three wins (two parties): the six
      z_p = b_p xor r_p (packed bits) and the four d_i = x_i - a_i are opened together; each W_i is a
      polynomial in its three r_p with public coefficients, so W_i x_i = sum_S coef_S (d_i r_S + r_S a_i)
      with the products r_S and r_S a_i dealt (:func:`select4_correlations`). No truncation;
    * ``("bit_mul_b2a", b, v)``: ``bit_mul``'s b * v and, from the same opening and bit triple, b itself
      as 0/1 arithmetic shares of scale 1 (CrypTen's B2A: b = z + (1 - 2 z) r), as one result: the pair
      (b, b v) of MPCTensors shaped like v.
    * ``("select_fma", bits, values)``: m (L + U W) + h X for single-bit XOR shares ``bits`` (2, *s) = (m, h)
      and the MPCTensor ``values`` (4, *s) = (L, U, W, X) (two parties): z = bits xor r (packed bits) and
      d = values - a are opened together; with the dealt r_m, r_h, a_U a_W, r_m (a_U a_W + 2^16 a_L),
      r_m a_U, r_m a_W, r_h a_X (:func:`select_fma_correlations`) each party forms its shares of
      S = U W + 2^16 L (L lifted to the product's scale) and of r_m S, m S = z_m S + (1 - 2 z_m) r_m S
      truncated once (an exact 0 where m = 0), and h X as ``bit_mul`` does. A piecewise function's
      selection folded into its polynomial's last product (:func:`gelu`);
    * ``("wmatmul", x, W)``: x @ W for a :class:`mpc_lm.premask.MaskedWeight` W (its mask opened once per
      model): the dealer's a and c = a @ B, only d = x - a opened (:func:`mpc_lm.premask.matmul` is this
      request alone); a W that is a plain MPCTensor takes ``matmul``'s Beaver triple instead.

    Returns the results in order (MPCTensor, BinarySharedTensor, plain tensor, MPCTensor).
    """
    provider = crypten.mpc.get_default_provider()
    c = crypten.communicator.get()
    first = c.get_rank() == 0
    # a weight without an opened mask (preprocessing.weight_masks off) takes a Beaver triple
    requests = [("matmul" if kind == "wmatmul" and not hasattr(y, "d_factor") else kind, x, y)
                for kind, x, y in requests]
    dealt, masked = [], []
    for kind, x, y in requests:
        if kind == "sum":
            dealt.append(None)
            masked.append(x)
        elif kind == "wmatmul":
            a, cc, a_e = provider.masked_triple(tuple(x.size()), y, device=x.device)
            dealt.append((a, cc, a_e))
            masked.append(plain_ring(x._tensor.share) - plain_ring(a.share))
        elif kind == "products":
            a, cc = _dealt(provider, "product_triples", _tfp_product_triples, x[0].size(), len(x), y,
                           device=x[0].device)
            dealt.append((a, cc))
            masked.append(torch.stack([plain_ring(v._tensor.share) for v in x]) - a)
        elif kind == "matmul":
            a, b, cc = provider.generate_additive_triple(x.size(), y.size(), "matmul", device=x.device)
            dealt.append((a, b, cc))
            masked += [plain_ring(x._tensor.share) - plain_ring(a.share), plain_ring(y._tensor.share) - plain_ring(b.share)]
        elif kind == "mul" and y is x:
            r, r2 = provider.square(x.size(), device=x.device)
            dealt.append((r, r2))
            masked.append(plain_ring(x._tensor.share) - plain_ring(r.share))
        elif kind == "mul":
            a, b, cc = provider.generate_additive_triple(x.size(), y.size(), "mul", device=x.device)
            dealt.append((a, b, cc))
            masked += [plain_ring(x._tensor.share) - plain_ring(a.share), plain_ring(y._tensor.share) - plain_ring(b.share)]
        elif kind == "and":
            if c.get_world_size() != 2:
                raise ValueError("merged binary ANDs need exactly two computing parties")
            a, b, cc = provider.generate_binary_triple(x.size(), y.size(), device=x.device)
            dealt.append((a, b, cc))
            masked += [plain_ring((x ^ a).share), plain_ring((y ^ b).share)]
        elif kind in ("bit_mul", "bit_mul_b2a"):
            _bits_beside(kind, x, y, c)
            r_bin, r_arith, b, cc = _dealt(provider, "bit_triple", _tfp_bit_triple, x.size(), device=y.device)
            dealt.append((r_arith, cc))
            masked += [_masked_bits(x, r_bin), plain_ring(y._tensor.share) - plain_ring(b.share)]
        elif kind == "bit_square":
            _bits_beside(kind, x, y, c)
            r_bin, a, tail = _dealt(provider, "bit_square", _tfp_bit_square, x.size(), device=y.device)
            dealt.append((a, tail))
            masked += [_masked_bits(x, r_bin), plain_ring(y._tensor.share) - plain_ring(a.share)]
        elif kind in _SELECTIONS:
            bit_rows, tfp_draw, _, what = _SELECTIONS[kind]
            if y.size(0) != 4:
                raise ValueError(f"{kind} needs {what} stacked (4, *s), not {tuple(y.size())}")
            _bits_beside(kind, x, y, c, (bit_rows, *y.size()[1:]))
            r_bin, a, tail = _dealt(provider, kind, tfp_draw, y.size()[1:], device=y.device)
            dealt.append((a, tail))
            masked += [_masked_bits(x, r_bin), plain_ring(y._tensor.share) - plain_ring(a.share)]
        else:
            raise ValueError(f"unknown merged request {kind!r}")
    flat = c.all_reduce(torch.cat([m.reshape(-1) for m in masked]))
    opened, offset = [], 0
    for m in masked:
        opened.append(flat[offset : offset + m.numel()].view(m.size()))
        offset += m.numel()
    out, k = [], 0  # k: the request's first masked tensor
    for (kind, x, y), rnd in zip(requests, dealt):
        if kind == "sum":
            out.append(opened[k])
            k += 1
        elif kind == "wmatmul":  # x W = c + d B + a E (+ d E at party 0: its d_factor is its share of B plus E)
            (a, cc, a_e), d = rnd, opened[k]  # a_e: this party's a E, made in the offline phase (or None)
            k += 1
            if a_e is None:
                a_e = ring.matmul(plain_ring(a.share), plain_ring(y.opened))
            z = plain_ring(cc.share) + ring.matmul(d, plain_ring(y.d_factor)) + plain_ring(a_e)
            out.append(finish_product(x, y.encoder, z))
        elif kind == "products":  # v_i v_j = c + e_i a_j + a_i e_j + e_i e_j
            (a, cc), e = rnd, opened[k]
            k += 1
            products = []
            for p, (i, j) in enumerate(y):
                z = cc[p] + e[i] * a[j] + a[i] * e[j]
                if first:
                    z = z + e[i] * e[j]
                products.append(finish_product(x[i], x[j]._tensor.encoder, z))
            out.append(products)
        elif kind == "and":
            # the other party's masked word is the sum minus mine; the opening is their XOR
            e, d = (masked[i] ^ (opened[i] - masked[i]) for i in (k, k + 1))
            k += 2
            a, b, cc = rnd
            z = plain_ring(cc.share) ^ (e & plain_ring(b.share)) ^ (plain_ring(a.share) & d)
            if first:
                z = z ^ (e & d)
            result = cc.shallow_copy()
            result.share = _like(cc.share, z)
            out.append(result)
        elif kind in ("bit_mul", "bit_mul_b2a"):
            # z = b xor r from the packed words (the other party's: the sum minus mine); r v = c + r dlt
            zbit = _opened_bits(masked[k], opened[k], x)
            dlt = opened[k + 1]
            k += 2
            r_arith, cc = rnd
            r = plain_ring(r_arith.share)
            result = y.clone()
            result._tensor.share = _like(y._tensor.share, _bit_times(zbit, plain_ring(y._tensor.share),
                                                                     plain_ring(cc.share) + r * dlt))
            if kind == "bit_mul":
                out.append(result)
                continue
            bit = (1 - 2 * zbit) * r + (zbit if first else 0)
            ints = y.clone()
            ints._tensor.share = _like(y._tensor.share, bit)
            ints.encoder = FixedPointEncoder(precision_bits=0)
            out.append((ints, result))
        elif kind == "bit_square":
            zbit = _opened_bits(masked[k], opened[k], x)
            d = opened[k + 1]
            k += 2
            a, tail = rnd  # tail: r, a^2, r a, r a^2 (arithmetic shares, stacked)
            r, a2, ra, ra2 = plain_ring(tail).unbind(0)
            square = a2 + 2 * d * plain_ring(a.share)
            if first:
                square = square + d * d
            r_square = ra2 + 2 * d * ra + d * d * r
            z = _bit_times(zbit, square, r_square)
            out.append(finish_product(y, y._tensor.encoder, z))
        elif kind == "matmul":  # x y = c + eps b + a dlt + eps dlt, as matrix products
            (a, b, cc), eps, dlt = rnd, opened[k], opened[k + 1]
            k += 2
            # party 0 folds the public eps dlt into eps (b + dlt): two ring products per party, not three
            right = plain_ring(b.share) + dlt if first else plain_ring(b.share)
            z = plain_ring(cc.share) + ring.matmul(eps, right) + ring.matmul(plain_ring(a.share), dlt)
            out.append(finish_product(x, y._tensor.encoder, z))
        elif kind in _SELECTIONS:  # bits and values from one opening, combined with the dealt tail
            zbits, d = _opened_bits(masked[k], opened[k], x), opened[k + 1]
            k += 2
            (a, tail), combine = rnd, _SELECTIONS[kind][2]
            result = y[0].clone()
            z = combine(zbits, d, plain_ring(a.share), plain_ring(tail), first)
            result._tensor.share = _like(y._tensor.share, z)
            out.append(result)
        elif y is x:  # x^2 = r^2 + 2 eps r + eps^2
            (r, r2), eps = rnd, opened[k]
            k += 1
            z = plain_ring(r2.share) + 2 * eps * plain_ring(r.share)
            if first:
                z = z + eps * eps
            out.append(finish_product(x, x._tensor.encoder, z))
        else:  # x y = c + eps b + a dlt + eps dlt
            (a, b, cc), eps, dlt = rnd, opened[k], opened[k + 1]
            k += 2
            z = plain_ring(cc.share) + eps * plain_ring(b.share) + plain_ring(a.share) * dlt
            if first:
                z = z + eps * dlt
            out.append(finish_product(x, y._tensor.encoder, z))
    return out


def _bits_beside(kind: str, bits, values, c, shape=None) -> None:
    """Check a merged request that opens single bits beside values: two parties, a bit per value
    (or the bits' ``shape``, for ``select4``)."""
    if c.get_world_size() != 2:
        raise ValueError(f"merged {kind} needs exactly two computing parties")
    want = tuple(values.size()) if shape is None else tuple(shape)
    if tuple(bits.size()) != want:
        raise ValueError(f"{kind} needs bits of shape {want}, not {tuple(bits.size())}")


def _masked_bits(bits, r_bin) -> torch.Tensor:
    """This party's share of b xor r (single bits) packed 64 per word: the other party reads it from
    the sum of the words (its own subtracted), as an XOR opening would tell it."""
    return tables.pack_bits((plain_ring((bits ^ r_bin).share) & 1).reshape(-1))


def _opened_bits(mine: torch.Tensor, total: torch.Tensor, bits) -> torch.Tensor:
    """The opened b xor r of :func:`_masked_bits`, shaped like ``bits``: my words XOR the other's."""
    return tables.unpack_bits(mine ^ (total - mine), bits.numel()).view(bits.size())


def _dealt(provider, name: str, tfp_draw, *args, device=None):
    """The provider's ``name(*args, device=device)`` (mpc_lm/offline.py's dealer), or under the
    insecure TFP provider ``tfp_draw(*args, device)``: party 0 draws and shares (CrypTen's TFP
    convention)."""
    source = offline.dealt_by(name)
    if source == "dealer":
        return getattr(provider, name)(*args, device=device)
    if source is None:
        raise RuntimeError(f"provider {type(provider).__name__} has no {name}: install mpc_lm.offline's "
                           "PlannedDealer (the party runtime does) or use TFP in development")
    return tfp_draw(*args, device)


# The correlations the dealer deals, as plain functions of its random values: the planned dealer
# (mpc_lm/dealer.py) and, under the insecure TFP provider, party 0 (the ``_tfp_*`` draws) use them alike.


def product_correlations(a: torch.Tensor, pairs) -> torch.Tensor:
    """a_i a_j for each pair (i, j) of the masks a (m, *size): ``products``."""
    return torch.stack([a[i] * a[j] for i, j in pairs])


def bit_correlations(r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(r, r b) for random bits r and a mask b: ``bit_mul``."""
    return torch.stack([r, r * b])


def bit_square_correlations(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(r, a^2, r a, r a^2) for random bits r and a mask a: ``bit_square``."""
    return torch.stack([r, a * a, r * a, r * a * a])


def _tfp_deal(bit_size, mask_size, correlations, device):
    """Under TFP: party 0 draws random bits r and ring masks a and shares r (XOR), a and correlations(r, a)."""
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor

    r = plain_ring(generate_kbit_random_tensor(bit_size, bitlength=1, device=device))
    a = plain_ring(generate_random_ring_element(mask_size, device=device))
    return (BinarySharedTensor(r, src=0), ArithmeticSharedTensor(a, precision=0, src=0),
            plain_ring(ArithmeticSharedTensor(correlations(r, a), precision=0, src=0).share))


def _tfp_product_triples(size, m, pairs, device):
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.primitives import ArithmeticSharedTensor

    a = plain_ring(generate_random_ring_element((m, *size), device=device))
    return tuple(plain_ring(ArithmeticSharedTensor(t, precision=0, src=0).share)
                 for t in (a, product_correlations(a, pairs)))


def _tfp_bit_triple(size, device):
    from crypten.mpc.primitives import ArithmeticSharedTensor

    r_bin, b, tail = _tfp_deal(size, size, bit_correlations, device)
    r_arith, c = tail.unbind(0)
    return r_bin, ArithmeticSharedTensor.from_shares(r_arith, precision=0), b, \
        ArithmeticSharedTensor.from_shares(c, precision=0)


def _tfp_bit_square(size, device):
    return _tfp_deal(size, size, bit_square_correlations, device)


#: The pairs (i, j), i < j, of a group of four whose bits [x_i >= x_j] ``select4`` takes, in order.
GROUP_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


#: Per element i of a group of four: its three pairs (indices into GROUP_PAIRS), each with 1 where i
#: wins the pair when its bit is 0 (i is the pair's second element: [x_j > x_i] = [x_i >= x_j] xor 1).
GROUP_LITERALS = tuple(tuple((n, int(pi != i)) for n, (pi, pj) in enumerate(GROUP_PAIRS) if i in (pi, pj))
                       for i in range(4))


def select4_correlations(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The dealer's plain values for ``select4``: r (6, *g) random bits of the pairs, a (4, *g) the values'
    masks; returns (50, *g): the six r_p, then per element i the products of its pairs' r over the
    subsets of two and three (4 each), then per element the seven r_S a_i (S non-empty, by bitmask)."""
    lits = GROUP_LITERALS
    singles = [r[p] for p in range(6)]
    products, times = [], []
    for i in range(4):
        mine = [r[p] for p, _ in lits[i]]
        subset = {m: math.prod(mine[b] for b in range(3) if m >> b & 1) for m in range(1, 8)}
        products += [subset[m] for m in (3, 5, 6, 7)]
        times += [subset[m] * a[i] for m in range(1, 8)]
    return torch.stack(singles + products + times)


#: Per element i of a group of four: the rows of z holding its three literals' bits, and their flips.
_LIT_ROWS = torch.tensor([[p for p, _ in lits] for lits in GROUP_LITERALS])
_LIT_FLIPS = torch.tensor([[f for _, f in lits] for lits in GROUP_LITERALS])
#: Per element i and subset m = 1..7 of its literals (bitmask): the row of ``tail`` holding r_m's share.
_SUBSET_ROWS = torch.tensor([[GROUP_LITERALS[i][m.bit_length() - 1][0] if m & (m - 1) == 0
                              else 6 + 4 * i + (3, 5, 6, 7).index(m) for m in range(1, 8)] for i in range(4)])
#: Up to this many groups :func:`_select4_combine` works on all four elements and eight subsets at once
#: (a dozen tensor calls instead of ~120: a generation step's small selections, where each call's
#: dispatch is the cost); above it, on a CPU, the element-by-element form, whose temporaries stay in the
#: cache. On a GPU always at once: there each call is a kernel launch.
SELECT4_STACKED_MAX = 16384


def _select4_combine(z: torch.Tensor, d: torch.Tensor, a: torch.Tensor, tail: torch.Tensor, first: bool):
    """This party's share of sum_i W_i x_i (``select4``) from the opened z (6, *g) and d (4, *g), its
    shares of the masks a (4, *g) and of :func:`select4_correlations`' values ``tail`` (50, *g)."""
    if d[0].numel() <= SELECT4_STACKED_MAX or d.device.type != "cpu":
        return _select4_stacked(z, d, a, tail, first)
    lits = GROUP_LITERALS
    total = torch.zeros_like(d[0])
    for i in range(4):
        zs = [z[p] ^ flip for p, flip in lits[i]]  # the literal's opened value z' = b' xor r
        r_share = {1 << b: tail[p] for b, (p, _) in enumerate(lits[i])}
        for n, m in enumerate((3, 5, 6, 7)):
            r_share[m] = tail[6 + 4 * i + n]
        x_share = a[i] + d[i] if first else a[i]
        coef0 = zs[0] * zs[1] * zs[2]  # every literal from its opened value
        total = total + coef0 * x_share
        for m in range(1, 8):  # literal = z' + (1 - 2 z') r: r's part for the positions in m
            coef = math.prod((1 - 2 * zs[b]) if m >> b & 1 else zs[b] for b in range(3))
            total = total + coef * (d[i] * r_share[m] + tail[22 + 7 * i + m - 1])
    return total


def _select4_stacked(z, d, a, tail, first: bool):
    """:func:`_select4_combine` with the four elements and their subsets as tensor dimensions (bit-identical:
    the same ring products, summed modulo 2^64 in another order)."""
    g = d.shape[1:]
    dev = z.device
    zs = z[_LIT_ROWS.view(-1).to(dev)].view(4, 3, *g) ^ _LIT_FLIPS.to(dev, z.dtype).view(4, 3, *(1,) * len(g))
    both = torch.stack((zs, 1 - 2 * zs), dim=2)  # (4, 3, 2, *g): literal b's factor when m's bit b is 0 / 1
    coef = (both[:, 2, :, None, None] * both[:, 1, None, :, None] * both[:, 0, None, None, :]).reshape(4, 8, *g)
    x_share = a + d if first else a
    r = tail[_SUBSET_ROWS.view(-1).to(dev)].view(4, 7, *g)  # a copy, worked on in place
    r.mul_(d.unsqueeze(1)).add_(tail[22:50].view(4, 7, *g)).mul_(coef[:, 1:])
    return r.sum((0, 1)).add_(coef[:, 0].mul_(x_share).sum(0))


def _tfp_select4(size, device):
    return _tfp_deal((6, *size), (4, *size), select4_correlations, device)


def select_fma_correlations(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The dealer's plain values for ``select_fma``: r (2, *s) the bits' masks (r_m, r_h), a (4, *s) the masks of
    (L, U, W, X); returns (7, *s): r_m, r_h, a_U a_W, r_m (a_U a_W + 2^16 a_L), r_m a_U, r_m a_W, r_h a_X. L is
    lifted to the product's scale (2^16 L at 16 fractional bits), so r_m's products with a_L and with a_U a_W
    are dealt as one value."""
    rm, rh = r[0], r[1]
    a_l, a_u, a_w, a_x = a.unbind(0)
    uw = a_u * a_w
    return torch.stack([rm, rh, uw, rm * (uw + a_l * FixedPointEncoder().scale), rm * a_u, rm * a_w, rh * a_x])


def _bit_times(z, v, rv):
    """A party's share of b v for a bit b = z xor r opened as z: b = z + (1 - 2 z) r, so b v = z v + (1 - 2 z) r v,
    from its shares of v and of r v."""
    return z * v + (1 - 2 * z) * rv


def _select_fma_combine(z: torch.Tensor, d: torch.Tensor, a: torch.Tensor, tail: torch.Tensor, first: bool):
    """This party's share of m (L + U W) + h X (``select_fma``) from the opened z (2, *s) and d (4, *s), its shares
    of the masks a (4, *s) and of :func:`select_fma_correlations`' values ``tail`` (7, *s)."""
    zm, zh = z[0], z[1]
    d_l, d_u, d_w, d_x = d.unbind(0)
    a_l, a_u, a_w, a_x = a.unbind(0)
    rm, rh, uw, rm_s, rm_u, rm_w, rh_x = tail.unbind(0)
    # S = U W + 2^16 L and r_m S at the product's scale (2^32): U = d_U + a_U, W = d_W + a_W, L = d_L + a_L
    lift = FixedPointEncoder().scale  # L's lift to the product's scale
    s = uw + d_u * a_w + a_u * d_w + a_l * lift
    r_s = rm_s + d_u * rm_w + d_w * rm_u + (d_u * d_w + d_l * lift) * rm
    if first:
        s = s + d_u * d_w + d_l * lift
    m_s = _bit_times(zm, s, r_s)
    m_s = ring.truncate_(m_s, lift, first)  # truncated once, as a 2-party mul (m_s is this function's own)
    # h X as bit_mul: b v = z v + (1 - 2 z)(r v), r v = r a + r d
    xv = d_x + a_x if first else a_x
    h_x = _bit_times(zh, xv, rh_x + rh * d_x)
    return m_s + h_x


def _tfp_select_fma(size, device):
    return _tfp_deal((2, *size), (4, *size), select_fma_correlations, device)


# merged_round's selections with a dealt tail: kind -> (bit rows, TFP draw, combine, what the values are)
_SELECTIONS = {
    "select4": (6, _tfp_select4, _select4_combine, "the values of groups of four"),
    "select_fma": (2, _tfp_select_fma, _select_fma_combine, "the values (L, U, W, X)"),
}


#: ``"stock"``: secret products are CrypTen's own (``approx.mode: crypten``, the benchmark's baseline), set by
#: mpc_lm.runtime; otherwise :func:`matmul` is a merged-round Beaver product.
PRODUCTS = {"stock": False}


def matmul(x, y):
    """x @ y of two MPCTensors: one Beaver matmul triple, both openings in one round, two local ring
    products per party (CrypTen's ``matmul`` computes three on every party: eps dlt too, which only
    party 0 adds; here party 0 folds it into eps (b + dlt)). CrypTen's own under ``approx.mode: crypten``."""
    if PRODUCTS["stock"]:
        return x.matmul(y)
    return merged_round([("matmul", x, y)])[0]


def finish_product(x, y_encoder, z):
    """The MPCTensor of a product of ``x`` and a secret with encoder ``y_encoder`` whose ring shares
    are ``z``: truncated once when both are fixed point, as CrypTen's ``mul`` / ``matmul`` do."""
    result = x._tensor.shallow_copy()
    result.share = _like(x._tensor.share, plain_ring(z))
    xs, ys = x._tensor.encoder.scale, y_encoder.scale
    if xs > 1 and ys > 1:
        result.encoder = x._tensor.encoder
        result.div_(xs)
    else:
        result.encoder = x._tensor.encoder if xs > 1 else y_encoder
    product = x.shallow_copy()
    product._tensor = result
    return product


def together(*protocols):
    """Protocols side by side as ONE protocol (for ``yield from`` inside another): each round, the
    requests of all protocols still running travel together. Returns each protocol's return value.
    Rounds: the longest protocol's."""
    results = [None] * len(protocols)
    pending = {}
    for i, gen in enumerate(protocols):
        try:
            pending[i] = next(gen)
        except StopIteration as done:
            results[i] = done.value
    while pending:
        order = list(pending)
        answers = yield [req for i in order for req in pending[i]]
        for i in order:
            mine, answers = answers[: len(pending[i])], answers[len(pending[i]) :]
            try:
                pending[i] = protocols[i].send(mine)
            except StopIteration as done:
                results[i] = done.value
                del pending[i]
    return results


def lockstep(*protocols):
    """Run generator protocols side by side: each yields a list of :func:`merged_round` requests and
    receives their results; every round, the requests of all protocols still running are opened
    together. Returns each protocol's return value. Rounds: the longest protocol's."""
    gen = together(*protocols)
    try:
        requests = next(gen)
        while True:
            requests = gen.send(merged_round(requests))
    except StopIteration as done:
        return done.value


def mul_batch(pairs):
    """x * y for several independent pairs of any shapes (broadcasting as ``*``), in ONE round
    (:func:`merged_round`; a pair ``(x, x)`` is a square)."""
    if len(pairs) == 1:
        x, y = pairs[0]
        return [x * y]
    return merged_round([("mul", x, y) for x, y in pairs])


def bits_times(pairs):
    """b * v for single-bit XOR shares b (BinarySharedTensor) and secrets v of the same shape, in ONE
    round that also converts the bits (``bit_mul`` of :func:`merged_round`). Replaces B2A (1 round)
    followed by a product (1 round), with the same bytes."""
    return merged_round([("bit_mul", b, v) for b, v in pairs])


# ---------------------------------------------------------------- polynomials


def _chebyshev_protocol(v, degree: int):
    """:func:`chebyshev_basis` as a :func:`lockstep` protocol (one request per level; each T_k a
    level needs is opened once, however many of its products use it)."""
    T = {1: v}
    known = 1
    while known < degree:
        todo = list(range(known + 1, min(2 * known, degree) + 1))
        wanted = [((k + 1) // 2, k // 2) for k in todo]
        index = sorted({i for pair in wanted for i in pair})
        pos = {k: n for n, k in enumerate(index)}
        (products,) = yield [("products", [T[i] for i in index], [(pos[i], pos[j]) for i, j in wanted])]
        for k, p in zip(todo, products):
            T[k] = p * 2 - 1 if k % 2 == 0 else p * 2 - v
        known = todo[-1]
    return T


def chebyshev_basis(v, degree: int) -> dict:
    """T_1..T_degree of v in [-1, 1], all products of one level batched.

    T_{2k} = 2 T_k^2 - 1 and T_{2k+1} = 2 T_{k+1} T_k - v: degree d costs
    ceil(log2 d) rounds. Values of T_k stay in [-1, 1], so fixed-point error does
    not blow up the way monomials with large alternating coefficients do.
    """
    return lockstep(_chebyshev_protocol(v, degree))[0]


def chebyshev_series(T: dict, v, coeffs):
    """sum_k coeffs[k] T_k(v) from a basis of :func:`chebyshev_basis`. Local."""
    result = v * float(coeffs[1]) + float(coeffs[0]) if len(coeffs) > 1 else v * 0 + float(coeffs[0])
    for k in range(2, len(coeffs)):
        result = result + T[k] * float(coeffs[k])
    return result


def _chebyshev_value_protocol(v, coeffs):
    """sum_k coeffs[k] T_k(v) as a :func:`lockstep` protocol, the top half in ONE product.

    The basis is built up to h = ceil(d / 2); then T_{h+j} = 2 T_h T_j - T_{h-j} (j <= h) gives
    sum_{j=1}^{d-h} c_{h+j} T_{h+j} = T_h (2 sum_j c_{h+j} T_j) - sum_j c_{h+j} T_{h-j}: one product of
    T_h with a combination of known terms instead of d - h products. Rounds: ceil(log2 d), as the whole
    basis; products: those of the basis to h, + 1 (degree 8: 4 instead of 7; 10: 5 instead of 9).
    """
    degree = len(coeffs) - 1
    if degree <= 2:
        T = yield from _chebyshev_protocol(v, degree)
        return chebyshev_series(T, v, coeffs)
    T = yield from _chebyshev_protocol(v, (degree + 1) // 2)
    low, factor, top = _chebyshev_halves(T, v, coeffs)
    (product,) = yield [("mul", factor, top)]
    return low + product


def _chebyshev_halves(T: dict, v, coeffs):
    """(low, T_h, top) with sum_k coeffs[k] T_k(v) = low + T_h top, from the basis T_1..T_h
    (h = ceil(d / 2); :func:`_chebyshev_value_protocol`). Local."""
    degree = len(coeffs) - 1
    h = (degree + 1) // 2
    T = dict(T)
    T[0] = v * 0 + 1.0
    low = chebyshev_series(T, v, coeffs[: h + 1])
    top = None
    for j in range(1, degree - h + 1):
        term = T[j] * float(2 * coeffs[h + j])
        top = term if top is None else top + term
        low = low - T[h - j] * float(coeffs[h + j])
    return low, T[h], top


def chebyshev(v, coeffs):
    """sum_k coeffs[k] * T_k(v) for v in [-1, 1]; ceil(log2 degree) rounds (:func:`_chebyshev_value_protocol`)."""
    return lockstep(_chebyshev_value_protocol(v, coeffs))[0]


def weighted_least_squares(basis: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """argmin_c sum_i (weights_i (basis_i c - target_i))^2 by the normal equations: the fits here have few,
    well-conditioned columns (Chebyshev bases on [-1, 1], a line on [1, 2^(1/16)]), where this agrees with
    ``np.linalg.lstsq`` to ~1e-12 and is ~20 times faster (the fits run once per process, in the plan)."""
    weighted = basis * (weights * weights)[:, None]
    return np.linalg.solve(weighted.T @ basis, weighted.T @ target)


def minimax_fit(basis: np.ndarray, target: np.ndarray, iterations: int, error=None, weights=None) -> np.ndarray:
    """Coefficients c of ``basis @ c`` towards the least maximum ``error`` by iteratively reweighted least
    squares (each point's weight grows with its error). ``error`` maps the fitted values to the errors to
    even out (default: |fitted - target|); ``weights``: the starting weights (default: ones). Deterministic."""
    weights = np.ones_like(target) if weights is None else weights
    for _ in range(iterations):
        coeffs = weighted_least_squares(basis, target, weights)
        fitted = basis @ coeffs
        err = np.abs(fitted - target) if error is None else error(fitted)
        weights = weights * (1 + err / err.max())
    return coeffs


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@lru_cache(maxsize=None)
def fit_even_odd(name: str, bound: float, degree: int) -> tuple[float, ...]:
    """Chebyshev coefficients in v = 2 (x/bound)^2 - 1, fitted near-minimax on [-bound, bound].

    ``gelu``: fits gelu(x) - x/2 (even). ``tanh``: fits tanh(x) / (x/bound) times
    (x/bound), i.e. an odd function. Deterministic (fixed grid, fixed iterations).
    """
    x = np.linspace(-bound, bound, 8001)
    v = 2 * (x / bound) ** 2 - 1
    basis = np.polynomial.chebyshev.chebvander(v, degree)
    if name == "gelu":
        target = _gelu_exact(x) - 0.5 * x
    elif name == "tanh":
        target, basis = np.tanh(x), basis * (x / bound)[:, None]
    else:
        raise ValueError(f"no fit named {name!r}")
    return tuple(float(c) for c in minimax_fit(basis, target, 80))


GELU_BOUND, GELU_DEGREE = 4.0, 8
TANH_BOUND, TANH_DEGREE = 4.5, 10


def _gelu_inside(x):
    """x/2 + P(2 (x/4)^2 - 1), GELU's middle piece, as a :func:`lockstep` protocol (4 rounds)."""
    (square,) = yield [("mul", x, x)]
    v = square * (2 / GELU_BOUND**2) - 1
    inside = yield from _chebyshev_value_protocol(v, fit_even_odd("gelu", GELU_BOUND, GELU_DEGREE))
    return x * 0.5 + inside


@lru_cache(maxsize=None)
def _odd_series(name: str, bound: float, degree: int) -> tuple[float, ...]:
    """:func:`fit_even_odd`'s odd fit as a Chebyshev series in u = x / bound itself: u T_k(2u^2 - 1) =
    u T_2k(u) = (T_2k+1(u) + T_2k-1(u)) / 2, so the same polynomial has degree 2 degree + 1 in u."""
    coeffs = [0.0] * (2 * degree + 2)
    for k, c in enumerate(fit_even_odd(name, bound, degree)):
        if k == 0:
            coeffs[1] += c
        else:
            coeffs[2 * k + 1] += c / 2
            coeffs[2 * k - 1] += c / 2
    return tuple(coeffs)


def _tanh_inside(x):
    """tanh's odd polynomial on [-4.5, 4.5] as a :func:`lockstep` protocol: the degree-21 series in
    u = x / 4.5 (:func:`_odd_series`), 5 rounds (the basis to T_11, then its top half in one product)."""
    inside = yield from _chebyshev_value_protocol(x * (1 / TANH_BOUND), _odd_series("tanh", TANH_BOUND, TANH_DEGREE))
    return inside


def gelu(x):
    """GELU(x) = x * Phi(x), piecewise: 0 below -4, x above 4, polynomial between.

    Inside: x/2 + P(v), P a degree-8 Chebyshev series in v = 2(x/4)^2 - 1
    (fit error 3.5e-5); outside, |GELU(x) - piece| <= 1.3e-4 (at |x| = 4).
    Cost under ``tables`` with a dealer of ``select_fma`` (two parties): the comparison on deep tables
    (3 rounds) beside the basis to T_4 (3 rounds: x^2, T_2, T_3 and T_4), then ONE round that makes the top
    half's product and the selection together: with m = [-4 <= x < 4] and h = [x >= 4],
    GELU = m (x/2 + low + T_4 top) + h x (``select_fma``): 4 rounds. Otherwise the comparison beside the
    whole polynomial (4 rounds), then one round that selects and converts the bits (:func:`bits_times`):
    5 rounds (6 with the lanes16 adder); without a packed comparison C + 5.
    Max error 1.7e-4 + fixed point (and a flip just above -4 or 4 with truncated lanes).
    """
    # [x < -4], [x < 4]; deep tables: 3 rounds, within the polynomial's
    protocol = _ge_protocol(x, [-GELU_BOUND, GELU_BOUND], coarse=True, form="deep")
    if protocol is not None and _dealt_available("select_fma"):
        return lockstep(_gelu_folded(x, protocol))[0]
    if protocol is not None:  # lo inside + hi (x - inside)
        below, inside = lockstep(protocol, _gelu_inside(x))
        bits = below ^ 1
        a, b = bits_times([(bits[0], inside), (bits[1], x - inside)])
        return a + b
    lo, hi = ge_many(x, [-GELU_BOUND, GELU_BOUND], coarse=True).unbind(0)
    (inside,) = lockstep(_gelu_inside(x))
    middle = lo - hi
    a, b = mul_many([(middle, inside), (hi, x)])
    return a + b


def _inside_above(below):
    """(m, h) = ([lo <= x < hi], [x >= hi]) from ``below`` = ([x < lo], [x < hi]) of one comparison opening
    (so [x >= hi] implies [x >= lo]): the selection bits of ``select_fma``."""
    from crypten.mpc.primitives import BinarySharedTensor

    above = below ^ 1
    return BinarySharedTensor.stack([above[0] ^ above[1], above[1]])


def _gelu_basis(x):
    """GELU's v = 2 (x/4)^2 - 1 and its Chebyshev basis to T_4, as a :func:`lockstep` protocol (3 rounds)."""
    (square,) = yield [("mul", x, x)]
    v = square * (2 / GELU_BOUND**2) - 1
    T = yield from _chebyshev_protocol(v, (GELU_DEGREE + 1) // 2)
    return v, T


def _gelu_folded(x, compare):
    """:func:`gelu` with its selection folded into the top half's product (a :func:`lockstep` protocol,
    4 rounds): [x < -4] and [x < 4] beside the basis, then m (L + T_4 top) + h x in one opening."""
    below, (v, T) = yield from together(compare, _gelu_basis(x))
    low, factor, top = _chebyshev_halves(T, v, fit_even_odd("gelu", GELU_BOUND, GELU_DEGREE))
    (out,) = yield [("select_fma", _inside_above(below), crypten.stack([x * 0.5 + low, factor, top, x]))]
    return out


def tanh(x):
    """tanh(x): sign(x) beyond 4.5, odd degree-21 polynomial inside.

    Fit error 4.3e-4; tail error 2.5e-4. Cost under ``tables`` with a dealer of ``select_fma``: the
    comparison beside the basis to T_11 (4 rounds), then the top half's product and the selection in one
    opening, m (P + 1) + 2 h - 1 (:func:`gelu`'s fold): 5. With other packed comparisons, the comparison and
    the polynomial side by side (5 rounds) + 1 selecting round: 6. Otherwise C + 5.
    """
    protocol = _ge_protocol(x, [-TANH_BOUND, TANH_BOUND], coarse=True, form="deep")  # 3 rounds beside 4 or 5
    if protocol is not None and _dealt_available("select_fma"):
        return lockstep(_tanh_folded(x, protocol))[0]
    if protocol is not None:  # lo (inside + 1) + hi (1 - inside) - 1
        below, inside = lockstep(protocol, _tanh_inside(x))
        bits = below ^ 1
        a, b = bits_times([(bits[0], inside + 1), (bits[1], 1 - inside)])
        return a + b - 1
    lo, hi = ge_many(x, [-TANH_BOUND, TANH_BOUND], coarse=True).unbind(0)
    (inside,) = lockstep(_tanh_inside(x))
    middle = lo - hi
    # outside: +1 where x >= 4.5 (hi), -1 where x < -4.5 (1 - lo)
    (a,) = mul_many([(middle, inside)])
    return a + hi - (1 - lo)


def _tanh_folded(x, compare):
    """:func:`tanh` with its selection folded into the top half's product (a :func:`lockstep` protocol, 5 rounds):
    with m = [-4.5 <= x < 4.5] and h = [x >= 4.5], tanh = m (P + 1) + 2 h - 1."""
    u = x * (1 / TANH_BOUND)
    coeffs = _odd_series("tanh", TANH_BOUND, TANH_DEGREE)
    below, T = yield from together(compare, _chebyshev_protocol(u, len(coeffs) // 2))
    low, factor, top = _chebyshev_halves(T, u, coeffs)
    (out,) = yield [("select_fma", _inside_above(below), crypten.stack([low + 1, factor, top, x * 0 + 2.0]))]
    return out - 1


def relu(x):
    """max(x, 0) exactly. Cost: C + 1 round (C with the bit's conversion, packed comparisons)."""
    bits = ge_binary(x, [0.0])
    if bits is not None:
        return bits_times([(bits[0], x)])[0]
    return x * as_fixed(ge0(x))


# ---------------------------------------------------------------- exp / max


def exp_nonpositive(x, iterations: int):
    """e^x for x <= 0 as (1 + x / 2^n)^(2^n).

    Valid for x > -2^n (the base must stay positive). The relative error is
    about x^2 / 2^(n+1), so the absolute error x^2 e^x / 2^(n+1) peaks at
    x = -2: 0.0021 for n = 8 in exact arithmetic. Fixed point adds the base's
    rounding (2^-16) amplified 2^n times: measured max error 0.0027 for n = 8
    but 0.0059 for n = 9, so n = 8 is the best choice at 16 bits.
    Cost: n rounds (squarings).
    """
    result = x * (1.0 / 2**iterations) + 1
    for _ in range(iterations):
        result = result.square()
    return result


#: :func:`exp_clipped`: e^x = u(x)^2 for x >= -EXP_CLIP and 0 below, u a degree-EXP_DEGREE Chebyshev series of
#: e^(x/2) fitted on EXP_FIT. Its comparisons read CLIP_LANES: 12-bit lanes from bit 13 of the shares (units of
#: 1/8, |x| < 256), two one-word table chunks (the opening + one AND round).
EXP_CLIP, EXP_DEGREE = 12.0, 8
EXP_FIT = (-12.5, 1.2)
CLIP_LANES = (12, 13)


@lru_cache(maxsize=None)
def fit_exp_half(lo: float, hi: float, degree: int) -> tuple[float, ...]:
    """Chebyshev coefficients of u(t) ~ e^(x/2), t = (x - m) / w mapping [lo, hi] onto [-1, 1], fitted so that
    u^2 is near-minimax against e^x in absolute error (the softmax's numerators). Deterministic."""
    x = np.linspace(lo, hi, 20001)
    t = (x - (lo + hi) / 2) / ((hi - lo) / 2)
    basis = np.polynomial.chebyshev.chebvander(t, degree)
    coeffs = minimax_fit(basis, np.exp(x / 2), 100, error=lambda u: np.abs(u * u - np.exp(x)))
    return tuple(float(c) for c in coeffs)


def _dealt_available(name: str) -> bool:
    """Whether ``tables`` comparisons run here with two parties and a provider that deals ``name``
    (mpc_lm/offline.py's planned dealer; party 0 under TFP in development)."""
    if COMPARISON["method"] != "tables" or crypten.communicator.get().get_world_size() != 2:
        return False
    return offline.dealt_by(name) is not None


def clipped_exp_available() -> bool:
    """Whether :func:`exp_clipped` runs here: ``tables`` comparisons, two parties, and a provider that
    deals tables and bit-square tuples (the planned dealer; TFP in development)."""
    return _dealt_available("bit_square")


def _exp_clipped_protocol(x, keep):
    from crypten.mpc.primitives import BinarySharedTensor

    lo, hi = EXP_FIT
    t = x * (2 / (hi - lo)) - (lo + hi) / (hi - lo)
    coeffs = fit_exp_half(lo, hi, EXP_DEGREE)
    below, dropped, T = yield from together(
        _ge_protocol(x, [-EXP_CLIP], lanes=CLIP_LANES),  # [x < -T]
        _ge_protocol(keep, [0.5], lanes=CLIP_LANES),  # [keep < 1/2]
        _chebyshev_protocol(t, (EXP_DEGREE + 1) // 2))
    n = x.numel()
    inside = plain_ring((below ^ 1).share).reshape(-1)
    kept = plain_ring((dropped ^ 1).share).reshape(keep.size()).expand(x.size()).reshape(-1)
    left = BinarySharedTensor.from_shares(tables.pack_bits(inside))
    right = BinarySharedTensor.from_shares(tables.pack_bits(kept))
    low, factor, top = _chebyshev_halves(T, t, coeffs)
    both, product = yield [("and", left, right), ("mul", factor, top)]
    w = BinarySharedTensor.from_shares(tables.unpack_bits(plain_ring(both.share), n).view(x.size()))
    (e,) = yield [("bit_square", w, low + product)]
    return e


def exp_clipped(x, keep):
    """e^x * keep for softmax inputs x in (-256, 1.2] and a secret 0/1 ``keep`` broadcastable to x (same
    number of dimensions), when :func:`clipped_exp_available`.

    e^x = u(x)^2 with u a degree-8 Chebyshev series of e^(x/2) on [-12.5, 1.2] (:func:`fit_exp_half`), for
    x >= -12; 0 below (e^-12 = 6e-6). In exact arithmetic |u^2 - e^x| < 1.2e-5 on [-12.5, 1.2], so the
    comparison's resolution (x in [-12, -11.875) may read as below -12) costs nothing; below -12.5 the
    series is meaningless (even overflows the ring) but is multiplied by an exact 0. The clip bit
    [x >= -12] and the mask's bit [keep >= 1/2] are read from comparison tables (:data:`CLIP_LANES`)
    while the basis is built, ANDed beside the series' last product, and applied with the square in one
    opening (the ``bit_square`` of :func:`merged_round`): keep [x >= -12] u^2.
    Rounds: 4 (opening + T_2; AND of the chunks + T_3, T_4; AND of the bits + the top half; bit_square),
    against 8 squarings + 1 product for :func:`exp_nonpositive` times the mask.
    """
    return lockstep(_exp_clipped_protocol(x, keep))[0]


def row_max(x, arity: int = 2, shift_only: bool = False):
    """Maximum over the last dimension by a comparison tournament.

    ``arity`` 2: max(a, b) = b + (a - b)[a >= b]; C + 1 rounds per level,
    ceil(log2 n) levels, n - 1 comparisons. ``arity`` 4: groups of four, all six
    pairwise comparisons in one C, the winner selected by a product of its three
    indicators and its value in 2 rounds: C + 2 rounds per level, ceil(log4 n)
    levels (a last pair costs C + 1), about 2 n comparisons (docs/performance.md).
    Ties go to the first maximal element, so exactly one indicator is 1: the comparisons
    of a group are consistent (:func:`_group_ge_binary`).

    ``shift_only=True`` (a softmax's shift, which only needs an element within a little of the
    maximum): under ``tables`` the comparisons read the coarse one-chunk lanes (:data:`MAX_LANES`),
    one opening each; the result is an element at most 1.0 below the maximum, for
    |differences| < 256.
    """
    lanes = (MAX_LANES, MAX_DROP) if shift_only and COMPARISON["method"] == "tables" else None
    if arity not in (2, 4):
        raise ValueError(f"row_max arity must be 2 or 4, not {arity}")
    one_round = arity == 4 and _dealt_available("select4")  # a group's winner in one opening
    n = x.size(-1)
    # both steps take C + 1 rounds then: a pair step first where it adds no level (128 = 2 x 4^3)
    pair_first = one_round and n >= 4 and 1 + _levels4((n + 1) // 2) <= _levels4(n)
    while x.size(-1) > 1:
        n = x.size(-1)
        if arity == 2 or n < 4 or pair_first:
            pair_first = False
            half = n // 2
            a, b = x[..., :half], x[..., half : 2 * half]
            diff = a - b
            bits = ge_binary(diff, [0.0], coarse=True, lanes=lanes)  # picks a or b: a flip costs < the lanes' step
            m = b + (bits_times([(bits[0], diff)])[0] if bits is not None else diff * as_fixed(ge0(diff, coarse=True)))
            x = crypten.cat([m, x[..., 2 * half :]], dim=-1) if n % 2 else m
            continue
        groups = n // 4
        head, rest = x[..., : 4 * groups], x[..., 4 * groups :]
        g = head.reshape(*head.size()[:-1], groups, 4)
        cols = [g[..., i] for i in range(4)]
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        bits = _group_ge_binary(cols, pairs, lanes)
        if bits is not None and one_round:
            (m,) = merged_round([("select4", bits, crypten.stack(cols))])
            x = crypten.cat([m, rest], dim=-1) if rest.size(-1) else m
            continue
        if bits is not None:
            # [x_j > x_i] = [x_i >= x_j] xor 1; round 1: f1 & f2 (binary) and f3 x_i (the bit
            # converted inside the product); round 2: (f1 f2) (f3 x_i), the bit converted again
            ind = {}
            for (i, j), bit in zip(pairs, bits.unbind(0)):
                ind[(i, j)], ind[(j, i)] = bit, bit ^ 1
            factors = [[ind[(i, j)] for j in range(4) if j != i] for i in range(4)]
            from crypten.mpc.primitives import BinarySharedTensor

            f1 = BinarySharedTensor.stack([f[0] for f in factors])
            f2 = BinarySharedTensor.stack([f[1] for f in factors])
            f3 = BinarySharedTensor.stack([f[2] for f in factors])
            both, picked = merged_round([("and", f1, f2), ("bit_mul", f3, crypten.stack(cols))])
            (m,) = bits_times([(both, picked)])
            m = m.sum(dim=0)
            x = crypten.cat([m, rest], dim=-1) if rest.size(-1) else m
            continue
        ge = as_fixed(ge0(crypten.stack([cols[i] - cols[j] for i, j in pairs]))).unbind(0)
        ind = {}
        for (i, j), bit in zip(pairs, ge):
            ind[(i, j)] = bit  # [x_i >= x_j] (i < j)
            ind[(j, i)] = 1 - bit  # [x_j > x_i]
        factors = [[ind[(i, j)] for j in range(4) if j != i] for i in range(4)]
        # round 1: f1 f2 and f3 x_i for every i; round 2: their products, summed
        firsts = mul_many([(f[0], f[1]) for f in factors] + [(f[2], cols[i]) for i, f in enumerate(factors)])
        products = mul_many([(firsts[i], firsts[4 + i]) for i in range(4)])
        m = products[0] + products[1] + products[2] + products[3]
        x = crypten.cat([m, rest], dim=-1) if rest.size(-1) else m
    return x


def _levels4(n: int) -> int:
    """Levels of :func:`row_max`'s groups of four for n elements (leftovers carried; pairs below four)."""
    levels = 0
    while n > 1:
        n = n // 4 + n % 4 if n >= 4 else n // 2 + n % 2
        levels += 1
    return levels


def _group_ge_binary(cols, pairs, lanes=None):
    """[x_i >= x_j] for the (i, j) in ``pairs``, stacked, as single-bit XOR shares (before
    conversion); consistent. Two parties with packed or truncated comparisons; None otherwise
    (then exact comparisons of the differences with CrypTen's circuit).

    The winner of a group is the element whose comparisons all say it is largest, so the
    comparisons must be consistent: a truncated comparison of each difference (``coarse``)
    may flip near-ties independently and make a cycle, leaving no winner. Under ``lanes16``
    every element is truncated ONCE (bits [COARSE_DROP, COARSE_DROP + 16) of its shares,
    :func:`_lane_values`), and the comparisons are exact on those truncated values
    y_i = floor(x_i / 2^COARSE_DROP) - c_i: a consistent order (ties to the lower index), whose
    winner is within 2 * 2^-6 of the true maximum (softmax is shift-invariant). Needs
    |x_i - x_j| < 512. Under ``packed32``: exact comparisons of the differences.
    """
    method = COMPARISON["method"]
    if method not in _PACKED or crypten.communicator.get().get_world_size() != 2:
        return None
    if method != "packed32":  # lanes16, tables: consistent, each element truncated once (see above)
        lane_bits, drop = _lanes(True, lanes)
        t = [_lane_values(c, lane_bits, drop) for c in cols]
        values = torch.stack([(t[i] - t[j]) & ((1 << lane_bits) - 1) for i, j in pairs])
        (below,) = lockstep(_sign(values, lane_bits))
    else:  # packed32
        diffs = crypten.stack([cols[i] - cols[j] for i, j in pairs])
        (below,) = lockstep(_sign(_lane_values(diffs, 32, 0), 32))
    return below ^ 1


# ---------------------------------------------------------------- reciprocal, inverse sqrt


def _bucket_guess(x, lo_exp: int, hi_exp: int, power: float, steps: int = 1, coarse: bool = False):
    """A first guess for x^power from [x >= 2^(k/steps)] over [2^lo_exp, 2^hi_exp], in one comparison.

    ``steps`` thresholds per octave: within a bucket [2^(k/s), 2^((k+1)/s)) the guess is
    the bucket's geometric middle to the ``power``, so it is within a factor
    2^(|power| / (2 s)) of the truth and Newton needs fewer iterations (docs/performance.md).
    Inputs below 2^lo_exp get the guess of the lowest bucket, above 2^hi_exp the highest.
    Cost: one C on ``steps * (hi_exp - lo_exp)`` elements per input; the selection is local.

    ``coarse=True`` (callers whose input x is in (0, 2^hi_exp], e.g. a softmax row sum
    <= T e) uses the truncated comparisons of :func:`ge0` when every x - t stays inside their
    range (|x - t| < 2^hi_exp <= 2^(COARSE_DROP - 1)) and the lowest threshold is far above their
    window: a flip then reads x in [t, t + 2^-6) as just below t, i.e. the guess of the
    adjacent bucket, within a factor 2^(1/(2 steps)) (1 + 2^-6 / t) of the truth instead of
    2^(1/(2 steps)) (0.125 instead of 0.091 for 4 steps, t >= 1/2). Otherwise exact.
    """
    thresholds, first, deltas = _buckets(x, lo_exp, hi_exp, power, steps)
    coarse, packed_ok = _bucket_lanes(lo_exp, hi_exp, coarse)
    bits = ge_bits(x, thresholds, packed_ok=packed_ok, coarse=coarse,
                   form="wide")  # one element per row, many thresholds: wide tables
    # sum_k bit_k * (value_k - value_{k-1}): exact integer products of the 0/1 shares, one op
    guess = mul_public_int(bits, deltas).sum(0)
    guess.encoder = FixedPointEncoder()
    return guess + first


def _bucket_lanes(lo_exp: int, hi_exp: int, coarse: bool) -> tuple[bool, bool]:
    """(coarse, packed_ok) for the guess's comparisons: truncated lanes only where :func:`_bucket_guess`
    allows them; packed lanes while x - t stays exact in them (x < packed_limit(), 2^15: thresholds up
    to half of it leave inputs up to twice the top threshold exact; beyond that the top bucket's guess
    is too far off for Newton anyway)."""
    return coarse and hi_exp <= COARSE_DROP - 1 and lo_exp >= -1, 2.0**hi_exp <= packed_limit() / 2


def _buckets(x, lo_exp: int, hi_exp: int, power: float, steps: int):
    """The bucket guess's thresholds, its lowest value, and the encoded steps between values (shaped
    to multiply bits of shape (K, *x.shape))."""
    ks = list(range(lo_exp * steps + 1, hi_exp * steps + 1))
    values = [(2.0 ** ((k + 0.5) / steps)) ** power for k in [lo_exp * steps] + ks]
    scale = FixedPointEncoder().scale
    deltas = torch.tensor([round((b - a) * scale) for a, b in zip(values, values[1:])],
                          dtype=torch.long).view(-1, *([1] * x.dim()))
    return [2.0 ** (k / steps) for k in ks], values[0], deltas


def _guess_compare(x, lo_exp: int, hi_exp: int, steps: int, coarse: bool):
    """The comparison protocol of a first guess whose bits are converted in a product (the constant guess of
    :func:`_guess_and_product`, the lines of :func:`_linear_guess`): [x < t] for every threshold
    t = 2^(k/steps) over [2^lo_exp, 2^hi_exp] from one opening on wide tables, the lanes as
    :func:`_bucket_lanes` allows (64-bit lanes beyond the packed range); None without a packed circuit."""
    coarse, packed_ok = _bucket_lanes(lo_exp, hi_exp, coarse)
    thresholds = [2.0 ** (k / steps) for k in range(lo_exp * steps + 1, hi_exp * steps + 1)]
    return _ge_protocol(x, thresholds, coarse and packed_ok, lanes=None if packed_ok else (64, 0), form="wide")


def _guess_and_product(x, lo_exp: int, hi_exp: int, power: float, steps: int, coarse: bool = False, extra=()):
    """(y, x y) for the bucket guess y of x^power (as :func:`_bucket_guess` makes it), the
    bits' conversion and the product x y in ONE round: ``bit_mul_b2a`` of the bits with x (each bit
    converted and times x from one opening, then sum_k delta_k (b_k x), truncated once). Under
    ``tables`` with two parties; None otherwise (then the guess, and x y a round later).
    Saves the round of the conversion: the first Newton product needs only x y. ``coarse`` as in
    :func:`_bucket_guess`; ``extra``: more :func:`merged_round` requests for the same round, whose
    results follow (y, x y)."""
    if not _dealt_available("bit_triple"):
        return None
    thresholds, first, deltas = _buckets(x, lo_exp, hi_exp, power, steps)
    compare = _guess_compare(x, lo_exp, hi_exp, steps, coarse)
    if compare is None:
        return None
    bits = lockstep(compare)[0] ^ 1
    stacked = x.unsqueeze(0).expand(len(thresholds), *x.size())
    (ints, times), *more = merged_round([("bit_mul_b2a", bits, stacked), *extra])
    encoder = FixedPointEncoder()
    guess = mul_public_int(ints, deltas).sum(0)
    guess.encoder = encoder
    # x y = first x + sum_k delta_k (b_k x): scale^2, truncated once
    xy = mul_public_int(times, deltas).sum(0) + mul_public_int(x, round(first * encoder.scale))
    xy._tensor.encoder = x._tensor.encoder
    xy._tensor.div_(encoder.scale)
    return (guess + first, xy, *more)


#: A linear first guess (:func:`_linear_guess`) is used only where every guess on the range is at least this:
#: a 16-bit fixed-point guess y is rounded by up to 2^-17 / y relative, which no later Newton step corrects.
LINEAR_GUESS_FLOOR = 2.0**-8
#: Largest magnitude (ring units) of a bucket's linear term before its truncation. The 2-party truncation
#: fails with probability about |v| / 2^64 per element and then adds 2^64 / divisor ring units (about 2^25 in
#: the guess); 2^36 keeps that below 2^-28 per guess (a run of BERT-base at 128 tokens makes ~2e4 guesses).
LINEAR_TERM_LIMIT_BITS = 36


@lru_cache(maxsize=None)
def _linear_fit(power: float, steps: int) -> tuple[float, float]:
    """(c0, c1) with c0 + c1 u near-minimax in relative error against u^power on [1, 2^(1/steps)]. By scaling,
    t^power (c0 + c1 x / t) fits x^power on [t, t 2^(1/steps)] as well (8.8e-5 for power -1/2 and 16 steps,
    2.3e-4 for power -1). Deterministic."""
    u = np.linspace(1.0, 2.0 ** (1.0 / steps), 513)
    basis, target = np.stack([np.ones_like(u), u], 1), u**power
    coeffs = minimax_fit(basis, target, 200, error=lambda f: np.abs(f - target) / target, weights=1 / target)
    return float(coeffs[0]), float(coeffs[1])


def _linear_guess(x, lo_exp: int, hi_exp: int, power: float, steps: int, coarse: bool = False,
                  scale_exp: int = 0, extra=()):
    """(y, *more) for y = 2^scale_exp x^power from one line per bucket, its bits' conversion and the
    lines' slopes read in ONE round; None where not available (then the bucket guess and Newton steps).

    The buckets are :func:`_bucket_guess`'s (``steps`` thresholds per octave over [2^lo_exp, 2^hi_exp]);
    in bucket [t, t 2^(1/steps)) the guess is t^power (c0 + c1 x / t) (:func:`_linear_fit`): relative
    error 8.8e-5 (1/sqrt x) or 2.3e-4 (1/x) at 16 steps, with no Newton step. The round opens the bits
    masked beside x's mask (``bit_mul_b2a``): each bit converted (for the intercepts: sum_k b_k times the
    steps between intercepts, exact) and times x (for the slopes: the one-hot o_j x = b_j x - b_{j+1} x,
    times bucket j's slope). Each line is written about its bucket's lower edge t_j (:func:`_linear_lines`): the
    intercepts at t_j are exact integer steps, and only the terms s_j (x - t_j), |x - t_j| < 0.044 t_j, are
    truncated. Slopes span many octaves (x^(power - 1)), so each octave's terms are encoded with as many
    fractional bits as keep them below 2^LINEAR_TERM_LIMIT_BITS ring units (a 2-party truncation of v fails
    with probability ~|v| / 2^64) and truncated once; an octave that does not hold x sums to an exact 0. Inputs below 2^lo_exp get the lowest line,
    above 2^hi_exp the highest (extrapolated). ``coarse``: truncated comparisons as in
    :func:`_bucket_guess` (a flip reads x just above a threshold into the bucket below, whose line
    extrapolated that far is off by up to ~10x its fit error). Requires ``tables`` with two parties and
    a dealer of bit triples, and every guess on the range >= :data:`LINEAR_GUESS_FLOOR`. ``extra``: more
    :func:`merged_round` requests for the same round, whose results follow y.
    Cost: C + 1 rounds, against C + 1 + 2 (1/x) or C + 1 + 3 (1/sqrt x) per Newton step.
    """
    protocol = _linear_guess_protocol(x, lo_exp, hi_exp, power, steps, coarse, scale_exp, extra)
    return None if protocol is None else lockstep(protocol)[0]


def linear_guess_available(power: float, hi_exp: int, scale_exp: int = 0) -> bool:
    """Whether :func:`_linear_guess` applies here to a range whose top is 2^hi_exp (the guesses there stay
    >= :data:`LINEAR_GUESS_FLOOR`; ``tables`` with two parties and a dealer of bit triples)."""
    return power < 0 and 2.0 ** (power * hi_exp + scale_exp) >= LINEAR_GUESS_FLOOR and _dealt_available("bit_triple")


def _linear_guess_protocol(x, lo_exp: int, hi_exp: int, power: float, steps: int, coarse: bool = False,
                           scale_exp: int = 0, extra=()):
    """:func:`_linear_guess` as a :func:`lockstep` protocol returning (y, *more), or None where it does not
    apply. The comparison's dealt key is asked for here, when the protocol is made."""
    if not linear_guess_available(power, hi_exp, scale_exp):
        return None
    compare = _guess_compare(x, lo_exp, hi_exp, steps, coarse)
    if compare is None:
        return None
    return _linear_guess_rounds(x, compare, lo_exp, hi_exp, power, steps, scale_exp, extra)


@lru_cache(maxsize=None)
def _linear_lines(lo_exp: int, hi_exp: int, power: float, steps: int, scale_exp: int):
    """The public constants of :func:`_linear_guess` on one range: the lowest intercept (encoded), the encoded
    steps between consecutive intercepts, and the groups of buckets whose linear terms share one truncation:
    (first bucket, end, slopes encoded, divisor, bucket edges encoded).

    Bucket j's line is written about its lower edge t_j: y = (A_j + s_j t_j) + s_j (x - t_j). The intercepts
    A_j + s_j t_j are exact integer steps of the converted bits; only s_j (x - t_j) is truncated, and inside a
    bucket |x - t_j| < (2^(1/steps) - 1) t_j (0.044 t_j at 16 steps), so the truncated values are ~23 times
    smaller than s_j x and the slopes carry more fractional bits for the same magnitude. The lowest bucket
    (also every x below the range) and the highest (x above it) are groups of their own, bounded by |x - t| < t.
    """
    c0, c1 = _linear_fit(power, steps)
    edges = [2.0 ** (k / steps) for k in range(lo_exp * steps, hi_exp * steps + 1)]  # each bucket's lower edge
    scale = FixedPointEncoder().scale
    edges_enc = [round(t * scale) for t in edges]
    line = [2.0**scale_exp * t ** (power - 1) * c1 for t in edges]  # each bucket's slope
    # intercepts at the encoded edges (2^scale_exp t^power (c0 + c1), encoded and rounded once each)
    ends = [round((2.0**scale_exp * t**power * c0 + s * te / scale) * scale) for t, te, s in zip(edges, edges_enc, line)]
    octaves = [math.floor(round(math.log2(t) * steps) / steps) for t in edges]
    last = len(edges) - 1
    members_of = [[0]] + [[j for j in range(1, last) if octaves[j] == o] for o in sorted(set(octaves[1:last]))]
    members_of = [m for m in members_of if m] + [[last]]
    width = 2.0 ** (1.0 / steps) - 1.0
    groups = []
    for members in members_of:
        span = 1.0 if members[0] in (0, last) else width  # |x - t_j| / t_j
        biggest = max(abs(line[j]) * edges[j] * span for j in members)
        bits_here = max(0, min(40, LINEAR_TERM_LIMIT_BITS - 2 * 16 - math.ceil(math.log2(biggest * 1.1))))
        slope_scale = 2.0 ** (16 + bits_here)
        slopes = tuple(round(line[j] * slope_scale) for j in members)
        groups.append((members[0], members[-1] + 1, slopes, int(slope_scale), tuple(edges_enc[j] for j in members)))
    return ends[0], tuple(b - a for a, b in zip(ends, ends[1:])), tuple(groups)


@lru_cache(maxsize=None)
def _linear_tensors(lo_exp: int, hi_exp: int, power: float, steps: int, scale_exp: int, device: str):
    """:func:`_linear_lines` as tensors on ``device`` for :func:`_linear_terms`: the steps between the
    intercepts, each bucket's slope and slope times lower edge (int64, wrapped as the ring wraps), the groups'
    bucket ranges, and each group's truncation as (party 0's addend, shift)."""
    _, between, groups = _linear_lines(lo_exp, hi_exp, power, steps, scale_exp)
    starts, stops = [g[0] for g in groups], [g[1] for g in groups]
    if starts[0] != 0 or starts[1:] != stops[:-1] or any(g[3] & (g[3] - 1) for g in groups):
        raise AssertionError("linear guess groups must be consecutive bucket ranges with power-of-two divisors")
    slopes = [s for g in groups for s in g[2]]
    offsets = [((s * t + 2**63) % 2**64) - 2**63 for g in groups for s, t in zip(g[2], g[4])]

    def column(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return {"between": column(between), "slopes": column(slopes), "offsets": column(offsets),
            "starts": column(starts), "stops": column(stops), "addends": column([g[3] for g in groups]),
            "shifts": column([g[3].bit_length() - 1 for g in groups])}


def _linear_terms(one_hot, one_hot_bits, lines: dict, first: bool):
    """This party's share of sum_g trunc(sum_{j in g} s_j (x - t_j)), the linear terms of
    :func:`_linear_guess` (plain ring tensors, local): ``one_hot`` (K + 1, *x) holds o_j x (scale 2^16),
    ``one_hot_bits`` o_j (ring integers). Each group's sum is truncated by its power-of-two divisor as two
    parties' shares are (:func:`mpc_lm.ring.truncate`: party 0 (``first``) adds the divisor, then each
    shifts), all groups in the same few tensor operations: a prefix sum over the buckets gives every
    group's sum. Bit-identical to truncating and adding the groups one by one."""
    shape = (-1,) + (1,) * (one_hot.dim() - 1)
    values = one_hot * lines["slopes"].view(shape) - one_hot_bits * lines["offsets"].view(shape)
    prefix = torch.cat([torch.zeros_like(values[:1]), values]).cumsum(0)  # int64 sums wrap as the ring does
    sums = prefix.index_select(0, lines["stops"]) - prefix.index_select(0, lines["starts"])
    if first:
        sums += lines["addends"].view(shape)
    return sums.bitwise_right_shift_(lines["shifts"].view(shape)).sum(0)


def _linear_guess_rounds(x, compare, lo_exp: int, hi_exp: int, power: float, steps: int, scale_exp: int, extra):
    """The rounds of :func:`_linear_guess` after its comparison protocol ``compare``. Two parties only (the
    comparison is on dealt tables), so every group's truncation is the shift of :func:`_linear_terms`."""
    below = yield from compare
    stacked = x.unsqueeze(0).expand((hi_exp - lo_exp) * steps, *x.size())
    (ints, times), *more = yield [("bit_mul_b2a", below ^ 1, stacked), *extra]
    first = _linear_lines(lo_exp, hi_exp, power, steps, scale_exp)[0]
    xs = plain_ring(x._tensor.share).unsqueeze(0)
    lines = _linear_tensors(lo_exp, hi_exp, power, steps, scale_exp, str(xs.device))
    guess = mul_public_int(ints, lines["between"].view([-1] + [1] * x.dim())).sum(0)
    guess.encoder = FixedPointEncoder()
    guess = guess + first / guess.encoder.scale
    # the one-hot buckets j = 0..K: o_j x (ring, scale 2^16) and o_j (ring integers), from the K converted bits
    share = plain_ring(times._tensor.share)
    one_hot = torch.cat([xs, share]) - torch.cat([share, torch.zeros_like(xs)])
    bits = plain_ring(ints._tensor.share)
    party0 = crypten.communicator.get().get_rank() == 0
    one = torch.full_like(xs, 1 if party0 else 0)
    one_hot_bits = torch.cat([one, bits]) - torch.cat([bits, torch.zeros_like(xs)])
    terms = _linear_terms(one_hot, one_hot_bits, lines, party0)
    guess._tensor.share = _like(x._tensor.share, plain_ring(guess._tensor.share) + terms)
    return (guess, *more)


def _norm_start(centered, gamma, eps: float, lo_exp: int, hi_exp: int, steps: int):
    """A fused LayerNorm's first round (centered^2 and centered gamma) as part of a :func:`lockstep` protocol;
    returns (centered gamma, the protocol of the variance's linear guess of 1/sqrt(var + eps), still to run)."""
    squares, scaled = yield [("mul", centered, centered), ("mul", centered, gamma)]
    var = squares.mean(dim=-1, keepdim=True) + eps
    guess = _linear_guess_protocol(var, lo_exp, hi_exp, -0.5, steps)
    if guess is None:  # the caller checked linear_guess_available
        raise RuntimeError("the LayerNorm's linear guess is not available after all")
    return scaled, guess


def normalized_mean(centered, gamma, eps: float, keep, lo_exp: int, hi_exp: int, count_hi_exp: int, steps: int):
    """sum_t keep_t centered_t gamma / sqrt(var_t + eps) / sum_t keep_t (a LayerNorm before beta, mean-pooled over
    the kept tokens), or None where :func:`_linear_guess` does not apply. ``centered`` (B, T, H), ``keep`` (B, T).

    As one protocol of 6 rounds instead of LayerNorm's 5 and mean pooling's 4: the token count's linear
    guess (the opening, then its conversion) runs beside the LayerNorm's squares and comparison; the mask
    multiplies centered gamma while the variances' bits are opened (sum_t keep_t (a_t y_t) = sum_t y_t
    (keep_t a_t)); then sum_t y_t (keep a)_t as one product of (B, 1, T) and (B, T, H), then the count's
    guess. Same products as the separate layers, in another order, so the same truncations.
    """
    if not (linear_guess_available(-0.5, hi_exp) and linear_guess_available(-1.0, count_hi_exp)):
        return None
    kept = keep.unsqueeze(-1)
    count = _linear_guess_protocol(kept.sum(dim=1), -1, count_hi_exp, -1.0, steps, coarse=True)
    if count is None:
        return None

    def pooled_sum():
        scaled, guess = yield from _norm_start(centered, gamma, eps, lo_exp, hi_exp, steps)

        def masked():
            (product,) = yield [("mul", kept, scaled)]
            return product

        (y,), product = yield from together(guess, masked())
        (total,) = yield [("matmul", y.transpose(1, 2), product)]
        return total.squeeze(1)

    def protocol():
        (g,), total = yield from together(count, pooled_sum())
        (mean,) = yield [("mul", total, g)]
        return mean

    return lockstep(protocol())[0]


def normalized_linear(centered, gamma, beta, weight, eps: float, lo_exp: int, hi_exp: int, steps: int, rows=None):
    """(y, z): a LayerNorm's output before beta, y = centered gamma / sqrt(var + eps), and the next linear layer's
    product with its input ``y + beta`` before the bias, z = (y + beta) @ W, in 5 rounds instead of LayerNorm's 5 and
    the product's 1; None where :func:`_linear_guess` does not apply. ``rows`` (optional): a function picking the
    rows the linear layer reads (a classifier's first token), applied to ``centered gamma`` and the guess.

    The guess g = 1/sqrt(var + eps) is one number per row, so (centered gamma g) @ W = ((centered gamma) @ W) g: the
    product P = (centered gamma) @ W (and beta @ W) travels in the round that opens the variances' comparison, and
    the last round gives y = (centered gamma) g and z = P g together. P is the linear layer's output times the
    row's standard deviation, so its truncation sees sqrt(var) times larger values, and P g carries P's
    rounding times g (docs/performance.md, lever 12).
    """
    if not linear_guess_available(-0.5, hi_exp):
        return None

    def protocol():
        scaled, guess = yield from _norm_start(centered, gamma, eps, lo_exp, hi_exp, steps)
        picked = scaled if rows is None else rows(scaled)

        def product():  # beta as one more row: W is read by one product (opened once where it is not premasked)
            rows_in = crypten.cat([picked.reshape(-1, picked.size(-1)), beta.reshape(1, -1)])
            (out,) = yield [("wmatmul", rows_in, weight)]
            return out[:-1].reshape(*picked.size()[:-1], out.size(-1)), out[-1]

        (g,), (p, bw) = yield from together(guess, product())
        y, z = yield [("mul", scaled, g), ("mul", p, g if rows is None else rows(g))]
        return y, z + bw

    return lockstep(protocol())[0]


def _guess_with_product(x, lo_exp: int, hi_exp: int, power: float, steps: int, coarse: bool = False):
    """(y, x y) for the bucket guess y: in one round with its conversion where :func:`_guess_and_product`
    applies, otherwise the guess and then x y (one round more)."""
    folded = _guess_and_product(x, lo_exp, hi_exp, power, steps, coarse)
    if folded is not None:
        return folded
    y = _bucket_guess(x, lo_exp, hi_exp, power, steps, coarse)
    return y, x * y


def reciprocal(x, lo_exp: int, hi_exp: int, iterations: int, steps: int = 1, coarse: bool = False):
    """1/x for x in [2^lo_exp, 2^hi_exp] (x > 0).

    Newton-Raphson y <- y (2 - x y) from the bucket guess: relative error
    e0 <= 2^(1/(2 steps)) - 1 (0.42 for 1 step per octave, 0.091 for 4),
    e_{k+1} = e_k^2: 4 iterations (1 step) or 2 (4 steps) reach < 1e-4 before fixed point.
    Cost: one C + 2 rounds per iteration, one fewer under ``tables`` with two parties (the guess's
    conversion carries the first x y: :func:`_guess_and_product`). ``coarse``: see :func:`_bucket_guess`.
    """
    if iterations == 0:
        return _bucket_guess(x, lo_exp, hi_exp, -1.0, steps, coarse)
    y, xy = _guess_with_product(x, lo_exp, hi_exp, -1.0, steps, coarse)
    for i in range(iterations):
        y = y * (2 - (x * y if i else xy))
    return y


def scaled_reciprocal(x, a, lo_exp: int, hi_exp: int, iterations: int, steps: int = 1, coarse: bool = False,
                      linear: bool = False):
    """a / x for x in [2^lo_exp, 2^hi_exp] (x > 0, shape broadcastable to a's), with the last Newton
    step folded into the product: a y (2 - x y) as x y and a y in one round, then one product.

    Cost: C + 2 (iterations - 1) + 2 rounds (``a * reciprocal(x)``: C + 2 iterations + 1).
    ``linear``: the linear first guess and its product, C + 2 rounds, where :func:`_linear_guess` applies.
    """
    guess = _linear_guess(x, lo_exp, hi_exp, -1.0, steps, coarse) if linear else None
    if guess is not None:
        return a * guess[0]
    y = _bucket_guess(x, lo_exp, hi_exp, -1.0, steps, coarse)
    if iterations == 0:
        return a * y
    for _ in range(iterations - 1):
        y = y * (2 - x * y)
    xy, ay = mul_batch([(x, y), (a, y)])
    return ay * (2 - xy)


def scaled_inv_sqrt(x, a, lo_exp: int, hi_exp: int, iterations: int, steps: int = 1, linear: bool = False):
    """a / sqrt(x) for x in [2^lo_exp, 2^hi_exp] (x > 0, broadcastable to a's), with the last Newton
    step folded into the product: (x y) and (a y) in one round, (x y) y, then (a y)(3 - x y^2) / 2.

    Cost: C + 3 iterations rounds (``a * inv_sqrt(x)``: C + 3 iterations + 1), one fewer under ``tables``
    with two parties (:func:`_guess_and_product`). ``linear``: the linear first guess and its product,
    C + 2 rounds, where :func:`_linear_guess` applies (e.g. a LayerNorm's range, 1/sqrt(x) >= 2^-7).
    """
    guess = _linear_guess(x, lo_exp, hi_exp, -0.5, steps) if linear else None
    if guess is not None:
        return a * guess[0]
    if iterations == 0:
        return a * _bucket_guess(x, lo_exp, hi_exp, -0.5, steps)
    y, xy = _guess_with_product(x, lo_exp, hi_exp, -0.5, steps)
    for _ in range(iterations - 1):
        y = y * (3 - xy * y) * 0.5
        xy = x * y
    # (x y) y rather than x (y^2): for large x, y^2 has too few fixed-point bits
    xyy, ay = mul_batch([(xy, y), (a, y)])
    return ay * (3 - xyy) * 0.5


def inv_sqrt(x, lo_exp: int, hi_exp: int, iterations: int, steps: int = 1, linear: bool = False):
    """1/sqrt(x) for x in [2^lo_exp, 2^hi_exp] (x > 0).

    Newton-Raphson y <- y (3 - x y^2) / 2 from the bucket guess: relative error
    e0 <= 2^(1/(4 steps)) - 1 (0.19 for 1 step per octave, 0.044 for 4),
    e_{k+1} ~ 1.5 e_k^2: 3 iterations (1 step) or 2 (4 steps) give ~3e-5.
    Cost: one C + 3 rounds per iteration, one fewer under ``tables`` with two parties
    (:func:`_guess_and_product`). ``linear``: the linear first guess alone (C + 1 rounds, relative
    error 8.8e-5 at 16 steps), where :func:`_linear_guess` applies, as in :func:`scaled_inv_sqrt`.
    """
    guess = _linear_guess(x, lo_exp, hi_exp, -0.5, steps) if linear else None
    if guess is not None:
        return guess[0]
    if iterations == 0:
        return _bucket_guess(x, lo_exp, hi_exp, -0.5, steps)
    y, xy = _guess_with_product(x, lo_exp, hi_exp, -0.5, steps)
    for i in range(iterations):
        # (x y) y rather than x (y^2): for large x, y^2 has too few fixed-point bits
        y = y * (3 - (x * y if i else xy) * y) * 0.5
    return y


# ---------------------------------------------------------------- softmax


MASK_PENALTY = 64.0


def exp_shifted(shifted, keep, exp: str, exp_iterations: int):
    """e^x * keep for x = values minus their row max (x <= 0), a secret 0/1 ``keep`` broadcastable to x
    with as many dimensions (None: nothing masked): :func:`exp_clipped` where ``exp`` is ``"clipped"`` and
    it is available, else :func:`exp_nonpositive` (and the product with ``keep``)."""
    if exp == "clipped" and clipped_exp_available():
        if keep is None:
            keep = crypten.cryptensor(torch.ones([1] * (shifted.dim() - 1) + [shifted.size(-1)]), device=shifted.device)
        return exp_clipped(shifted, keep)
    e = exp_nonpositive(shifted, exp_iterations)
    return e if keep is None else e * keep


def _masked_exp(scores, key_mask, exp_iterations: int, max_arity: int, exp: str):
    """The exponentials of :func:`masked_softmax` (masked keys zero), their row sums, and the
    reciprocal's top octave."""
    if exp not in ("clipped", "limit"):
        raise ValueError(f"softmax exp must be 'clipped' or 'limit', not {exp!r}")
    shifted = scores + (key_mask - 1) * MASK_PENALTY
    shifted = shifted - row_max(shifted, max_arity, shift_only=True)
    e = exp_shifted(shifted, key_mask, exp, exp_iterations)
    # the max may be up to 1.0 below the true one under ``tables`` (MAX_LANES): terms up to e, sums up to T e
    hi_exp = max(1, math.ceil(math.log2(scores.size(-1))) + (2 if COMPARISON["method"] == "tables" else 1))
    return e, e.sum(dim=-1, keepdim=True), hi_exp  # sums <= 2^hi_exp


def masked_softmax(scores, key_mask, exp_iterations: int, reciprocal_iterations: int, steps: int = 1,
                   max_arity: int = 2, exp: str = "clipped"):
    """Softmax over the last dim of ``scores``, ignoring keys where ``key_mask`` is 0.

    ``key_mask`` is a secret 0/1 tensor broadcastable to ``scores`` (padding is
    private: only the bucket length is public). Masked keys get a penalty of
    64 before the max, so that a padded key's score does not set the shift; this
    needs score ranges below 256 - 64 (the max's lanes; measured BERT ranges < 140).
    The exponentials are then multiplied by the mask, so masked keys count
    exactly zero even if a masked score exceeded every real one.
    ``exp="clipped"`` (where :func:`clipped_exp_available`): :func:`exp_clipped`, the mask applied
    inside it (5 rounds); otherwise, or with ``exp="limit"``, :func:`exp_nonpositive` (n rounds,
    valid for s - max > -2^n) and the mask's product (1).
    Cost: row_max + exp + C + 2 x reciprocal_iterations (the last Newton step folded into the
    normalisation, :func:`scaled_reciprocal`).
    """
    e, total, hi_exp = _masked_exp(scores, key_mask, exp_iterations, max_arity, exp)
    return scaled_reciprocal(total, e, -1, hi_exp, reciprocal_iterations, steps, coarse=True)  # total <= T


#: :func:`masked_softmax_matmul`'s linear guess is of 2^SOFTMAX_GUESS_EXP / sum e, and e V is truncated by as much
#: more: the row sums span [1, 2^9], so neither factor keeps fewer than ~2^-17 relative (docs/performance.md).
SOFTMAX_GUESS_EXP = 4


def masked_softmax_matmul(scores, key_mask, values, exp_iterations: int, reciprocal_iterations: int, steps: int = 1,
                          max_arity: int = 2, exp: str = "clipped", linear: bool = False):
    """``masked_softmax(scores, key_mask, ...) @ values`` with the normalisation after the product.

    softmax(s) V = diag(1 / sum_j e_j) (e V): each row's reciprocal is a scalar, so it can scale the
    product of the unnormalised exponentials with the values. Under ``tables`` (two parties) e V travels
    in the round that converts the reciprocal's guess (:func:`_guess_and_product`), and the Newton step
    y (2 - x y) is applied to e V's rows (head_dim wide, not keys wide): from the exponentials to the
    context, C + 3 rounds instead of C + 3 + 1, and fewer bytes. ``linear`` (where :func:`_linear_guess`
    applies): y' = 16 / sum e from the linear guess, e V in the same round and truncated by 16 more,
    then (e V / 16) y': C + 2 rounds. Otherwise :func:`masked_softmax`, then the product.
    """
    e, total, hi_exp = _masked_exp(scores, key_mask, exp_iterations, max_arity, exp)
    if linear:
        guess = _linear_guess(total, -1, hi_exp, -1.0, steps, coarse=True, scale_exp=SOFTMAX_GUESS_EXP,
                              extra=[("matmul", e, values)])
        if guess is not None:
            y, ev = guess
            ev._tensor.div_(2**SOFTMAX_GUESS_EXP)
            return ev * y
    folded = None
    if reciprocal_iterations:
        folded = _guess_and_product(total, -1, hi_exp, -1.0, steps, coarse=True, extra=[("matmul", e, values)])
    if folded is None:
        return matmul(scaled_reciprocal(total, e, -1, hi_exp, reciprocal_iterations, steps, coarse=True), values)
    y, xy, ev = folded
    for _ in range(reciprocal_iterations - 1):
        y = y * (2 - xy)
        xy = total * y
    return (ev * y) * (2 - xy)
