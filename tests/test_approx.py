"""Each approximation against torch, within the error bound stated in its docstring.

These run in a one-process CrypTen world: the arithmetic (fixed point,
comparison circuits, Newton iterations) is the same as with several parties;
only the communication is absent.
"""

from __future__ import annotations

import math

import pytest
import torch

from mpc_lm import approx
from mpc_lm._compat import import_crypten

crypten = import_crypten()


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    if not crypten.is_initialized():
        crypten.init()
    yield


def enc(x):
    return crypten.cryptensor(x)


def test_gelu_within_bound_everywhere():
    x = torch.linspace(-20, 20, 4001)
    err = (approx.gelu(enc(x)).get_plain_text() - torch.nn.functional.gelu(x)).abs().max().item()
    assert err < 3e-4  # fit 3.5e-5 + tail 1.3e-4 + fixed point


def test_tanh_within_bound():
    x = torch.linspace(-12, 12, 2001)
    assert (approx.tanh(enc(x)).get_plain_text() - torch.tanh(x)).abs().max().item() < 8e-4


def test_relu_is_exact_up_to_fixed_point():
    x = torch.randn(1000) * 5
    assert (approx.relu(enc(x)).get_plain_text() - torch.relu(x)).abs().max().item() < 2 ** -15


def test_exp_absolute_error():
    x = torch.linspace(-60, 0, 3001)
    err = (approx.exp_nonpositive(enc(x), 8).get_plain_text() - x.exp()).abs().max().item()
    assert err < 3e-3


def test_row_max_odd_and_even_lengths():
    for n in (1, 2, 5, 16, 17):
        x = torch.randn(3, n) * 10
        got = approx.row_max(enc(x)).get_plain_text()
        assert torch.allclose(got, x.max(-1, keepdim=True).values, atol=1e-4)


def test_reciprocal_relative_error_over_softmax_range():
    x = torch.linspace(0.5, 256, 1000)
    got = approx.reciprocal(enc(x), -1, 9, 4).get_plain_text()
    # fixed point limits the relative precision of small results: |1/x| >= 1/256 = 256 ulp
    assert ((got - 1 / x).abs() / (1 / x)).max().item() < 6e-3


def test_inv_sqrt_over_layernorm_variance_range():
    v = torch.logspace(math.log10(2e-3), math.log10(4000), 500)
    got = approx.inv_sqrt(enc(v), -12, 14, 3).get_plain_text()
    rel = ((got - v.rsqrt()) / v.rsqrt()).abs()
    assert rel[v > 0.01].max().item() < 2e-3
    assert rel.max().item() < 1e-2  # tiny variances: the input itself has few significant bits


def test_masked_softmax_ignores_masked_keys():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 8, 8) * 6
    m = torch.ones(2, 1, 1, 8)
    m[0, ..., 5:] = 0
    got = approx.masked_softmax(enc(s), enc(m), 8, 4).get_plain_text()
    ref = torch.softmax(s.masked_fill(m == 0, float("-inf")), -1)
    assert (got - ref).abs().max().item() < 5e-3
    assert got[0, ..., 5:].abs().max().item() < 1e-4


def test_chebyshev_matches_numpy():
    import numpy as np

    coeffs = [0.3, -0.5, 0.25, 0.1, -0.05, 0.02]
    v = torch.linspace(-1, 1, 101)
    ref = np.polynomial.chebyshev.chebval(v.numpy(), coeffs)
    got = approx.chebyshev(enc(v), coeffs).get_plain_text().numpy()
    assert np.abs(got - ref).max() < 1e-3


def test_open_to_decodes_negative_values_exactly():
    """CrypTen 0.4.1's decoder is off by 1.0 just above negative integers (-262,142 = -3.99997 read as
    -4.99997); mpc_lm.reveal is not, and neither is CrypTen's once mpc_lm._compat has replaced it, so
    get_plain_text (tests, diagnostics) reads the ring value too."""
    import crypten.encoder as encoder

    from mpc_lm._compat import _exact_decode
    from mpc_lm.reveal import decode

    raw = torch.arange(-3 * 65536, 3 * 65536, dtype=torch.long)
    exact = raw.double() / 65536
    assert (decode(raw, 65536).double() - exact).abs().max().item() < 1e-6
    assert encoder.FixedPointEncoder.decode is _exact_decode
    patched = encoder.FixedPointEncoder(precision_bits=16).decode(raw).double()
    assert (patched - exact).abs().max().item() < 2**-20
    x = torch.tensor([-3.99997, -1.99999, -4.549, 2.5, -0.00001, -127.99999])
    assert (enc(x).get_plain_text() - x).abs().max() < 2**-15


