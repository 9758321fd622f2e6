"""Plaintext and DP-SGD fine-tuning (the ``plaintext`` and ``dp`` modes), in a worker process.

Run as ``python -m mpc_lm.bench.plain_multi SPEC.json STEP[,STEP] WORK`` by
:mod:`mpc_lm.bench.runner`, one process per step, so that each mode's peak
memory (``ru_maxrss``, ``torch.cuda.max_memory_allocated``) is its own.

Steps:

``prepare``    tokenise both splits (the MPC modes' tokeniser and padding) and run the
               frozen part of the model once: the hidden states entering the last
               encoder layer are cached in ``WORK/features.pt``. Both training modes
               start from this cache, so their wall times are those of the trainable part.
``plaintext``  train the last layer + a mean-pooled linear head with AdamW; evaluate;
               time full-model plaintext inference; save the checkpoint the MPC modes run.
``dp``         the same with Opacus DP-SGD at (epsilon, delta) (``make_private_with_epsilon``).

Freezing all but the last layer makes the cached features a fixed, public
function of each example, so DP-SGD on them is DP-SGD on the examples.
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn


def _peak(device: torch.device) -> dict:
    out = {"peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "peak_gpu_mb": None}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _load_encoder(model_dir: str):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(model_dir, attn_implementation="eager")


def _layers(model) -> nn.ModuleList:
    return model.encoder.layer


def _with_layers(model, layers) -> nn.Module:
    """A view of ``model`` running ``layers`` as its encoder stack (other weights shared)."""
    view, enc = copy.copy(model), copy.copy(model.encoder)
    view._modules, enc._modules = dict(model._modules), dict(model.encoder._modules)
    enc.layer = nn.ModuleList(layers)
    view.encoder = enc
    return view


class Top(nn.Module):
    """The trainable part: the last encoder layer, masked mean pooling, a linear head."""

    def __init__(self, layer: nn.Module, hidden: int, classes: int):
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(hidden, classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(h.dtype).min
        out = self.layer(h, attention_mask=additive)
        if isinstance(out, tuple):
            out = out[0]
        m = mask.unsqueeze(-1)
        return self.head((out * m).sum(1) / m.sum(1).clamp_min(1.0))


# ------------------------------------------------------------------ prepare


def prepare(spec: dict) -> dict:
    from transformers import AutoTokenizer

    from ..inputs import tokenize
    from .tasks import load_split

    sizes, device = spec["sizes"], torch.device(spec["device"])
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = _load_encoder(spec["model_dir"]).eval().to(device)
    prefix = _with_layers(model, list(_layers(model))[:-1])
    out = {}
    for split, limit in (("train", sizes["train_limit"]), ("test", sizes["eval_limit"])):
        texts, labels = load_split(spec["task"], split, limit)
        batch = tokenize(tokenizer, texts, sizes["seq_len"], truncate=True)
        hs = []
        with torch.no_grad():
            for i in _progress(range(0, len(texts), 64), f"frozen layers ({split})", spec):
                ids, mask = batch.ids[i : i + 64].to(device), batch.mask[i : i + 64].to(device)
                hs.append(prefix(input_ids=ids, attention_mask=mask,
                                 token_type_ids=torch.zeros_like(ids)).last_hidden_state.cpu())
        out[split] = {"h": torch.cat(hs), "mask": batch.mask.float(), "y": torch.tensor(labels),
                      "ids": batch.ids}
    torch.save(out, Path(spec["work_dir"]) / "features.pt")
    return {"prefix_s": round(time.perf_counter() - started, 3), "n_train": len(out["train"]["y"]),
            "n_eval": len(out["test"]["y"]), "frozen_layers": len(_layers(model)) - 1,
            "hidden": model.config.hidden_size, **_peak(device)}


def _progress(it, desc: str, spec: dict):
    if not spec.get("progress", True):
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _features(spec: dict) -> dict:
    return torch.load(Path(spec["work_dir"]) / "features.pt", weights_only=True)


def _new_top(spec: dict, model) -> Top:
    torch.manual_seed(spec["seed"])
    return Top(copy.deepcopy(_layers(model)[-1]), model.config.hidden_size, spec["num_classes"])


def _evaluate(top: Top, data: dict, device: torch.device) -> tuple[float, float]:
    top.eval()
    correct, started = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data["y"]), 128):
            logits = top(data["h"][i : i + 128].to(device), data["mask"][i : i + 128].to(device))
            correct += (logits.argmax(-1).cpu() == data["y"][i : i + 128]).sum().item()
    return correct / max(1, len(data["y"])), time.perf_counter() - started


def _loader(data: dict, batch_size: int, seed: int):
    ds = torch.utils.data.TensorDataset(data["h"], data["mask"], data["y"])
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def _train_loop(model, optimizer, loader, epochs: int, device, spec: dict, desc: str,
                criterion=None) -> tuple[int, int, float]:
    """Returns (optimizer steps, examples seen, wall seconds)."""
    criterion = criterion or nn.CrossEntropyLoss()
    steps = seen = 0
    model.train()
    started = time.perf_counter()
    for epoch in range(epochs):
        for h, m, y in _progress(loader, f"{desc} epoch {epoch + 1}/{epochs}", spec):
            h, m, y = h.to(device), m.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(h, m), y)
            loss.backward()
            optimizer.step()
            steps += 1
            seen += len(y)
    return steps, seen, time.perf_counter() - started


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------ plaintext


def plaintext(spec: dict) -> dict:
    sizes, device = spec["sizes"], torch.device(spec["device"])
    _reset_peak(device)
    data = _features(spec)
    model = _load_encoder(spec["model_dir"])
    top = _new_top(spec, model).to(device)
    _save_checkpoint(spec, model, top, "model-initial")  # where --mpc-phase train starts from
    top.to(device)
    params = [p for p in top.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    steps, seen, wall = _train_loop(top, optimizer, _loader(data["train"], sizes["batch_size"], spec["seed"]),
                                    sizes["epochs"], device, spec, "plaintext")
    accuracy, _ = _evaluate(top, data["test"], device)
    infer = _full_inference_speed(spec, model, top, data["test"], device)
    _save_checkpoint(spec, model, top)
    return {"mode": "plaintext", "phase": "train", "wall_s": round(wall, 3),
            "examples_per_s": round(seen / wall, 2), "tokens_per_s": round(seen * sizes["seq_len"] / wall, 1),
            "train_examples": len(data["train"]["y"]), "eval_examples": len(data["test"]["y"]),
            "epochs": sizes["epochs"], "steps": steps, "batch_size": sizes["batch_size"], "lr": spec["lr"],
            "accuracy": round(accuracy, 4), **infer, **_peak(device)}


def _full_inference_speed(spec, model, top, test: dict, device, limit: int = 256) -> dict:
    """Plaintext inference of the whole fine-tuned model (not the cached prefix) on <= 256 texts."""
    full = _with_layers(model.eval().to(device), list(_layers(model))[:-1] + [top.layer])
    top.eval()
    ids, mask = test["ids"][:limit].to(device), test["mask"][:limit].to(device)
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), 64):
            h = full(input_ids=ids[i : i + 64], attention_mask=mask[i : i + 64].long(),
                     token_type_ids=torch.zeros_like(ids[i : i + 64])).last_hidden_state
            m = mask[i : i + 64].unsqueeze(-1)
            top.head((h * m).sum(1) / m.sum(1))
    wall = time.perf_counter() - started
    return {"infer_examples": len(ids), "infer_s": round(wall, 4),
            "infer_examples_per_s": round(len(ids) / wall, 2) if wall > 0 else None}


def _save_checkpoint(spec: dict, model, top: Top, name: str = "model-plaintext") -> None:
    """HF directory + head.safetensors: the layout ``model.task: embedding`` loads (mpc_lm/demo.py)."""
    from safetensors.torch import save_file

    out = Path(spec["work_dir"]) / name
    model = copy.deepcopy(model).cpu()
    _layers(model)[-1].load_state_dict({k: v.cpu() for k, v in top.layer.state_dict().items()})
    model.save_pretrained(str(out))
    head = top.head
    save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
              str(out / "head.safetensors"))
    (out / "head_labels.json").write_text(json.dumps(spec["label_names"]))


# ------------------------------------------------------------------ dp


def dp(spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore", module="opacus")
    sizes, device, cfg = spec["sizes"], torch.device(spec["device"]), spec["dp"]
    _reset_peak(device)
    data = _features(spec)
    n = len(data["train"]["y"])
    delta = cfg["delta"] if cfg["delta"] is not None else 1.0 / n
    model = _load_encoder(spec["model_dir"])
    wanted = cfg["clipping"]
    attempts = ["ghost", "hooks"] if wanted == "auto" else [wanted]
    fallback = None
    for mode in attempts:
        try:
            result = _dp_run(spec, model, data, device, delta, mode)
            break
        except Exception as err:  # noqa: BLE001 - Opacus raises many kinds; report and fall back
            if mode == attempts[-1]:
                raise
            fallback = f"{mode} clipping failed ({type(err).__name__}: {str(err)[:160]}); used hooks"
    result["clipping_note"] = fallback
    return result


def _dp_run(spec, model, data, device, delta: float, clipping: str) -> dict:
    from opacus import PrivacyEngine

    sizes, cfg = spec["sizes"], spec["dp"]
    top = _new_top(spec, model).to(device)
    optimizer = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=cfg["lr"])
    loader = _loader(data["train"], sizes["dp_batch_size"], spec["seed"])
    engine = PrivacyEngine(accountant=cfg["accountant"])
    kwargs = dict(module=top, optimizer=optimizer, data_loader=loader, target_epsilon=cfg["epsilon"],
                  target_delta=delta, epochs=sizes["dp_epochs"], max_grad_norm=cfg["max_grad_norm"])
    criterion = None
    if clipping == "ghost":
        criterion = nn.CrossEntropyLoss()
        top, optimizer, criterion, loader = engine.make_private_with_epsilon(
            **kwargs, criterion=criterion, grad_sample_mode="ghost")
    else:
        top, optimizer, loader = engine.make_private_with_epsilon(**kwargs, grad_sample_mode="hooks")
    steps, seen, wall = _train_loop(top, optimizer, loader, sizes["dp_epochs"], device, spec,
                                    f"dp ({clipping})", criterion)
    accuracy, _ = _evaluate(top, data["test"], device)
    epsilon = engine.get_epsilon(delta)
    return {"mode": "dp", "phase": "train", "wall_s": round(wall, 3),
            "examples_per_s": round(seen / wall, 2), "tokens_per_s": round(seen * sizes["seq_len"] / wall, 1),
            "train_examples": len(data["train"]["y"]), "eval_examples": len(data["test"]["y"]),
            "epochs": sizes["dp_epochs"], "steps": steps, "batch_size": sizes["dp_batch_size"], "lr": cfg["lr"],
            "accuracy": round(accuracy, 4), "epsilon": round(float(epsilon), 4), "delta": delta,
            "target_epsilon": cfg["epsilon"], "noise_multiplier": float(optimizer.noise_multiplier),
            "sample_rate": 1.0 / len(loader), "max_grad_norm": cfg["max_grad_norm"],
            "accountant": cfg["accountant"], "clipping": clipping, **_peak(device)}


STEPS = {"prepare": prepare, "plaintext": plaintext, "dp": dp}
