"""Cost of one encrypted training step at real shapes: the last encoder layer + head.

    python -m mpc_lm.bench_train [--batch 8] [--seq 128] [--hidden 768] [--heads 12]
        [--intermediate 3072] [--task embedding|sequence-classification] [--steps 3]
        [--device cpu|cuda] [--port 29680] [--on-demand] [--json PATH]

Model owner, data owner and dealer run as three processes on this machine (the
real runtime: gloo over loopback, the TTP dealer, the configured timeouts). The
model owner shares a random BERT-shaped encoder layer and head (BERT's init,
seed 0); the data owner shares the hidden states entering that layer (a batch
of LayerNorm outputs), the padding mask (random lengths) and one-hot labels.
Each step is forward (``grads.forward_layers``), cross-entropy, backward
(``grads.backward``) and an SGD-with-momentum update (``optim.SharedOptimizer``),
all on shares. The frozen layers below are not run: their output is the
step's input, as in the benchmark CLI's plaintext and DP modes.

Prints JSON: per step the wall seconds, the offline phase's seconds, online
bytes sent per party and rounds, the dealer's bytes, tokens per second; and the
step's fidelity: its gradients (first step) and loss against torch autograd on
the same weights and inputs with exact GELU, softmax and LayerNorm.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROLES = (("vendor", "model_owner"), ("alice", "data_owner"), ("dealer", "dealer"))


def arch_for(args):
    from .models.encoders import EncoderArch

    return EncoderArch("bert", args.task, 2, args.hidden, 1, args.heads, args.intermediate, args.seq, 0, 1,
                       1e-12, "gelu", 2)


def trainable_shapes(arch) -> dict:
    from .models.encoders import param_shapes

    return {n: s for n, s in param_shapes(arch).items() if n.startswith(("l0.", "head."))}


def plain_weights(arch) -> dict:
    """BERT's initialisation (normal 0.02, LayerNorm 1 and 0), seed 0: public in this benchmark."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in trainable_shapes(arch).items():
        if name.endswith(".weight") and len(shape) == 2:
            out[name] = torch.randn(shape, generator=gen) * 0.02
        elif ".ln" in name and name.endswith(".weight"):
            out[name] = torch.ones(shape)
        else:
            out[name] = torch.zeros(shape)
    return out


def plain_batch(args):
    """Hidden states (LayerNorm outputs), 0/1 mask of random lengths >= seq/2, the mean pooling's
    weights (mask / length), one-hot labels; seed 1."""
    gen = torch.Generator().manual_seed(1)
    b, t, h = args.batch, args.seq, args.hidden
    x = torch.nn.functional.layer_norm(torch.randn(b, t, h, generator=gen), (h,))
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    labels = torch.nn.functional.one_hot(torch.randint(0, 2, (b,), generator=gen), 2).float()
    return x, mask, mask / lengths[:, None], labels


# ---------------------------------------------------------------- plaintext twin


