"""Model owner only: trained canonical weights -> a Hugging Face checkpoint.

Undoes :func:`mpc_lm.models.encoders.canonical_state`: transposes (in, out)
back to (out, in), splits the fused QKV projection and multiplies the query
rows by sqrt(d_head) again. LoRA adapters are merged into the projections
(W += alpha / r * B A), so the result is a plain ``transformers`` model with
no extra dependency. An embedding-task head is written as head.safetensors
(+ head_labels.json), as mpc_lm.demo does.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from . import convert
from .models import encoders
from .models.encoders import EncoderArch


def lora_init(arch: EncoderArch, rank: int, targets, seed: int) -> dict[str, torch.Tensor]:
    """Public initial LoRA A (canonical (H, len(targets) * r)); B starts at zero.

    A's rows per target are HF's lora_A (r, H) transposed, drawn uniform(+-1/sqrt(H)).
    """
    g = torch.Generator().manual_seed(seed + 7919)
    n_t = len([t for t in ("q", "k", "v") if t in targets])
    bound = 1 / math.sqrt(arch.hidden)
    return {f"l{n}.attn.lora_A": (torch.rand(arch.hidden, n_t * rank, generator=g) * 2 - 1) * bound
            for n in range(arch.layers)}


def merge_lora(state: dict, arch: EncoderArch, rank: int, alpha: float, targets) -> dict:
    """Canonical state with LoRA folded into the fused QKV weight (scale folded for q)."""
    out = {k: v for k, v in state.items() if "lora" not in k}
    h = arch.hidden
    s = 1.0 / math.sqrt(h // arch.heads)
    targets = [t for t in ("q", "k", "v") if t in targets]
    for n in range(arch.layers):
        a, b = state.get(f"l{n}.attn.lora_A"), state.get(f"l{n}.attn.lora_B")
        if a is None:
            continue
        w = out[f"l{n}.attn.qkv.weight"].clone()
        for j, t in enumerate(targets):
            col = "qkv".index(t)
            delta = a[:, j * rank : (j + 1) * rank] @ b[j * rank : (j + 1) * rank, col * h : (col + 1) * h]
            w[:, col * h : (col + 1) * h] += alpha / rank * delta * (s if t == "q" else 1.0)
        out[f"l{n}.attn.qkv.weight"] = w
    return out


def canonical_to_hf(state: dict, arch: EncoderArch) -> dict[str, torch.Tensor]:
    """HF names -> tensors for every canonical tensor in ``state`` (a subset is fine)."""
    base, stack = encoders._prefixes(arch)
    emb = f"{base}embeddings."
    names = encoders._LAYER[arch.family]
    s = 1.0 / math.sqrt(arch.hidden // arch.heads)
    h = arch.hidden
    out: dict[str, torch.Tensor] = {}
    simple = {"emb.word": emb + "word_embeddings.weight", "emb.pos": emb + "position_embeddings.weight",
              "emb.type": emb + "token_type_embeddings.weight", "emb.ln.weight": emb + "LayerNorm.weight",
              "emb.ln.bias": emb + "LayerNorm.bias"}
    heads = encoders._head_names(arch) if arch.num_labels else {}
    for key, value in state.items():
        value = value.detach().float()
        if key in simple:
            out[simple[key]] = value
            continue
        if key.startswith("head."):
            dst, kind = key.rsplit(".", 1)
            out[f"{heads[dst]}.{kind}"] = value.t().contiguous() if kind == "weight" else value
            continue
        layer, rest = key.split(".", 1)
        pre = f"{base}{stack}.{layer[1:]}."
        kind = rest.rsplit(".", 1)[1]
        if rest.startswith("attn.qkv"):
            parts = (value.t() if kind == "weight" else value).split(h, 0)
            for part, which, f in zip(parts, ("q", "k", "v"), (1 / s, 1.0, 1.0)):
                out[pre + names[which] + "." + kind] = (part * f).contiguous()
        else:
            src = {"attn.out": "out", "ff1": "ff1", "ff2": "ff2", "ln1": "ln1", "ln2": "ln2"}[rest.rsplit(".", 1)[0]]
            out[pre + names[src] + "." + kind] = value.t().contiguous() if kind == "weight" and src[0] != "l" else value
    return out


def save_trained(spec, arch: EncoderArch, trained: dict, out_dir: Path) -> Path:
    """Write the model owner's checkpoint with ``trained`` (canonical, LoRA merged) applied."""
    owned = convert.load_owned_model(spec)
    model = owned.hf_model
    hf = canonical_to_hf(trained, arch)
    head = {k: hf.pop(k) for k in ("head.weight", "head.bias") if k in hf}
    own = model.state_dict()
    unknown = sorted(set(hf) - set(own))
    if unknown:
        raise KeyError(f"internal: exported names {unknown[:3]} are not in the model")
    model.load_state_dict({**own, **hf})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    src = convert.resolve_model_path(spec)
    tok = convert.resolve_tokenizer_path(spec)
    for f in tok.iterdir():
        if f.is_file() and ("token" in f.name or f.name in ("vocab.txt", "merges.txt", "vocab.json")):
            shutil.copy2(f, out_dir / f.name)
    if arch.task == "embedding":
        from safetensors.torch import save_file

        if not head:
            head = {"head.weight": owned.state["head.out.weight"].t().contiguous(),
                    "head.bias": owned.state["head.out.bias"]}
        save_file({"weight": head["head.weight"].contiguous(), "bias": head["head.bias"].contiguous()},
                  str(out_dir / convert.HEAD_FILE))
        labels = src / "head_labels.json"
        if labels.is_file():
            shutil.copy2(labels, out_dir / "head_labels.json")
        else:
            (out_dir / "head_labels.json").write_text(json.dumps(owned.labels))
    return out_dir
