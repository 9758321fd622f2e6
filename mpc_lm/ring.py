"""Exact products of 64-bit ring tensors on the CPU: torch's int64 kernel or float64 BLAS digits.

Every secret product ends in local matrix products of int64 ring tensors (shares, opened masked
values, the dealer's masks). On a GPU CrypTen splits them into exact floating-point blocks
(``CUDALongTensor``); on the CPU it calls ``torch.matmul`` on int64, which has no BLAS kernel: its
speed depends on the CPU's 64-bit vector multiplies (128 x 768 @ 768 x 3072: 1.1 s with 2 threads on a
2-core machine without AVX-512, 0.022 s with one thread on one with it; 0.13-0.15 s for the digits below).
:func:`choose` times both once per process and keeps the faster (docs/performance.md, lever 17).

:func:`matmul` writes each entry as three signed digits, a = a_0 + a_1 2^22 + a_2 2^43 (mod 2^64)
with a_0 in [-2^21, 2^21) and a_1, a_2 in [-2^20, 2^20), and forms a @ b modulo 2^64 from the digit
products whose shift is below 64: (0, 0), (0, 1), (1, 0), (0, 2), (2, 0), (1, 1) at shifts 0, 22, 22,
43, 43, 44 ((1, 2) and (2, 1) sit at 65 and vanish). That is 6 float64 matmuls' worth of work (a_i
against the digits b_0 .. b_(2-i) side by side), against 10 for four 16-bit limbs. Each digit
product is at most 2^42 in magnitude and the inner dimension is taken in blocks of K <= 2^11, so
every partial sum BLAS forms (and the two sums of equal shift added in float64) is an integer of
magnitude at most 2^53: exact. The result is bit-identical to ``torch.matmul`` on int64
(``tests/test_ring.py``).

:func:`install` routes CrypTen's Beaver products and its dealer's matmul triples through
:func:`matmul` (mpc_lm's own products call it directly), and two parties' local truncations by a power of
two through :func:`truncate` (a shift instead of int64 division). The stock-CrypTen baseline
(``approx.mode: crypten``) does not install it.
"""

from __future__ import annotations

import time
import types

import torch

from ._compat import validation_mode

DIGIT_SHIFTS = (0, 22, 43)  # a = a_0 + a_1 2^22 + a_2 2^43 (mod 2^64)
DIGIT_BITS = (22, 21, 21)
MAX_INNER = 1 << 11  # inner dimension per block: K 2^42 <= 2^53
CHUNK_ELEMENTS = 1 << 23  # entries of b per digit product (its digits: 3 x 8 bytes each, 192 MiB)
BLOCK_ELEMENTS = 1 << 16  # entries per elementwise pass (int64: 512 KiB, a core's cache)


def _fast(a, b) -> bool:
    # plain tensors only: CrypTen's CUDALongTensor (GPU shares) goes to torch.matmul, which it overrides
    return (type(a) is torch.Tensor and type(b) is torch.Tensor
            and a.dtype == torch.int64 and b.dtype == torch.int64
            and a.device.type == "cpu" and b.device.type == "cpu"
            and a.dim() >= 1 and b.dim() >= 2)


def _digits(x: torch.Tensor):
    """The signed digits a_0, a_1, a_2 of an int64 tensor (int64 tensors; see the module's docstring).
    Each is a sign-extending shift pair: a_0 = x's low 22 bits as a signed number, then a_1 the next 21
    bits of x - a_0, then a_2 the top 21 bits of what remains (exact: the bits below are zero)."""
    d0 = (x << 42) >> 42
    y = x - d0  # int64 arithmetic wraps modulo 2^64, as the ring does
    d1 = (y << 21) >> 43
    y -= d1 << 22
    return d0, d1, y >> 43


def _blocks(rows: int, width: int, device: torch.device):
    """Row ranges of about BLOCK_ELEMENTS entries on the CPU: each elementwise pass then reuses small cached
    temporaries instead of allocating weight-sized ones, which the OS faults in page by page
    (docs/performance.md, lever 15). On a GPU one range: every pass is a kernel launch."""
    if device.type != "cpu":
        return ((0, rows),)
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    return ((s, min(rows, s + step)) for s in range(0, rows, step))


def _left_digits(a: torch.Tensor) -> torch.Tensor:
    """(3, *a.shape) float64: a_0, a_1, a_2."""
    out = torch.empty((len(DIGIT_BITS), *a.shape), dtype=torch.float64, device=a.device)
    flat, dst = a.reshape(-1, a.size(-1)), out.view(len(DIGIT_BITS), -1, a.size(-1))
    for s, e in _blocks(flat.size(0), flat.size(1), a.device):
        for i, d in enumerate(_digits(flat[s:e])):
            dst[i, s:e].copy_(d)
    return out


