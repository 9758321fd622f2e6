"""Shared fixtures: tiny HF checkpoints and a helper that runs a real local consortium.

Multi-party tests start real party processes on loopback through
:func:`mpc_lm.launch.launch`; every run is bounded by the config's timeouts.
Ports: this suite uses 29500-29599 (one fresh port per run).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_PORTS = itertools.count(29500 + (os.getpid() % 40))

TEXTS = [
    "The movie was wonderful and the actors were great.",
    "Terrible service, cold food and a rude waiter.",
    "Patient reports mild chest pain after exercise.",
    "I am not sure how I feel about this.",
    "An absolute delight from start to finish!",
]


def next_port() -> int:
    return next(_PORTS)


def minilm_dir() -> Path:
    from mpc_lm.zoo import minilm_tokenizer_dir

    return minilm_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BERT / RoBERTa / DistilBERT classifiers (2 layers, hidden 32, MiniLM's vocab)."""
    from mpc_lm.zoo import random_encoder

    root = tmp_path_factory.mktemp("tiny")
    return {f: random_encoder(f, root / f) for f in ("bert", "roberta", "distilbert")}


def write_config(tmp_path: Path, model_path, *, task="sequence-classification", kind="classify",
                 texts=TEXTS, extra_parties=(), data_owners=("hospital",), seq_len=16,
                 batch_size=8, security=None, timeouts=None, **overrides) -> Path:
    """Write a consortium config (model owner, data owners, extra parties, dealer) and inputs."""
    parties = [{"name": "vendor", "role": "model_owner"}]
    for i, name in enumerate(data_owners):
        src = tmp_path / f"{name}.txt"
        chunk = texts if i == 0 else list(reversed(texts))
        src.write_text("\n".join(chunk) + "\n")
        parties.append({"name": name, "role": "data_owner", "input": str(src),
                        "output": str(tmp_path / f"{name}.jsonl")})
    parties += list(extra_parties)
    security = security or {"provider": "ttp"}
    if security.get("provider", "ttp") == "ttp":
        parties.append({"name": "dealer", "role": "dealer"})
    cfg = {
        "name": "test",
        "parties": parties,
        "model": {"path": str(model_path), "task": task},
        "job": {"kind": kind, "seq_len": seq_len, "batch_size": batch_size},
        "rendezvous": {"host": "127.0.0.1", "port": next_port()},
        "timeouts": timeouts or {"startup_s": 60, "op_s": 60, "run_s": 300, "shutdown_s": 5},
        "security": security,
        "run_dir": str(tmp_path / "runs"),
        **overrides,
    }
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
