"""Helpers of the training tests: a tiny BERT with a ~100-word vocabulary, labelled JSONL, configs.

Ports: the training tests use 29700-29799 (the other multi-party tests use 29500-29599).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
import yaml

from mpc_lm.datasets import load_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_PORTS = itertools.count(29700 + (os.getpid() % 20) * 5)


def next_port() -> int:
    return next(_PORTS)


def tiny_bert(out: Path, task: str = "sequence-classification", layers: int = 2, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) whose WordPiece vocabulary is the demo task's top words."""
    from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    words = Counter(w for text, _ in load_task("demo-sentiment", "train")
                    for w in re.findall(r"[a-z]+|[^\sa-z]", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(95)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True).save_pretrained(out)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2, initializer_range=0.2)
    auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModel
    auto.from_config(cfg).eval().save_pretrained(out)
    if task == "embedding":
        from safetensors.torch import save_file

        save_file({"weight": torch.randn(2, 32) * 0.3, "bias": torch.zeros(2)}, str(out / "head.safetensors"))
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def train_config(tmp: Path, model: Path, train: dict, owners: int = 1, n_train: int = 8, n_eval: int = 6,
                 task: str = "sequence-classification", batch_size: int = 4, seq_len: int = 8) -> Path:
    data = load_task("demo-sentiment", "train")[:n_train]
    test = load_task("demo-sentiment", "test")[:n_eval]
    parties = [{"name": "vendor", "role": "model_owner"}]
    for i in range(owners):
        name = f"owner{i}"
        parties.append({"name": name, "role": "data_owner",
                        "train_data": str(write_jsonl(tmp / f"{name}-train.jsonl", data[i::owners])),
                        "eval_data": str(write_jsonl(tmp / f"{name}-eval.jsonl", test[i::owners]))})
    parties.append({"name": "dealer", "role": "dealer"})
    cfg = {"name": "tiny-train", "parties": parties,
           "model": {"path": str(model), "task": task},
           "job": {"kind": "train", "seq_len": seq_len, "batch_size": batch_size, "truncate": True,
                   "train": {"checkpoint_dir": str(tmp / "ckpt"), "output_dir": str(tmp / "trained"),
                             "reveal_metrics_to": ["owner0"], **train}},
           "rendezvous": {"host": "127.0.0.1", "port": next_port()},
           "timeouts": {"startup_s": 60, "op_s": 120, "run_s": 600},
           "run_dir": str(tmp / "runs")}
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def hf_weights(path: Path, task: str = "sequence-classification") -> dict:
    """The saved model as plain transformers loads it (+ head.* for the embedding task)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModel
    state = {k: v.detach() for k, v in auto.from_pretrained(str(path)).state_dict().items()}
    if task == "embedding":
        from safetensors.torch import load_file

        state.update({f"head.{k}": v for k, v in load_file(str(path / "head.safetensors")).items()})
    return state


def compare(got: dict, want: dict, initial: dict) -> dict:
    """Max |got - want| and the largest update |want - initial|, over all tensors."""
    err = max((got[k] - want[k]).abs().max().item() for k in want)
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    rel = max(((got[k] - want[k]).norm() / (want[k] - initial[k]).norm().clamp_min(1e-12)).item()
              for k in want if (want[k] - initial[k]).norm() > 1e-6)
    return {"max_abs_err": err, "max_update": moved, "worst_rel_update_err": rel}
