"""mpc_lm.ring: exact 64-bit ring products on float64 BLAS, bit-identical to int64 torch.matmul."""

import pytest
import torch

from mpc_lm import ring
from mpc_lm._compat import import_crypten

import_crypten()

LO, HI = -(2**63), 2**63 - 1


@pytest.fixture(autouse=True)
def _digits(monkeypatch):
    """The digit products under test, whatever this machine's measured choice is (ring.choose)."""
    monkeypatch.setitem(ring.PRODUCTS, "method", "digits")


def _ring(*size, gen):
    return torch.randint(LO, HI, size, dtype=torch.int64, generator=gen)


@pytest.mark.parametrize("a_size,b_size", [
    ((5, 7), (7, 3)),                 # plain
    ((2, 3, 16, 8), (2, 3, 8, 16)),   # attention scores: batched heads
    ((2, 16, 48), (48, 80)),          # a linear layer on (B, T, H)
    ((48,), (48, 80)),                # a vector
    ((2, 4, 30522), (30522, 8)),      # a one-hot embedding over a BERT vocabulary
])
def test_digit_product_is_bit_identical(a_size, b_size):
    gen = torch.Generator().manual_seed(sum(a_size) + sum(b_size))
    a, b = _ring(*a_size, gen=gen), _ring(*b_size, gen=gen)
    a.view(-1)[:2] = torch.tensor([LO, HI])  # the ring's extremes
    b.view(-1)[:2] = torch.tensor([HI, LO])
    assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))


def test_other_tensors_use_torch():
    x, w = torch.randn(3, 4), torch.randn(4, 2)
    assert torch.equal(ring.matmul(x, w), torch.matmul(x, w))


def _near_extreme(*size, gen):
    """Ring values whose digits are a_0 in [-2^21, -2^21 + 2^10), a_1, a_2 in [-2^20, -2^20 + 2^10):
    digit products near 2^42 with random low bits, so sums of them need all of float64's 53 bits."""
    def digit(top):
        return -(1 << top) + torch.randint(0, 1 << 10, size, generator=gen)
    return digit(21) + digit(20) * (1 << 22) + digit(20) * (1 << 43)  # int64 wraps modulo 2^64


@pytest.mark.parametrize("k", [ring.MAX_INNER, 3 * ring.MAX_INNER + 5])
def test_extreme_digits_stay_exact(k):
    """Digit products near their bound 2^42, summed over a whole block of the inner dimension."""
    gen = torch.Generator().manual_seed(k)
    a, b = _near_extreme(3, k, gen=gen), _near_extreme(k, 4, gen=gen)
    assert int(ring._digits(a)[0].min()) == -(1 << 21)
    assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))


def test_wider_blocks_would_lose_bits(monkeypatch):
    """The block bound is tight enough to matter: four times the block width loses exactness."""
    monkeypatch.setattr(ring, "MAX_INNER", 4 * ring.MAX_INNER)
    gen = torch.Generator().manual_seed(1)
    a, b = _near_extreme(3, ring.MAX_INNER, gen=gen), _near_extreme(ring.MAX_INNER, 4, gen=gen)
    assert not torch.equal(ring.matmul(a, b), torch.matmul(a, b))


def test_install_routes_crypten_products_and_uninstall_restores():
    from crypten.mpc.primitives import beaver
    from crypten.mpc.provider import ttp_provider

    ring.install()
    try:
        for module in (beaver, ttp_provider):
            assert module.torch.matmul is ring.matmul
            assert module.torch.zeros is torch.zeros and module.torch.any is torch.any
    finally:
        ring.uninstall()
    assert beaver.torch is torch and ttp_provider.torch is torch


@pytest.mark.parametrize("block", [7, 2**62], ids=["blocks-of-7", "one-block"])
@pytest.mark.parametrize("a_size,b_size", [((2, 3, 16, 8), (2, 3, 8, 16)), ((5, 48), (48, 37)), ((48,), (48, 5)),
                                           ((2, 3, 5000), (5000, 6))])
