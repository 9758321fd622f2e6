"""Comparisons from dealer-dealt tables: the sign of a shared lane in one opening plus one or two AND rounds.

Design and measurements: docs/performance.md (lever 9). The setting is the one of the packed
adder (:func:`mpc_lm.approx._lane_adder`): two computing parties hold integers ``u`` and ``v``
in [0, 2^L) (bits of their shares of a fixed-point value, L = 16 or 32), and want XOR shares of
the top bit of ``y = u + v mod 2^L`` (the sign of y read as a signed L-bit number).

For each element the dealer draws a random ``r`` in [0, 2^L) (additively shared: each party
draws its share from the seed it shares with the dealer) and deals XOR shares of *tables*:
for the low L - 1 bits of r cut into chunks (7 + 8 bits for L = 16; 7 + 8 + 8 + 8 for L = 32)
and each possible value t of a chunk, the bits [t < r_k] and, for all chunks but the last,
[t == r_k]; the top chunk's less-than table is XORed with r's top bit. Online:

1. each party adds its share of r to its lane value; the two sums are opened together
   (one round, the lanes packed 64 / L per ring word), so both parties learn c = y + r mod 2^L,
   which is uniform whatever y is;
2. y's top bit is c's top bit XOR r's top bit XOR [c_low < r_low] (a borrow), and with c
   public every chunk's [c_k < r_k] and [c_k == r_k] is a local look-up in the tables;
3. the chunks are combined from the top: lt = lt_hi XOR (eq_hi AND lt_lo), eq = eq_hi AND eq_lo,
   one round of batched ANDs (bits packed 64 per word) per level of the pairwise tree:
   1 round for L = 16, 2 for L = 32.

Rounds: 2 (L = 16) or 3 (L = 32) instead of the adder's 5 or 6. Bytes per element and party:
L / 8 for the opening plus 2 / 8 per AND level (CrypTen's counters count 8 bytes per packed
word), against about 80 (L = 16) for the adder. The dealer sends party 0 its table shares:
64 bytes per element for L = 16, 192 for L = 32 (party 1 draws its shares from its seed).

What travels between the parties is c (uniform, since r is uniform and unknown to both) and
the Beaver-masked AND openings; the dealer receives nothing but the number of elements and L.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from . import offline
from ._compat import import_crypten, plain_ring

crypten = import_crypten()

#: Chunk widths of the low L - 1 bits, from the top, per lane width L (10: the row max's coarse
#: lanes, one chunk, so its comparisons take the opening alone; 12: the softmax's clip and mask bits,
#: two chunks whose three tables share two words, 16 bytes per element).
CHUNKS = {10: (9,), 12: (5, 6), 16: (7, 8), 32: (7, 8, 8, 8), 64: (7, 8, 8, 8, 8, 8, 8, 8)}

#: Wide chunks, asked for by callers with few elements and many thresholds (a LayerNorm's or a softmax
#: sum's first guess: one element per row): one AND round fewer (32-bit: 2 rounds; 16-bit: the opening
#: alone) for 16 KB / 4 KB of tables per element, used while one call's tables stay within WIDE_BYTES.
WIDE_CHUNKS = {16: (15,), 32: (15, 16), 64: (15, 16, 16, 16)}
WIDE_BYTES = 32 * 2**20

#: Deep chunks, asked for by callers whose comparison runs beside a longer protocol (GELU's and tanh's
#: pieces beside their polynomials): one AND round more (16-bit: 3 rounds), 16 bytes of tables per
#: element instead of 64 (seven tables of 16 or 8 entries packed into two words).
DEEP_CHUNKS = {16: (4, 4, 4, 3)}

#: The chunk forms a caller may ask for (public: shapes and the call site decide, so plan and dealer agree).
FORMS = ("narrow", "wide", "deep")


def _mask(lane_bits: int) -> int:
    """The lane's bits as an int64 mask (all ones for the whole 64-bit ring element)."""
    return -1 if lane_bits == 64 else (1 << lane_bits) - 1


def widths(lane_bits: int, n: int, form: str = "narrow") -> tuple[int, ...]:
    """The chunk widths for ``n`` elements of ``lane_bits``-bit lanes (public: shapes and the caller's
    ``form``: "narrow" (:data:`CHUNKS`), "wide" (:data:`WIDE_CHUNKS` while within :data:`WIDE_BYTES`)
    or "deep" (:data:`DEEP_CHUNKS`); either falls back to narrow where it has no entry)."""
    if lane_bits not in CHUNKS:
        raise ValueError(f"comparison tables exist for {sorted(CHUNKS)}-bit lanes, not {lane_bits}")
    if form not in FORMS:
        raise ValueError(f"table form must be one of {FORMS}, not {form!r}")
    if form == "wide" and lane_bits in WIDE_CHUNKS:
        chunks = WIDE_CHUNKS[lane_bits]
        if n * _place(chunks)[1] * 8 <= WIDE_BYTES:
            return chunks
    if form == "deep" and lane_bits in DEEP_CHUNKS:
        return DEEP_CHUNKS[lane_bits]
    return CHUNKS[lane_bits]