def _right_digits(b: torch.Tensor) -> torch.Tensor:
    """(..., K, 3 N) float64: b_0, b_1, b_2 (..., K, N) side by side, so b_0 .. b_(2-i) is a prefix."""
    *batch, k, n = b.shape
    out = torch.empty((*batch, k, len(DIGIT_BITS), n), dtype=torch.float64, device=b.device)
    flat, dst = b.reshape(-1, n), out.view(-1, len(DIGIT_BITS), n)
    for s, e in _blocks(flat.size(0), n, b.device):
        for i, d in enumerate(_digits(flat[s:e])):
            dst[s:e, i].copy_(d)
    return out.view(*batch, k, len(DIGIT_BITS) * n)


# How CPU ring products are made in this process: "digits" (float64 BLAS, below) or "int64"
# (torch.matmul); None: not decided yet (measured on first use, :func:`choose`).
PRODUCTS: dict = {"method": None, "measured": None}


def _time(f, a, b, repeat: int = 3) -> float:
    f(a, b)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        f(a, b)
        best = min(best, time.perf_counter() - started)
    return best


def choose(method: str = "auto") -> str:
    """Set how this process makes CPU ring products: ``digits``, ``int64``, or ``auto`` (the faster of
    the two on one 32 x 512 @ 512 x 512 product, the best of 3 each: a few ms to ~0.1 s once per
    process). Both are exact and bit-identical; only the speed differs, and by machine: where the
    CPU has 64-bit vector multiplies (AVX-512) torch's int64 kernel is 4-15x faster than the digits,
    elsewhere it can be 10x slower (docs/performance.md, lever 17)."""
    if method == "auto":
        a = torch.randint(-(2**62), 2**62, (32, 512))
        b = torch.randint(-(2**62), 2**62, (512, 512))
        t_int64, t_digits = _time(torch.matmul, a, b), _time(_digit_matmul, a, b)
        PRODUCTS["measured"] = {"int64_s": round(t_int64, 6), "digits_s": round(t_digits, 6)}
        method = "int64" if t_int64 <= t_digits else "digits"
    elif method not in ("digits", "int64"):
        raise ValueError(f"ring products {method!r}: auto, digits or int64")
    PRODUCTS["method"] = method
    return method