def test_cache_blocks_do_not_change_the_product(monkeypatch, a_size, b_size, block):
    """Digits and recombination in blocks of 7 entries' rows (block edges inside batches and rows), or in one
    pass over each tensor as on a GPU (``ring._blocks``), also over several blocks of the inner dimension."""
    monkeypatch.setattr(ring, "BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(11)
    a, b = _ring(*a_size, gen=gen), _ring(*b_size, gen=gen)
    assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))


def test_column_blocks_bound_the_digit_copies(monkeypatch):
    monkeypatch.setattr(ring, "CHUNK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(5)
    a, b = _ring(3, 2, 16, gen=gen), _ring(16, 37, gen=gen)  # 16 x 37 > 64: columns in blocks of 4
    assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))


def test_the_product_method_is_chosen_by_measurement_and_either_is_exact(monkeypatch):
    """auto times both methods once and keeps the faster; both give torch's int64 product."""
    monkeypatch.setitem(ring.PRODUCTS, "method", None)
    gen = torch.Generator().manual_seed(3)
    a, b = _ring(6, 40, gen=gen), _ring(40, 9, gen=gen)
    assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))  # first use decides
    measured = ring.PRODUCTS["measured"]
    faster = "int64" if measured["int64_s"] <= measured["digits_s"] else "digits"
    assert ring.PRODUCTS["method"] == faster
    for method in ("digits", "int64"):
        assert ring.choose(method) == method
        assert torch.equal(ring.matmul(a, b), torch.matmul(a, b))
    with pytest.raises(ValueError, match="auto, digits or int64"):
        ring.choose("float32")


@pytest.mark.parametrize("rows", [(1,), (3,), (2, 2), (1, 5), (9,), (2, 7)])
def test_int64_products_with_a_transposed_weight_are_bit_identical(monkeypatch, rows):
    """A tied LM head's E^T: row by row (mv) for few rows, (E a^T)^T for more; both torch's product."""
    monkeypatch.setitem(ring.PRODUCTS, "method", "int64")
    gen = torch.Generator().manual_seed(sum(rows))
    e, a = _ring(300, 24, gen=gen), _ring(*rows, 24, gen=gen)
    a.view(-1)[:2] = torch.tensor([LO, HI])
    want = torch.matmul(a, e.clone().t().contiguous())
    got = ring.matmul(a, e.t())
    assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(ring.matmul(a, e.t().contiguous()), want)  # an ordinary layout: torch.matmul


def test_truncation_by_shift_adds_up_to_the_value_divided():
    """Two parties' shares of v, each truncated by ring.truncate (the 2-party div_ after ring.install): the
    sum is floor(v / 2^16) or one more, v / 2^16 on average, unless the shares wrap (probability ~|v| / 2^64)."""
    g = torch.Generator().manual_seed(11)
    v = torch.randint(-(2**40), 2**40, (200_000,), generator=g)
    x0 = torch.randint(-(2**63), 2**63 - 1, v.shape, generator=g)
    x1 = v - x0  # wraps modulo 2^64, as ring shares do
    got = ring.truncate(x0, 2**16, True) + ring.truncate(x1, 2**16, False)
    off = got - torch.div(v, 2**16, rounding_mode="floor")
    assert int(((off < 0) | (off > 1)).sum()) <= 2  # wraps: expected ~2^41 / 2^64 * 2e5 ~ 0.02
    bias = (got.double() - v.double() / 2**16)[(off >= 0) & (off <= 1)].mean().item()
    assert abs(bias) < 0.01, bias  # unbiased; floor on both shares alone would be -1 unit
    assert torch.equal(ring.truncate(torch.tensor([-5, 5, -(2**20)]), 16, False), torch.tensor([-1, 0, -(2**16)]))
