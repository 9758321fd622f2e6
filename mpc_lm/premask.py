"""Weights whose Beaver masks are opened once per model instead of once per product.

A Beaver product ``x @ W`` of two secrets opens ``x - a`` and ``W - b``. When ``W``
is a model weight, the same weight meets a new input in every forward (and every
generated token), so opening ``W - b`` each time sends the whole model per forward:
0.68 GB per party for BERT-base at 8 bytes per ring element, whatever the input.
Here (design: docs/performance.md, "Lever 5"):

1. **Setup (once per model, after the weights are shared).** Every party draws its
   share ``b_i`` of a mask ``B`` for each weight from the seed it shares with the
   dealer; party 0 asks the dealer to draw the same masks (the dealer replays all
   seeds and keeps ``B``). The computing parties open ``E = W - B`` together: one
   batched opening of the model's size, once.
2. **Per product.** The dealer deals ``a`` and ``c = a @ B`` (party 0 gets its share
   of ``c``; the others draw theirs from their seeds, as for any triple). The parties
   open ``d = x - a`` only and compute their shares of
   ``x @ W = c + d @ B + a @ E + d @ E`` locally (the last term at party 0 only).

Cost per product: one round, as before, and ``|x|`` opened elements instead of
``|x| + |W|``. Security: ``B`` is uniform in the ring and used as the mask of one
value (``W``) only, so ``E`` is uniform and independent of ``W`` for the computing
parties; every product uses a fresh ``a``. The dealer knows ``B`` but never sees
``E`` (it is opened among the computing parties), exactly as it knows every ``b``
it deals. Only valid while ``W`` does not change: training keeps CrypTen's products.
"""

from __future__ import annotations

import torch

from . import offline, ring
from ._compat import import_crypten
from .approx import matmul as beaver_matmul, merged_round

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402


class MaskedWeight:
    """A secret weight ``W``: this party's share of its mask ``B`` (plus ``E = W - B`` at party 0) and ``E``.

    Used as the right operand of :func:`matmul` (``layers.linear``, embeddings, LM heads).
    ``t()`` is the transpose (a tied LM head reuses the embedding's mask).
    """

    def __init__(self, wid: int, secret, d_factor, opened, transposed: bool = False):
        self.wid = wid
        self.secret = secret  # the MPCTensor of W, for anything that is not a product
        # what d = x - a multiplies in this party's share of x W: its share of B, plus E = W - B at party 0
        # (ring elements; formed once per model, not per product)
        self.d_factor = d_factor
        self.opened = opened  # E = W - B (ring elements, public to the computing parties)
        self.transposed = transposed

    def t(self) -> "MaskedWeight":
        return MaskedWeight(self.wid, self.secret.t(), self.d_factor.t(), self.opened.t(), not self.transposed)

    def size(self, dim=None):
        return self.secret.size() if dim is None else self.secret.size(dim)

    @property
    def encoder(self):
        return self.secret._tensor.encoder

    def to_meta(self) -> "MaskedWeight":
        """A shape-only copy for offline planning (mpc_lm/offline.py)."""

        def empty(t):
            return torch.empty(tuple(t.size()), dtype=torch.long, device="meta")

        return MaskedWeight(self.wid, offline._meta(self.secret), empty(self.d_factor), empty(self.opened),
                            self.transposed)


def matmul_names(shapes: dict, extra: tuple[str, ...] = ("emb.word",)) -> list[str]:
    """The parameters a model only ever multiplies by: 2-D ``*.weight`` matrices and ``extra``."""
    names = [n for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2]
    return names + [n for n in extra if n in shapes and n not in names]


def enabled(cfg) -> bool:
    """Weight masks need the dealer (``provider: ttp``) and are off in the stock-CrypTen baseline."""
    return cfg.security.provider == "ttp" and cfg.preprocessing.weight_masks


def prepare(cfg, params: dict, names: list[str], by_rows=()) -> tuple[dict, dict | None]:
    """:func:`mask_weights` when :func:`enabled`, else ``(params, None)``."""
    if not enabled(cfg):
        return params, None
    return mask_weights(params, names, by_rows)


def mask_weights(params: dict, names: list[str], by_rows=()) -> tuple[dict, dict]:
    """Replace ``params[n]`` for ``n`` in ``names`` by :class:`MaskedWeight`; returns (params, stats).

    ``by_rows``: names whose ``d_factor`` is kept with each output column contiguous (an (out, in) tensor
    seen through its transpose; the same values): products of ONE row with such a weight read it in
    that order, twice as fast with torch's int64 kernel on the CPU (:func:`row_layout_pays`).
    Collective: every computing party calls it with the same names, in the same order.
    """
    provider = offline.install()
    names = [n for n in names if n in params]
    if not names:
        return params, {"weights": 0, "elements": 0}
    device = params[names[0]].device
    shares = provider.weight_masks([tuple(params[n].size()) for n in names], device)
    masked = [params[n]._tensor.share - b for n, b in zip(names, shares)]
    opened = comm.get().all_reduce(masked, batched=True)
    out = dict(params)
    first = provider.next_weight_id - len(names)
    party0 = comm.get().get_rank() == 0
    for i, (n, b, e) in enumerate(zip(names, shares, opened)):
        d_factor = b + e if party0 else b
        if n in by_rows:
            d_factor = d_factor.t().contiguous().t()
        out[n] = MaskedWeight(first + i, params[n], d_factor, e)
        provider.opened[first + i] = e  # for the products' a @ E made in the offline phase
    return out, {"weights": len(names), "elements": int(sum(params[n].numel() for n in names)),
                 "by_rows": sum(n in by_rows for n in names)}


def row_layout_pays(device, rows_per_product: int, prompt_rows: int) -> bool:
    """Whether a job whose weight products are mostly of ``rows_per_product`` rows (a generation step with
    a KV cache: the batch) after one of ``prompt_rows`` rows (the prefill) gains by :func:`mask_weights`'s
    ``by_rows`` layout: one row, on a CPU whose ring products are torch's int64 kernel (``ring.choose``).

    One core of machine B (docs/performance.md, lever 31): 1 x 768 @ 768 x 3,072 1.4 ms by ``mv`` in that
    layout against 3.0 ms; at 64 and 128 rows ``(W @ x^T)^T`` is as fast as ``x @ W`` (7.1 against 7.8 ms);
    from 2 to 32 rows it is 1-3.5x slower, so a short prompt (under 64 rows) keeps the usual layout."""
    return (torch.device(device).type == "cpu" and ring.PRODUCTS["method"] == "int64"
            and rows_per_product == 1 and prompt_rows >= 64)


def matmul(x, w: MaskedWeight):
    """``x @ W`` for a secret ``x`` (MPCTensor) and a :class:`MaskedWeight`. One round, ``|x|`` opened."""
    return merged_round([("wmatmul", x, w)])[0]


def mm(x, w):
    """``x @ w``: :func:`matmul` for a :class:`MaskedWeight`, a Beaver product otherwise
    (:func:`mpc_lm.approx.matmul`)."""
    return matmul(x, w) if isinstance(w, MaskedWeight) else beaver_matmul(x, w)


__all__ = ["MaskedWeight", "enabled", "mask_weights", "prepare", "matmul", "matmul_names", "mm", "row_layout_pays"]
