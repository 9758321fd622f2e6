"""Plaintext references: the same model on the same input, without MPC.

Used by the launcher's fidelity check (a local launch holds every role, so
it may look at everything), by the tests and by the benchmark. Inputs are
padded to the same bucket as the secure run, so the comparison is exact
apart from the approximations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import convert, inputs
from .config import ModelSpec


@dataclass
class Fidelity:
    max_abs_error: float
    top1_agreement: float | None  # None for embeddings
    n: int

    def as_dict(self) -> dict:
        return {"max_abs_logit_error": self.max_abs_error, "top1_agreement": self.top1_agreement, "n": self.n}


def plaintext_outputs(spec: ModelSpec, texts: list[str], seq_len: int, truncate: bool = False) -> torch.Tensor:
    """Logits (or mean-pooled embeddings) of the plaintext HF model."""
    from transformers import AutoTokenizer

    owned = convert.load_owned_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(convert.resolve_tokenizer_path(spec)))
    batch = inputs.tokenize(tokenizer, texts, seq_len, truncate)
    with torch.no_grad():
        if spec.task == "sequence-classification":
            return owned.hf_model(input_ids=batch.ids, attention_mask=batch.mask).logits
        hidden = owned.hf_model(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
        m = batch.mask.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        if owned.arch.num_labels:
            return pooled @ owned.state["head.out.weight"] + owned.state["head.out.bias"]
        return pooled


def compare(secure: torch.Tensor, plain: torch.Tensor, classify: bool) -> Fidelity:
    err = (secure - plain).abs().max().item() if secure.numel() else 0.0
    agree = (secure.argmax(-1) == plain.argmax(-1)).float().mean().item() if classify else None
    return Fidelity(err, agree, secure.shape[0])