def _gpu_operands(a, b):
    """(plain a, plain b, whether to wrap the result) for a product of int64 ring tensors on a GPU, plain or
    CrypTen's ``CUDALongTensor`` (the result is wrapped if either was); None for anything else."""
    wrapped = False
    plain = []
    for t in (a, b):
        if type(t) is not torch.Tensor:
            if type(t).__name__ != "CUDALongTensor":
                return None
            t, wrapped = t.tensor(), True
        plain.append(t)
    a, b = plain
    if not (a.dtype == torch.int64 and b.dtype == torch.int64 and a.is_cuda and b.is_cuda
            and a.dim() >= 1 and b.dim() >= 2):
        return None
    return a, b, wrapped


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` of int64 ring tensors modulo 2^64: on float64 BLAS digits for CPU tensors
    where that is faster on this machine (:func:`choose`; bit-identical), always on a GPU (torch has no
    int64 product on CUDA): 6 float64 products per block of the inner dimension where CrypTen's
    ``CUDALongTensor`` makes 16, with 3 float64 copies of each operand instead of 16 (docs/performance.md,
    lever 33). GPU operands may be plain or ``CUDALongTensor`` (CrypTen's shares); anything else goes to
    ``torch.matmul``."""
    if not _fast(a, b):
        gpu = _gpu_operands(a, b)
        if gpu is None:
            return torch.matmul(a, b)
        out = _blas_matmul(gpu[0], gpu[1])
        if gpu[2]:
            from crypten.cuda import CUDALongTensor

            return CUDALongTensor(out)
        return out
    if PRODUCTS["method"] is None:
        choose("auto")
    if PRODUCTS["method"] == "int64":
        return _int64_matmul(a, b)
    return _blas_matmul(a, b)


#: Rows of the left factor up to which a product with a transposed right factor is made row by row
#: (``torch.mv``): torch's int64 kernel is slowest there (1 x 768 @ (50257 x 768)^T: 0.5 s against
#: 0.03-0.04 s by ``mv``, one core of machine B), and from about 8 rows ``(b^T @ a^T)^T`` is faster.
MV_ROWS = 4


def _int64_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` on int64, with a transposed 2-D ``b`` (a tied LM head's ``E^T``, a view of a
    contiguous ``E``) read in ``E``'s own layout: ``mv`` per row for up to :data:`MV_ROWS` rows, else
    ``(E @ a^T)^T``. Bit-identical: every form sums the same int64 products modulo 2^64."""
    if b.dim() != 2 or b.is_contiguous() or not b.t().is_contiguous():
        return torch.matmul(a, b)
    e = b.t()  # (N, K), contiguous
    rows = a.reshape(-1, a.size(-1))
    if rows.size(0) <= MV_ROWS:
        out = torch.stack([torch.mv(e, r) for r in rows.unbind(0)])
    else:
        out = torch.matmul(e, rows.t()).t()
    return out.reshape(*a.shape[:-1], e.size(0))


def _blas_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`matmul` on float64 BLAS digits, whatever :func:`choose` decided."""
    k, n = b.shape[-2:]
    if k > MAX_INNER:  # blocks of the inner dimension, summed in the ring
        out = None
        for s in range(0, k, MAX_INNER):
            part = _blas_matmul(a[..., s : s + MAX_INNER], b[..., s : s + MAX_INNER, :])
            out = part if out is None else out.add_(part)
        return out
    if k * n > CHUNK_ELEMENTS and n > 1:  # bounded float64 digit copies: column blocks of b
        step = max(1, CHUNK_ELEMENTS // k)
        return torch.cat([_digit_matmul(a, b[..., i : i + step]) for i in range(0, n, step)], dim=-1)
    return _digit_matmul(a, b)


def _digit_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    al, bl = _left_digits(a), _right_digits(b)
    n = b.size(-1)
    p0 = torch.matmul(al[0], bl)  # a_0 b_0, a_0 b_1, a_0 b_2
    p1 = torch.matmul(al[1], bl[..., : 2 * n])  # a_1 b_0, a_1 b_1
    p2 = torch.matmul(al[2], bl[..., :n])  # a_2 b_0
    out = torch.empty(p2.shape, dtype=torch.int64, device=p2.device)
    q0, q1, q2, dst = p0.reshape(-1, 3 * n), p1.reshape(-1, 2 * n), p2.reshape(-1, n), out.view(-1, n)
    for s, e in _blocks(dst.size(0), 3 * n, p2.device):
        # float64 values are exact integers; int64 products and sums wrap modulo 2^64 as the ring does
        r0, r1, r2, o = q0[s:e], q1[s:e], q2[s:e], dst[s:e]
        o.copy_(r0[:, :n])
        o += (r0[:, n : 2 * n] + r1[:, :n]).to(torch.int64) << DIGIT_SHIFTS[1]
        o += (r0[:, 2 * n :] + r2).to(torch.int64) << DIGIT_SHIFTS[2]
        o += r1[:, n:].to(torch.int64) << (2 * DIGIT_SHIFTS[1])
    return out


class _TorchWithRingMatmul(types.ModuleType):
    """``torch`` as seen by a CrypTen module after :func:`install`: ``matmul`` is :func:`matmul`."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    matmul = staticmethod(matmul)


def truncate(share: torch.Tensor, divisor: int, first: bool) -> torch.Tensor:
    """One party's local truncation of its ring share by a power of two ``divisor``: party 0 (``first``) adds
    the divisor, then each shifts (floor). The two results add up to floor(v / d) or one more, and to v / d
    on average (rounding up with probability frac(v / d)) unless the shares wrap (probability ~|v| / 2^64).
    About ten times faster than CrypTen's int64 division toward zero; two floors alone would be one unit
    low on average."""
    return truncate_(share.clone(), divisor, first)


def truncate_(share: torch.Tensor, divisor: int, first: bool) -> torch.Tensor:
    """:func:`truncate` in place (``share`` is overwritten and returned)."""
    if first:
        share.add_(divisor)
    return share.bitwise_right_shift_(divisor.bit_length() - 1)


_CRYPTEN: dict = {}  # set by install(): CrypTen's own div_ and its communicator module


def _div_(self, y):
    """``ArithmeticSharedTensor.div_``: two parties dividing by a power of two shift their shares in place
    (:func:`truncate`); everything else is CrypTen's."""
    if isinstance(y, float) and y.is_integer():
        y = int(y)
    share, comm = self.share, _CRYPTEN["comm"].get()
    if type(share) is not torch.Tensor and type(share).__name__ == "CUDALongTensor":
        share = share.tensor()  # CrypTen's GPU share: its tensor, changed in place
    if (isinstance(y, int) and y > 0 and y & (y - 1) == 0 and type(share) is torch.Tensor
            and share.dtype == torch.long and comm.get_world_size() == 2
            and not validation_mode()):
        truncate_(share, y, comm.get_rank() == 0)
        return self
    return _CRYPTEN["div_"](self, y)


def install() -> None:
    """Route CrypTen's Beaver products (``crypten.mpc.primitives.beaver``) and its dealer's matmul
    triples (``crypten.mpc.provider.ttp_provider``) through :func:`matmul`, and two parties' truncations
    through :func:`truncate`. Idempotent."""
    import crypten.communicator
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.provider import ttp_provider

    for module in (beaver, ttp_provider):
        if not isinstance(module.torch, _TorchWithRingMatmul):
            module.torch = _TorchWithRingMatmul()
    if not _CRYPTEN:
        _CRYPTEN.update(div_=ArithmeticSharedTensor.__dict__["div_"], comm=crypten.communicator)
    ArithmeticSharedTensor.div_ = _div_


def uninstall() -> None:
    """Give CrypTen back its own ``torch.matmul`` and division (the stock baseline)."""
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.provider import ttp_provider

    for module in (beaver, ttp_provider):
        module.torch = torch
    if _CRYPTEN:
        ArithmeticSharedTensor.div_ = _CRYPTEN["div_"]
