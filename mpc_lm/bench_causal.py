"""Cost of one encrypted generation step at real shapes (random weights).

    python -m mpc_lm.bench_causal [--family gpt2] [--layers 12] [--hidden 768] [--heads 12]
        [--vocab 50257] [--prompt 64] [--new 2] [--device cpu|cuda] [--port 29690]
        [--on-demand] [--no-weight-masks]

Builds (once, under $MPC_LM_CACHE) a random checkpoint of the given shape
(defaults: GPT-2 small), launches model owner + data owner + dealer on this
machine with a ``prompt``-token prompt, generates ``new`` tokens greedily
and prints JSON: wall seconds, online bytes sent per party, online rounds,
dealer bytes, for the prefill, per step (``per_token``: the mean over all steps, the
last of which only chooses a token) and per full step (``full_step``: choosing a token
and running its forward pass, the cost of one more token; needs ``--new`` >= 2).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml


def main(argv=None) -> int:
    from . import lm_examples
    from .cli_lm import step_costs
    from .launch import launch

    ap = argparse.ArgumentParser(prog="python -m mpc_lm.bench_causal")
    ap.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=2,
                    help="tokens to generate (>= 2 for a full step: the last step only chooses)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--port", type=int, default=29690)
    ap.add_argument("--on-demand", action="store_true",
                    help="preprocessing.mode: on_demand (the dealer asked per multiplication; default: offline phase)")
    ap.add_argument("--no-weight-masks", action="store_true",
                    help="preprocessing.weight_masks: false (each product opens the weight's mask again)")
    args = ap.parse_args(argv)
    name = f"bench-{args.family}-l{args.layers}-h{args.hidden}-a{args.heads}-v{args.vocab}"
    model = lm_examples.cache_dir() / name
    if not (model / "config.json").is_file():
        lm_examples.random_causal_model(model, args.family, hidden=args.hidden, layers=args.layers,
                                        heads=args.heads, positions=max(1024, args.prompt + args.new),
                                        vocab=256, model_vocab=args.vocab, init_std=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        words = lm_examples.CORPUS.read_text().split()
        (tmp / "prompt.txt").write_text(" ".join(words[: args.prompt]) + "\n")
        cfg = {"name": "bench-causal", "run_dir": str(tmp / "runs"),
               "parties": [{"name": "vendor", "role": "model_owner", "device": args.device},
                           {"name": "alice", "role": "data_owner", "input": "prompt.txt",
                            "output": "out.jsonl", "device": args.device},
                           {"name": "dealer", "role": "dealer", "device": args.device}],
               "model": {"path": str(model), "task": "causal-lm"},
               "job": {"kind": "generate", "seq_len": args.prompt, "batch_size": 1, "truncate": True,
                       "generate": {"max_new_tokens": args.new}},
               "rendezvous": {"host": "127.0.0.1", "port": args.port},
               "timeouts": {"run_s": 7200, "op_s": 1800},
               "preprocessing": {"mode": "on_demand" if args.on_demand else "offline",
                                 "weight_masks": not args.no_weight_masks}}
        (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
        run = launch(tmp / "c.yaml")
        costs = step_costs(run)["alice"]
    out = {"shape": vars(args), "wall_s": run.wall_s,
           "share_weights_s": max(r["share_weights"]["wall_s"] for r in run.results.values() if "share_weights" in r),
           **costs}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
