"""The data owner's side of a job: tokenise locally, share ids, receive outputs.

The tokenizer is public (the vendor publishes it); the text never leaves the
data owner. Token ids enter the computation as one-hot rows (B, T, V) shared
with precision 0 from the data owner's rank, and the padding mask (B, T) as a
fixed-point share: the true length of each text is private, only the bucket
length ``job.seq_len`` and the number of texts are public.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ._compat import import_crypten
from .errors import InputError

crypten = import_crypten()


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) long
    mask: torch.Tensor  # (B, T) 0/1


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"input file {path} does not exist (data owner's 'input' in the config)")
    lines = path.read_text(encoding="utf-8").splitlines()
    texts = [line.strip() for line in lines]
    empty = [i + 1 for i, t in enumerate(texts) if not t]
    if empty:
        raise InputError(f"input file {path} has empty lines {empty[:10]}; one text per line, no blank lines")
    if not texts:
        raise InputError(f"input file {path} is empty; write one text per line")
    return texts


def tokenize(tokenizer, texts: list[str], seq_len: int, truncate: bool, source: str = "input") -> Batch:
    """Pad to the public bucket; refuse (or cut, if configured) longer texts."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    too_long = [(i + 1, n) for i, n in enumerate(lengths) if n > seq_len]
    if too_long and not truncate:
        shown = ", ".join(f"line {i}: {n} tokens" for i, n in too_long[:5])
        raise InputError(
            f"{len(too_long)} text(s) in {source} are longer than job.seq_len={seq_len} ({shown}). "
            f"Raise job.seq_len to at least {max(n for _, n in too_long)} (within the model's "
            "limit) or set job.truncate: true to cut them."
        )
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return Batch(enc["input_ids"], enc["attention_mask"])


def share_batch(batch: Batch | None, shape: tuple[int, int], vocab: int, src: int, device):
    """Share one batch from the data owner (``batch``) or receive it (``batch=None``)."""
    b, t = shape
    if batch is not None:
        one_hot = torch.nn.functional.one_hot(batch.ids, vocab).to(torch.int64)
        mask = batch.mask.to(torch.float32)
    else:
        one_hot = torch.zeros((b, t, vocab), dtype=torch.int64)
        mask = torch.zeros((b, t))
    one_hot = crypten.cryptensor(one_hot.to(device), src=src, precision=0, device=device)
    mask = crypten.cryptensor(mask.to(device), src=src, device=device)
    return one_hot, mask


def write_outputs(path: Path, texts: list[str], outputs: torch.Tensor, labels: list[str], kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, (text, row) in enumerate(zip(texts, outputs.tolist())):
            record = {"index": i, "text": text}
            if kind == "classify":
                best = max(range(len(row)), key=row.__getitem__)
                record.update(logits=row, label=best, label_name=labels[best] if labels else str(best))
            else:
                record["embedding"] = row
            f.write(json.dumps(record) + "\n")
