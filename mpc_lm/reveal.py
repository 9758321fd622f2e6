"""Opening a secret towards one party, decoded exactly.

CrypTen 0.4.1's ``FixedPointEncoder.decode`` floor-divides negative ring
values by ``scale - 1`` and then patches the remainder; the result is off by
exactly 1.0 with probability about |x| / 2^16 (for a logit of -3, once in
~20,000 values). Every opening in mpc_lm goes through :func:`open_to`, which
reveals the ring value with CrypTen's protocol (the other parties send their
shares to ``dst`` only) and decodes it exactly (:func:`mpc_lm._compat.decode_fixed`,
which also replaces CrypTen's decoder).
"""

from __future__ import annotations

import torch

from ._compat import decode_fixed as decode


def open_to(value, dst: int | None = None) -> torch.Tensor | None:
    """Plaintext of the shared ``value`` at rank ``dst`` (every rank if None); None elsewhere."""
    raw = value._tensor.reveal(dst=dst)
    if raw is None or (dst is not None and dst != value._tensor.rank):
        return None
    return decode(raw, int(value.encoder.scale))