def _place(chunk_widths) -> tuple[list[tuple[int, int | None]], int]:
    """Bit offsets of each chunk's less-than and equality tables, and the words per element: a table of
    2^b entries takes 2^b bits; tables of 64 entries or more start on a word, smaller ones share words."""
    offsets, bit = [], 0

    def place(size: int) -> int:
        nonlocal bit
        if size >= 64 or bit % 64 + size > 64:
            bit = -(-bit // 64) * 64
        at, bit = bit, bit + size
        return at

    for k, bits in enumerate(chunk_widths):
        lt = place(1 << bits)
        eq = place(1 << bits) if k < len(chunk_widths) - 1 else None
        offsets.append((lt, eq))
    return offsets, -(-bit // 64)


def layout(lane_bits: int, n: int, form: str = "narrow") -> tuple[list[tuple[int, int, int, int | None]], int]:
    """Per chunk (shift, bits, bit offset of its less-than table, of its equality table or None); and the
    words per element, for ``n`` elements."""
    chunk_widths = widths(lane_bits, n, form)
    offsets, words = _place(chunk_widths)
    chunks, shift = [], lane_bits - 1
    for bits, (lt, eq) in zip(chunk_widths, offsets):
        shift -= bits
        chunks.append((shift, bits, lt, eq))
    return chunks, words


def words_per_element(lane_bits: int, n: int, form: str = "narrow") -> int:
    return layout(lane_bits, n, form)[1]


def build(r: torch.Tensor, lane_bits: int, form: str = "narrow") -> torch.Tensor:
    """The tables of the plain masks ``r`` (int64, shape (n,)), as (n, words) packed bit words (dealer)."""
    r = r.reshape(-1) & _mask(lane_bits)
    top = (r >> (lane_bits - 1)) & 1
    chunks, words = layout(lane_bits, r.numel(), form)
    out = torch.zeros(r.numel(), words, dtype=torch.long, device=r.device)
    for k, (shift, bits, lt, eq) in enumerate(chunks):
        value = (r >> shift) & ((1 << bits) - 1)
        flip = top if k == 0 else None  # r's top bit folded into the top chunk's less-than table
        for offset, below in ((lt, True), (eq, False)):
            if offset is None:
                continue
            if bits >= 6:  # whole words: how many of each word's 64 entries are below (at) r_k
                starts = torch.arange((1 << bits) // 64, device=r.device, dtype=torch.long) * 64
                d = value.unsqueeze(1) - starts.unsqueeze(0)
                one = torch.ones_like(d)
                if below:
                    table = torch.where(d >= 64, -one, torch.where(d <= 0, 0 * one, (one << d.clamp(0, 63)) - 1))
                    if flip is not None:
                        table = table ^ (-flip).unsqueeze(1)
                else:
                    table = torch.where((d >= 0) & (d < 64), one << d.clamp(0, 63), 0 * one)
                out[:, offset // 64 : offset // 64 + table.size(1)] = table
            else:  # a field of 2^bits entries inside a word
                field = ((1 << value) - 1) if below else (1 << value)
                if below and flip is not None:
                    field = field ^ (flip * ((1 << (1 << bits)) - 1))
                out[:, offset // 64] |= field << (offset % 64)
    return out


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 int64 tensor (n,) to ceil(n / 64) words: element j is bit j % 64 of word j // 64. On the CPU by
    numpy's ``packbits`` (little-endian bit order in each byte of a little-endian word: the same layout),
    2-4x faster than the shifts and sum, which stay for other devices."""
    n = bits.numel()
    pad = (-n) % 64
    if bits.device.type == "cpu" and sys.byteorder == "little":
        b = bits.reshape(-1).to(torch.uint8)
        if pad:
            b = torch.cat([b, b.new_zeros(pad)])
        return torch.from_numpy(np.packbits(b.numpy(), bitorder="little").view(np.int64))
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    shifts = torch.arange(64, device=bits.device, dtype=torch.long)
    return (bits.view(-1, 64) << shifts).sum(1)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``words`` as a 0/1 int64 tensor (the inverse of :func:`pack_bits`)."""
    if words.device.type == "cpu" and sys.byteorder == "little":
        raw = words.reshape(-1).contiguous().numpy().view(np.uint8)
        return torch.from_numpy(np.unpackbits(raw, bitorder="little", count=n)).to(torch.long)
    shifts = torch.arange(64, device=words.device, dtype=torch.long)
    return ((words.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n]


def pack_lanes(values: torch.Tensor, lane_bits: int) -> torch.Tensor:
    """Integers in [0, 2^lane_bits) (n,) to ceil(n / lanes) words, 64 / lane_bits lanes per word."""
    lanes = 64 // lane_bits
    n = values.numel()
    if n % lanes:
        values = torch.cat([values, values.new_zeros(lanes - n % lanes)])
    word = values[0::lanes]
    for j in range(1, lanes):
        word = word | (values[j::lanes] << (j * lane_bits))
    return word


def unpack_lanes(words: torch.Tensor, lane_bits: int, n: int) -> torch.Tensor:
    lanes = 64 // lane_bits
    parts = [(words >> (j * lane_bits)) & _mask(lane_bits) for j in range(lanes)]
    return torch.stack(parts, 1).reshape(-1)[:n]


def key(n: int, lane_bits: int, device, form: str = "narrow"):
    """This party's (shares of r mod 2^L as int64 (n,), table shares (n, words)) from the current
    provider, or None when it deals no tables (then the caller uses the adder)."""
    source = offline.dealt_by("comparison_key")
    if source == "dealer":
        return crypten.mpc.get_default_provider().comparison_key(n, lane_bits, device=device, form=form)
    if source == "tfp":  # insecure development mode: party 0 makes the tables
        return tfp_key(n, lane_bits, device, form)
    return None


def tfp_key(n: int, lane_bits: int, device, form: str = "narrow"):
    """The key made by party 0 and secret-shared from it (CrypTen's TFP convention)."""
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor

    r = generate_random_ring_element((n,), device=device)
    tables = build(plain_ring(r), lane_bits, form)
    r_share = ArithmeticSharedTensor(r, precision=0, src=0).share
    t_share = BinarySharedTensor(tables, src=0).share
    return plain_ring(r_share), plain_ring(t_share)


def sign_protocol(values: torch.Tensor, lane_bits: int, dealt, offsets=None, form: str = "narrow"):
    """Protocol (for :func:`mpc_lm.approx.lockstep`), same contract as the adder: the top bit of
    ``values`` (this party's) plus the other party's, mod 2^L, as single-bit XOR shares (a
    BinarySharedTensor of ``values``' shape). ``dealt``: this party's :func:`key`.

    ``offsets`` (public integers T_1..T_K): instead, the top bits of y - T_k for every k, shape
    (K, *values' shape), from the SAME opening and tables: c - T_k is public, so each threshold
    is one more look-up and one more lane in the AND rounds, not another key or opening.
    ``form``: as the key was asked for (:func:`widths`)."""
    from crypten.mpc.primitives import BinarySharedTensor

    rank = crypten.communicator.get().get_rank()
    r_share, tables = dealt
    size = values.size()
    n = values.numel()
    full = _mask(lane_bits)
    mine = (values.reshape(-1) + r_share) & full
    packed = pack_lanes(mine, lane_bits)
    (total,) = yield [("sum", packed, None)]
    c = (mine + unpack_lanes(total - packed, lane_bits, n)) & full  # the other party's word: sum - mine
    if offsets is None:
        c = c.unsqueeze(0)
    else:
        c = (c.unsqueeze(0) - torch.as_tensor(offsets, dtype=torch.long, device=c.device).view(-1, 1)) & full
    chunks, words = layout(lane_bits, n, form)
    tables = tables.contiguous()
    row_start = None

    def look(offset, bits, index):
        """Entry ``index`` of the table of 2^bits entries at bit ``offset`` of each element's words."""
        nonlocal row_start
        if bits <= 6:  # within one word (tables of <= 64 entries never straddle one): a shift, no gather
            return (tables[:, offset // 64] >> (offset % 64)).unsqueeze(0) >> index & 1
        if row_start is None:
            row_start = torch.arange(n, device=c.device) * words  # each element's first word, flat
        word = torch.take(tables, row_start + (offset // 64) + (index >> 6))  # whole words: offset % 64 == 0
        return (word >> (index & 63)) & 1

    nodes = []
    for shift, bits, lt, eq in chunks:
        index = (c >> shift) & ((1 << bits) - 1)
        nodes.append((look(lt, bits, index).reshape(-1), None if eq is None else look(eq, bits, index).reshape(-1)))
    m = c.numel()
    while len(nodes) > 1:
        pairs = [(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
        left, right = [], []
        for (_, eq_hi), (lt_lo, eq_lo) in pairs:
            left.append(eq_hi)
            right.append(lt_lo)
            if eq_lo is not None:
                left.append(eq_hi)
                right.append(eq_lo)
        x = BinarySharedTensor.from_shares(torch.stack([pack_bits(b) for b in left]))
        y = BinarySharedTensor.from_shares(torch.stack([pack_bits(b) for b in right]))
        (prod,) = yield [("and", x, y)]
        words = plain_ring(prod.share)
        merged, k = [], 0
        for (lt_hi, _), (_, eq_lo) in pairs:
            lt = lt_hi ^ unpack_bits(words[k], m)
            k += 1
            eq = None
            if eq_lo is not None:
                eq = unpack_bits(words[k], m)
                k += 1
            merged.append((lt, eq))
        if len(nodes) % 2:
            merged.append(nodes[-1])
        nodes = merged
    bit = nodes[0][0]
    if rank == 0:
        bit = bit ^ ((c.reshape(-1) >> (lane_bits - 1)) & 1)
    return BinarySharedTensor.from_shares(bit.reshape(size if offsets is None else (len(offsets), *size)))
