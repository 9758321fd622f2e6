"""Hugging Face checkpoint -> secret-shared parameters.

Only the model owner calls :func:`load_owned_model`: it opens the local
checkpoint with ``from_pretrained`` and refuses one whose weights do not
match its config (HF would silently re-initialise missing weights). Every
party then calls :func:`share_parameters` with the *public* architecture;
the model owner contributes the values, the others only the shapes. Sharing
an input costs no communication: CrypTen adds the owner's value to a
pseudo-random sharing of zero that the parties derive from pairwise seeds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ._compat import import_crypten
from .config import ModelSpec
from .errors import ModelError
from .models import encoders

crypten = import_crypten()
log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"


@dataclass
class OwnedModel:
    """What the model owner holds in plaintext (and nobody else)."""

    arch: encoders.EncoderArch
    labels: list[str]
    state: dict[str, torch.Tensor]  # canonical names
    hf_model: torch.nn.Module


def resolve_model_path(spec: ModelSpec) -> Path:
    if spec.path.startswith("builtin:"):
        from . import demo, lm_examples

        name = spec.path.removeprefix("builtin:")
        if name in lm_examples.BUILTINS:  # causal LM examples (docs/causal-lm.md)
            return lm_examples.builtin_model(name)
        return demo.builtin_model(name)
    path = Path(spec.path)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.path {spec.path!r} is not a Hugging Face checkpoint directory (no config.json); "
            "save one with model.save_pretrained(DIR) and point model.path at DIR"
        )
    return path


def resolve_tokenizer_path(spec: ModelSpec) -> Path:
    if spec.tokenizer:
        return Path(spec.tokenizer)
    if spec.path.startswith("builtin:"):
        from . import demo, lm_examples

        name = spec.path.removeprefix("builtin:")
        if name in lm_examples.BUILTINS:
            return lm_examples.builtin_tokenizer(name)
        return demo.builtin_tokenizer(name)
    return Path(spec.path)


def _labels(hf_config, n: int) -> list[str]:
    id2label = getattr(hf_config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def load_owned_model(spec: ModelSpec) -> OwnedModel:
    """Model owner only: load, validate and canonicalise the checkpoint."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(spec)
    auto = AutoModelForSequenceClassification if spec.task == "sequence-classification" else AutoModel
    try:
        model, info = auto.from_pretrained(str(path), output_loading_info=True)
    except RuntimeError as err:
        # transformers refuses mismatched shapes with a pointer to an earlier log; name them here
        try:
            _, info = auto.from_pretrained(str(path), output_loading_info=True, ignore_mismatched_sizes=True)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            raise ModelError(f"could not load the checkpoint at {path}: {err}") from None
        shapes = [f"{k[0]}: checkpoint {tuple(k[1])} vs config {tuple(k[2])}" if isinstance(k, tuple) and len(k) == 3
                  else str(k) for k in info.get("mismatched_keys", [])]
        raise ModelError(
            f"the checkpoint at {path} does not match its config.json: weights of the wrong shape "
            f"{shapes[:4]}. Use the config.json saved with these weights."
        ) from None
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load the checkpoint at {path}: {err}") from None
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k or spec.task != "embedding"]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ModelError(
            f"the checkpoint at {path} does not match its config.json: missing weights "
            f"{sorted(missing)[:5]}, wrong shapes {list(mismatched)[:5]}. Use the config.json "
            "saved with these weights."
        )
    model.eval()
    state = dict(model.state_dict())
    num_labels = getattr(model.config, "num_labels", 0) if spec.task == "sequence-classification" else 0
    head_path = path / HEAD_FILE
    if spec.task == "embedding" and head_path.is_file():
        from safetensors.torch import load_file

        head = load_file(str(head_path))
        state.update({"head.weight": head["weight"], "head.bias": head["bias"]})
        num_labels = head["weight"].shape[0]
    arch = encoders.arch_from_hf(model.config.to_dict(), spec.task, num_labels)
    labels = _head_labels(path) if spec.task == "embedding" else _labels(model.config, num_labels)
    return OwnedModel(arch, labels, encoders.canonical_state(state, arch), model)


def _head_labels(path: Path) -> list[str]:
    meta = path / "head_labels.json"
    return json.loads(meta.read_text()) if meta.is_file() else []


def share_parameters(shapes: dict, state: dict | None, src: int, device: torch.device) -> dict:
    """Secret-share every parameter from rank ``src``; others pass ``state=None``."""
    params = {}
    for name, shape in shapes.items():
        value = state[name] if state is not None else torch.zeros(shape)
        params[name] = crypten.cryptensor(value.to(device), src=src, device=device)
    return params