def test_secret_tensor_attributes_skip_the_validation_mode_lookup():
    """mpc_lm._compat removes CrypTen's validation-mode wrapper from CrypTensor.__getattribute__ (an
    OmegaConf read on every attribute of every secret tensor); attribute reads and autograd dispatch
    are those of the function it wrapped."""
    from mpc_lm._compat import import_crypten

    crypten = import_crypten()
    getter = crypten.CrypTensor.__dict__["__getattribute__"]
    assert not hasattr(getter, "__wrapped__") and getter.__qualname__ == "CrypTensor.__getattribute__"
    x = enc(torch.tensor([1.5, -2.0]))
    assert torch.allclose((x * 2 + x).get_plain_text(), torch.tensor([4.5, -6.0]))


_FIXED_SETTINGS_SCRIPT = """
from mpc_lm._compat import fix_party_settings, import_crypten, validation_mode
crypten = import_crypten()
from crypten.config import cfg
from crypten.encoder import FixedPointEncoder
cfg.encoder.precision_bits = 12
cfg.mpc.provider = "TTP"
fix_party_settings(crypten)
out = [FixedPointEncoder().scale, type(crypten.mpc.get_default_provider()).__name__, validation_mode()]
with cfg.temp_override({"encoder.precision_bits": 20, "mpc.provider": "TFP", "debug.validation_mode": True}):
    out += [FixedPointEncoder().scale, type(crypten.mpc.get_default_provider()).__name__, validation_mode()]
out += [FixedPointEncoder().scale, FixedPointEncoder(8).scale, validation_mode()]
print(out)
"""