def reference_step(weights: dict, x, mask, _pool, labels, arch):
    """Mean cross-entropy and its gradients (torch autograd, float64, exact functions)."""
    p = {n: w.double().requires_grad_() for n, w in weights.items()}
    x, mask = x.double(), mask.double()
    b, t, h = x.shape
    heads, d = arch.heads, h // arch.heads

    def ln(v, name):
        return torch.nn.functional.layer_norm(v, (h,), p[f"{name}.weight"], p[f"{name}.bias"], arch.eps)

    qkv = x @ p["l0.attn.qkv.weight"] + p["l0.attn.qkv.bias"]
    q, k, v = (qkv[..., i * h:(i + 1) * h].reshape(b, t, heads, d).transpose(1, 2) for i in range(3))
    scores = (q @ k.transpose(-1, -2)).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    ctx = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, h)
    x1 = ln(x + ctx @ p["l0.attn.out.weight"] + p["l0.attn.out.bias"], "l0.ln1")
    a = torch.nn.functional.gelu(x1 @ p["l0.ff1.weight"] + p["l0.ff1.bias"])
    x2 = ln(x1 + a @ p["l0.ff2.weight"] + p["l0.ff2.bias"], "l0.ln2")
    if arch.task == "embedding":
        pooled = (x2 * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    else:
        pooled = torch.tanh(x2[:, 0] @ p["head.pre.weight"] + p["head.pre.bias"])
    logits = pooled @ p["head.out.weight"] + p["head.out.bias"]
    loss = torch.nn.functional.cross_entropy(logits, labels.double().argmax(-1))
    loss.backward()
    return loss.item(), {n: t.grad.float() for n, t in p.items()}


def gradient_fidelity(secure: dict, plain: dict) -> dict:
    """Per tensor: max |error| / max |reference| and the cosine; the worst of each."""
    per = {}
    for name, want in plain.items():
        got = secure[name].float()
        per[name] = {"max_rel_error": round((got - want).abs().max().item() / max(want.abs().max().item(), 1e-12), 5),
                     "cosine": round(min(1.0, torch.nn.functional.cosine_similarity(
                         got.double().reshape(1, -1), want.double().reshape(1, -1)).item()), 6)}
    return {"worst_max_rel_error": max(v["max_rel_error"] for v in per.values()),
            "worst_cosine": min(v["cosine"] for v in per.values()), "per_tensor": per}


# ---------------------------------------------------------------- one party


def party_job(ctx, args) -> dict:
    """A computing party's part (run by :func:`mpc_lm.party.run_party` in place of a job): share, step, check."""
    from . import grads, infer, offline, optim, train
    from ._compat import import_crypten
    from .config import Training

    crypten = import_crypten()
    cfg = ctx.config
    arch = arch_for(args)
    mo, do, dev = ctx.model_owner_rank, cfg.rank_of("alice"), ctx.device
    weights = plain_weights(arch) if ctx.rank == mo else None
    params = {n: crypten.cryptensor((weights[n] if weights else torch.zeros(s)).to(dev), src=mo, device=dev)
              for n, s in trainable_shapes(arch).items()}
    data = plain_batch(args) if ctx.rank == do else None
    b, t, h = args.batch, args.seq, args.hidden
    x, mask, pool, labels = (
        crypten.cryptensor((data[i] if data else torch.zeros(shape)).to(dev), src=do, device=dev)
        for i, shape in enumerate([(b, t, h), (b, t), (b, t), (b, 2)]))
    names = sorted(params)
    plan = grads.Plan(train=set(names), first=0)
    tc = Training(optimizer="sgd", lr=1e-3, momentum=0.9, loss_scale=args.loss_scale)
    opt = optim.SharedOptimizer(tc, names, {n: params[n].size() for n in names},
                                train.hf_scales(arch, names), params[names[0]])

    def forward_backward(params, x, mask, pool, labels):
        logits, caches = grads.forward_layers(params, x, mask, arch, cfg.approx, plan, pool=pool)
        dlogits, p_true, _ = grads.cross_entropy(logits, labels, cfg.approx, tc.loss_scale / b, metrics=False)
        return grads.backward(caches, dlogits, params, arch, plan), p_true

    steps, first = [], None
    for step in range(args.steps):
        phase = infer.Phase().begin(ctx)
        (g, p_true), pre = offline.run(cfg, ("train-step", b, t, h), forward_backward, params, x, mask, pool, labels)
        opt.step(params, g, tc.lr)
        steps.append({"step": step + 1, **phase.end(ctx), "offline": pre})
        if first is None:
            first = (g, p_true)
    g, p_true = first
    revealed = {n: train.reveal_exact(g[n], do) for n in names}  # the data owner checks them
    loss = train.reveal_exact(-(p_true + 1e-4).log().mean(), do)
    summary = {"steps": steps}
    if ctx.rank == do:
        revealed = {n: v.cpu() / tc.loss_scale for n, v in revealed.items()}
        ref_loss, ref = reference_step(plain_weights(arch), *data, arch)
        summary["fidelity"] = {"loss": round(loss.item(), 5), "reference_loss": round(ref_loss, 5),
                               **gradient_fidelity(revealed, ref)}
    return summary


# ---------------------------------------------------------------- the launcher


def _config(args, tmp: Path) -> Path:
    """A consortium config for the three parties. Its runtime sections (parties, rendezvous, timeouts,
    preprocessing, approximations) are what the parties use; ``model`` and ``job`` only satisfy the
    config's validation (the computing parties run :func:`party_job`, not a job)."""
    (tmp / "unused.txt").write_text("x\n")
    parties = [{"name": n, "role": r, "device": args.device} for n, r in ROLES]
    parties[1]["input"] = "unused.txt"
    cfg = {"name": "bench-train", "run_dir": str(tmp / "runs"), "parties": parties,
           "model": {"path": "random weights (mpc_lm.bench_train)", "task": args.task},
           "job": {"kind": "classify", "seq_len": args.seq, "batch_size": args.batch},
           "rendezvous": {"host": "127.0.0.1", "port": args.port},
           "timeouts": {"run_s": args.timeout, "op_s": 1800},
           "preprocessing": {"mode": "on_demand" if args.on_demand else "offline"}}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def summarize(args, results: dict, wall_s: float) -> dict:
    tokens = args.batch * args.seq
    steps = []
    # party 0 (the model owner) fetches the dealer's answers: its offline seconds and dealer bytes
    for rec, rec0 in zip(results["alice"]["steps"], results["vendor"]["steps"]):
        online, dealer = rec["traffic"]["online"], rec0["traffic"]["dealer"]
        offline_s = (rec0["offline"] or {}).get("offline_s", 0.0)
        steps.append({"step": rec["step"], "wall_s": rec["wall_s"], "offline_s": offline_s,
                      "online_s": round(rec["wall_s"] - offline_s, 3),
                      "online_rounds": online["rounds"], "online_bytes_sent": online["bytes_sent"],
                      "dealer_bytes": dealer["bytes_sent"] + dealer["bytes_received"],
                      "tokens_per_s": round(tokens / rec["wall_s"], 2),
                      "tokens_per_s_online": round(tokens / max(rec["wall_s"] - offline_s, 1e-9), 2)})
    steady = steps[1:] or steps
    mean = {k: round(sum(s[k] for s in steady) / len(steady), 3)
            for k in ("wall_s", "offline_s", "online_s", "tokens_per_s", "tokens_per_s_online")}
    mean.update({k: steady[-1][k] for k in ("online_rounds", "online_bytes_sent", "dealer_bytes")})
    return {"shape": {k: getattr(args, k) for k in ("batch", "seq", "hidden", "heads", "intermediate", "task")},
            "device": args.device, "preprocessing": "on_demand" if args.on_demand else "offline",
            "tokens_per_step": tokens, "steady_state": mean, "steps": steps,
            "fidelity": results["alice"].get("fidelity"), "wall_s": round(wall_s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpc_lm.bench_train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per example, the public bucket (default 128)")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (default 768: BERT-base)")
    ap.add_argument("--heads", type=int, default=12, help="attention heads; must divide --hidden (default 12)")
    ap.add_argument("--intermediate", type=int, default=3072, help="feed-forward width (default 3072)")
    ap.add_argument("--task", default="embedding", choices=["embedding", "sequence-classification"],
                    help="head: embedding = masked mean pooling + linear (the benchmark CLI's head); "
                         "sequence-classification = BERT's pooler (tanh) + linear")
    ap.add_argument("--steps", type=int, default=3, help="the first includes planning; the rest are averaged")
    ap.add_argument("--loss-scale", type=float, default=1024.0, help="public factor on the loss gradient "
                    "(fixed-point resolution; docs/training.md)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N], for every party")
    ap.add_argument("--port", type=int, default=29680, help="rendezvous port on 127.0.0.1")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds before every party is stopped")
    ap.add_argument("--on-demand", action="store_true", help="preprocessing.mode: on_demand (no offline phase)")
    ap.add_argument("--json", help="also write the JSON here")
    # one party, as mpc_lm.launch starts it: --party-config CONFIG --name NAME --result PATH
    ap.add_argument("--party-config", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [f"--{k} must be at least {lo} (got {getattr(args, k)})"
           for k, lo in (("batch", 1), ("seq", 2), ("hidden", 2), ("heads", 1), ("intermediate", 1), ("steps", 1))
           if getattr(args, k) < lo]
    if args.hidden % max(args.heads, 1):
        bad.append(f"--heads must divide --hidden ({args.hidden} is not a multiple of {args.heads})")
    if bad:
        ap.error("; ".join(bad))
    if args.party_config:
        from .party import run_party

        return run_party(args.party_config, args.name, args.result, "warning", job=lambda ctx: party_job(ctx, args))
    from .errors import MpcLmError
    from .launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        forwarded = list(argv if argv is not None else sys.argv[1:])
        try:
            run = launch(_config(args, Path(tmp)),
                         entry=[sys.executable, "-m", "mpc_lm.bench_train", *forwarded, "--party-config"])
        except MpcLmError as err:  # the failing party's own message and the tail of its log
            print(f"bench_train: error: {err}\n(the config is made from this command's options: --port, "
                  "--timeout, --device)", file=sys.stderr)
            return 1
        out = summarize(args, run.results, run.wall_s)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
