"""Exact products of 64-bit ring tensors on the CPU, on float64 BLAS.

Every secret product ends in local matrix products of int64 ring tensors (shares, opened masked
values, the dealer's masks). On a GPU CrypTen splits them into exact floating-point blocks
(``CUDALongTensor``); on the CPU it calls ``torch.matmul`` on int64, which has no BLAS kernel
(128 x 768 @ 768 x 3072: 1.1 s on a 2-core machine, against 0.01 s for float64).

:func:`matmul` splits each entry into four 16-bit limbs, a = sum_i a_i 2^(16 i), and forms
a @ b = sum_{i + j < 4} (a_i @ b_j) 2^(16 (i + j)) mod 2^64: the terms with i + j >= 4 vanish
modulo 2^64, so 10 limb products remain, computed as 4 float64 matmuls (a_i against the limbs
b_0 .. b_(3-i) side by side). Each limb product is a sum of K products below 2^32, and the up to
four products of one shift are added in float64 before rounding back, so every float64 value is
an integer below 4 K 2^32: exact while K < 2^19 (wider inner dimensions fall back to int64).
The result is bit-identical to ``torch.matmul`` on int64 (``tests/test_ring.py``).

:func:`install` routes CrypTen's Beaver products and its dealer's matmul triples through
:func:`matmul`; mpc_lm's own products call it directly. The stock-CrypTen baseline
(``approx.mode: crypten``) does not install it.
"""

from __future__ import annotations

import types

import torch

LIMB_BITS = 16
LIMBS = 64 // LIMB_BITS
MAX_INNER = 1 << 19  # 4 K 2^32 < 2^53
CHUNK_ELEMENTS = 1 << 23  # entries of b per limb product (its limbs: 4 x 8 bytes each, 256 MiB)


def _fast(a, b) -> bool:
    # plain tensors only: CrypTen's CUDALongTensor (GPU shares) goes to torch.matmul, which it overrides
    return (type(a) is torch.Tensor and type(b) is torch.Tensor
            and a.dtype == torch.int64 and b.dtype == torch.int64
            and a.device.type == "cpu" and b.device.type == "cpu"
            and a.dim() >= 1 and b.dim() >= 2 and a.size(-1) < MAX_INNER)


def _limb_view(x: torch.Tensor) -> torch.Tensor:
    """x (..., L) int64 as its 16-bit limbs (..., L, 4), least significant first (a view where x's last
    dimension is contiguous)."""
    return x.contiguous().view(torch.uint16).reshape(*x.shape, LIMBS)


def _left_limbs(a: torch.Tensor) -> torch.Tensor:
    """(4, *a.shape) float64: a_0 .. a_3."""
    out = torch.empty((LIMBS, *a.shape), dtype=torch.float64)
    out.copy_(_limb_view(a).movedim(-1, 0))
    return out


def _right_limbs(b: torch.Tensor) -> torch.Tensor:
    """(..., K, 4 N) float64: the limbs b_0 .. b_3 (..., K, N) side by side, so b_0 .. b_(3-i) is a prefix."""
    *batch, k, n = b.shape
    out = torch.empty((*batch, k, LIMBS, n), dtype=torch.float64)
    out.copy_(_limb_view(b).transpose(-1, -2))
    return out.view(*batch, k, LIMBS * n)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` of int64 ring tensors modulo 2^64, on float64 BLAS for CPU tensors
    (bit-identical); anything else goes to ``torch.matmul``."""
    if not _fast(a, b):
        return torch.matmul(a, b)
    k, n = b.shape[-2:]
    if k * n > CHUNK_ELEMENTS and n > 1:  # bounded float64 limb copies: column blocks of b
        step = max(1, CHUNK_ELEMENTS // k)
        return torch.cat([_limb_matmul(a, b[..., i : i + step]) for i in range(0, n, step)], dim=-1)
    return _limb_matmul(a, b)


def _limb_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    al, bl = _left_limbs(a), _right_limbs(b)
    n = b.size(-1)
    by_shift: list = [None] * LIMBS  # float64 sums of the limb products of each shift i + j
    for i in range(LIMBS):
        block = torch.matmul(al[i], bl[..., : (LIMBS - i) * n])
        for j in range(LIMBS - i):
            part = block[..., j * n : (j + 1) * n]
            s = i + j
            by_shift[s] = part if by_shift[s] is None else by_shift[s] + part
    out = by_shift[0].to(torch.int64)
    for s in range(1, LIMBS):
        # the sum stays an exact integer in float64; int64 products wrap modulo 2^64 as the ring does
        out += by_shift[s].to(torch.int64) * (1 << (LIMB_BITS * s))
    return out


class _TorchWithRingMatmul(types.ModuleType):
    """``torch`` as seen by a CrypTen module after :func:`install`: ``matmul`` is :func:`matmul`."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    matmul = staticmethod(matmul)


def install() -> None:
    """Route CrypTen's Beaver products (``crypten.mpc.primitives.beaver``) and its dealer's matmul
    triples (``crypten.mpc.provider.ttp_provider``) through :func:`matmul`. Idempotent."""
    from crypten.mpc.primitives import beaver
    from crypten.mpc.provider import ttp_provider

    for module in (beaver, ttp_provider):
        if not isinstance(module.torch, _TorchWithRingMatmul):
            module.torch = _TorchWithRingMatmul()


def uninstall() -> None:
    """Give CrypTen back its own ``torch.matmul`` (the stock baseline)."""
    from crypten.mpc.primitives import beaver
    from crypten.mpc.provider import ttp_provider

    for module in (beaver, ttp_provider):
        module.torch = torch