def test_party_settings_read_once_and_overrides_still_seen():
    """A party process reads CrypTen's precision, provider and validation mode once
    (``_compat.fix_party_settings``: each OmegaConf read is ~20 us and a generation step makes thousands);
    a ``temp_override`` (a new config object) is still seen, and explicit precisions are kept."""
    import subprocess
    import sys

    got = subprocess.run([sys.executable, "-c", _FIXED_SETTINGS_SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert got == str([2**12, "TrustedThirdParty", False,
                       2**20, "TrustedFirstParty", True, 2**12, 2**8, False])


def test_row_max_groups_of_four_lengths_and_ties():
    torch.manual_seed(3)
    for n in (1, 2, 3, 4, 5, 8, 13, 16, 33, 128):
        x = torch.randn(3, n) * 10
        x[0, :] = 2.5  # all tied
        if n > 3:
            x[1, 1] = x[1, 3] = x[1].max() + 1  # a tie for the maximum
        got = approx.row_max(enc(x), 4).get_plain_text()
        assert torch.allclose(got, x.max(-1, keepdim=True).values, atol=1e-3), n


def test_finer_first_guess_needs_fewer_newton_steps():
    x = torch.linspace(0.5, 256, 1000)
    got = approx.reciprocal(enc(x), -1, 9, 2, steps=4).get_plain_text()
    assert ((got - 1 / x).abs() / (1 / x)).max().item() < 6e-3
    v = torch.logspace(math.log10(2e-3), math.log10(4000), 500)
    got = approx.inv_sqrt(enc(v), -12, 14, 2, steps=4).get_plain_text()
    rel = ((got - v.rsqrt()) / v.rsqrt()).abs()
    assert rel[v > 0.01].max().item() < 2e-3
    assert rel.max().item() < 1e-2


def test_softmax_with_default_settings_matches_torch():
    from mpc_lm.config import Approximations

    ap = Approximations()
    torch.manual_seed(1)
    s = torch.randn(2, 3, 16, 16) * 5
    m = torch.ones(2, 1, 1, 16)
    m[1, ..., 11:] = 0
    got = approx.masked_softmax(enc(s), enc(m), ap.exp_iterations, ap.reciprocal_iterations,
                                ap.guess_steps_per_octave, ap.max_arity).get_plain_text()
    want = torch.softmax(s.masked_fill(m == 0, -1e9), -1)
    assert (got - want).abs().max().item() < 5e-3


def test_mul_batch_mixed_shapes_and_squares_match_torch():
    torch.manual_seed(3)
    x, y, z = torch.randn(4, 6, 8) * 3, torch.randn(4, 6, 1), torch.randn(8)
    ex, ey, ez = enc(x), enc(y), enc(z)
    got = approx.mul_batch([(ex, ex), (ex, ey), (ex, ez), (ey, ey)])
    for g, want in zip(got, [x * x, x * y, x * z, y * y]):
        assert g.size() == want.size()
        assert (g.get_plain_text() - want).abs().max().item() < 1e-3


def test_scaled_newton_steps_match_the_product():
    torch.manual_seed(4)
    v = torch.logspace(math.log10(2e-3), math.log10(4000), 200).reshape(200, 1)
    a = torch.randn(200, 16)
    got = approx.scaled_inv_sqrt(enc(v), enc(a), -12, 14, 2, steps=4).get_plain_text()
    want = a * v.rsqrt()
    assert ((got - want).abs() / want.abs().clamp_min(1e-2))[v.squeeze(1) > 0.01].max().item() < 2e-2
    t = torch.linspace(1, 128, 200).reshape(200, 1)
    got = approx.scaled_reciprocal(enc(t), enc(a), -1, 8, 2, steps=4).get_plain_text()
    assert (got - a / t).abs().max().item() < 2e-3



@pytest.mark.parametrize("lo, hi, power, scale_exp", [(-12, 14, -0.5, 0), (-1, 9, -1.0, approx.SOFTMAX_GUESS_EXP),
                                                      (-1, 7, -1.0, 0)])
def test_linear_guess_truncates_small_terms(lo, hi, power, scale_exp):
    """The linear first guess's truncated terms s_j (x - t_j) stay below 2^LINEAR_TERM_LIMIT_BITS ring units for
    every x inside the range: a 2-party truncation of v fails with probability ~|v| / 2^64 and then adds
    ~2^25 to the guess, so this bounds that risk per guess by 2^-28 (docs/accuracy.md, "Rare outliers").
    Only the lowest bucket, below the range, may exceed it (its slope keeps 16 fractional bits)."""
    steps = 16
    first, between, groups = approx._linear_lines(lo, hi, power, steps, scale_exp)
    edges = [2.0 ** (k / steps) for k in range(lo * steps, hi * steps + 1)]
    x = (2.0 ** torch.linspace(lo, hi, 200001, dtype=torch.float64) * 2**16).round() / 2**16  # encoded inputs
    bucket = torch.bucketize(x, torch.tensor(edges[1:], dtype=torch.float64), right=True)
    intercepts = torch.tensor([first] + list(between), dtype=torch.float64).cumsum(0)
    limit, biggest = 2.0**approx.LINEAR_TERM_LIMIT_BITS, 0.0
    guess = intercepts[bucket] / 2**16
    for start, stop, slopes, divisor, lower in groups:
        for j, s, t in zip(range(start, stop), slopes, lower):
            inside = bucket == j
            term = s * (x[inside] * 2**16 - t)  # ring units before the truncation by divisor
            if inside.any() and j > 0:
                biggest = max(biggest, float(term.abs().max()))
            guess[inside] += term / divisor / 2**16
    assert biggest <= limit, math.log2(biggest)
    # and the lines are still the fit (2.3e-4 relative for 1/x, 8.8e-5 for 1/sqrt x), plus the rounding of the
    # encoded intercepts and slopes
    want = 2.0**scale_exp * x**power
    fit = 2.4e-4 if power == -1.0 else 9e-5
    assert ((guess - want).abs() <= fit * want + 2**-16).all(), float(((guess - want).abs() - fit * want).max())


@pytest.mark.parametrize("lo, hi, power, scale_exp", [(-12, 14, -0.5, 0), (-1, 9, -1.0, approx.SOFTMAX_GUESS_EXP)])
def test_linear_terms_in_one_pass_equal_the_groups_one_by_one(lo, hi, power, scale_exp):
    """The linear guess's terms, all groups at once (prefix sums, one shift per group), are bit-identical to
    each group summed, truncated as two parties' shares are (mpc_lm.ring.truncate) and added one by one."""
    from mpc_lm import ring

    steps = 16
    _, _, groups = approx._linear_lines(lo, hi, power, steps, scale_exp)
    lines = approx._linear_tensors(lo, hi, power, steps, scale_exp, "cpu")
    gen = torch.Generator().manual_seed(7)
    k = (hi - lo) * steps + 1
    one_hot = torch.randint(-(2**63), 2**63 - 1, (k, 5, 1), generator=gen)
    one_hot_bits = torch.randint(-(2**63), 2**63 - 1, (k, 5, 1), generator=gen)
    for first in (True, False):
        want = torch.zeros(5, 1, dtype=torch.long)
        for start, stop, slopes, divisor, lower in groups:
            s = torch.tensor(slopes).view(-1, 1, 1)
            values = (one_hot[start:stop] * s - one_hot_bits[start:stop] * (s * torch.tensor(lower).view(-1, 1, 1))).sum(0)
            want += ring.truncate(values, divisor, first)
        assert torch.equal(approx._linear_terms(one_hot, one_hot_bits, lines, first), want)
