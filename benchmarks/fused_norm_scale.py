"""How much larger the fused LayerNorm-linear product is than the unfused one, on a real checkpoint.

``approx.fuse_norm_linear`` (docs/performance.md, lever 12) computes P = (centred * gamma) @ W before
the row's 1/sigma is applied, so P's one probabilistic 2-party truncation sees sigma times the values
the unfused product z = LayerNorm(x) @ W would show it. A 2-party truncation fails with probability
about |v| 2^32 / 2^64 for a value v at 16 fractional bits, so the sum of |P| against the sum of |z| is
the factor by which fusion changes the expected number of such failures in those products. This runs
the plaintext model (no MPC) on real text and prints, for each LayerNorm that a linear layer reads,
the row sigma of its input over real tokens and that ratio.

    python benchmarks/fused_norm_scale.py [--texts 200] [--seq-len 64] [--json PATH]

Model: the real all-MiniLM-L6-v2 checkpoint (the demo's encoder); texts: the demo sentences and
Rotten Tomatoes test reviews.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mpc_lm import datasets  # noqa: E402
from mpc_lm.demo import minilm_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _readers(model) -> dict:
    """LayerNorm name -> (LayerNorm module, the linear weight (out, in) that reads its output)."""
    layers = model.encoder.layer

    def qkv(layer):
        s = layer.attention.self
        return torch.cat([s.query.weight, s.key.weight, s.value.weight])

    out = {"embeddings": (model.embeddings.LayerNorm, qkv(layers[0]))}
    for i, layer in enumerate(layers):
        out[f"layer{i}.attention"] = (layer.attention.output.LayerNorm, layer.intermediate.dense.weight)
        if i + 1 < len(layers):
            out[f"layer{i}.output"] = (layer.output.LayerNorm, qkv(layers[i + 1]))
    return out


@torch.no_grad()
def measure(texts: list[str], seq_len: int) -> dict:
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    readers, seen = _readers(model), {}
    for name, (ln, _) in readers.items():
        ln.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
    model(**batch)
    real = batch["attention_mask"].bool()
    rows, fused_sum, plain_sum = {}, 0.0, 0.0
    for name, (ln, weight) in readers.items():
        centred = seen[name] - seen[name].mean(-1, keepdim=True)
        sigma = centred.pow(2).mean(-1).add(ln.eps).sqrt()
        fused = (centred * ln.weight) @ weight.T  # P, before 1/sigma (beta and the bias do not scale)
        plain = fused / sigma.unsqueeze(-1)
        f, p = float(fused.abs()[real].sum()), float(plain.abs()[real].sum())
        fused_sum, plain_sum = fused_sum + f, plain_sum + p
        s = sigma[real]
        rows[name] = {"sigma_min": float(s.min()), "sigma_median": float(s.median()), "sigma_max": float(s.max()),
                      "abs_sum_ratio": f / p}
    tokens = int(real.sum())
    return {"texts": len(texts), "seq_len": seq_len, "real_tokens": tokens, "layer_norms": rows,
            "abs_sum_ratio": fused_sum / plain_sum,
            # expected 2-party truncation failures per real token in these products, fused and not
            "failures_per_token": {"fused": fused_sum * 2.0**-32 / tokens, "unfused": plain_sum * 2.0**-32 / tokens}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=200, help="Rotten Tomatoes test reviews beside the demo sentences")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    texts = (ROOT / "launch" / "demo_sentences.txt").read_text().splitlines()
    texts += [t for t, _ in datasets.load_task("rotten-tomatoes", "test", limit=args.texts)]
    result = measure([t for t in texts if t.strip()], args.seq_len)
    print(f"{'LayerNorm':22s} {'sigma min':>10s} {'median':>8s} {'max':>8s} {'sum|P| / sum|z|':>16s}")
    for name, r in result["layer_norms"].items():
        print(f"{name:22s} {r['sigma_min']:10.3f} {r['sigma_median']:8.3f} {r['sigma_max']:8.3f} "
              f"{r['abs_sum_ratio']:16.2f}")
    f = result["failures_per_token"]
    print(f"all fused products: sum|P| / sum|z| = {result['abs_sum_ratio']:.2f}; expected truncation failures "
          f"per real token in them: {f['fused']:.2e} fused, {f['unfused']:.2e} unfused "
          f"({result['real_tokens']} real tokens, {result['texts']} texts)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
