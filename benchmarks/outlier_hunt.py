"""Look for, and locate, the MiniLM demo's rare huge logit errors (docs/accuracy.md, "Rare outliers").

Runs the demo consortium (12 sentences, 2 parties + dealer) with REPLAYABLE randomness
(``benchmarks/replay_party.py``: insecure, diagnostics only), one seed per run, and prints each run's max
|logit error| and top-1 agreement. ``--dump SEED --against SEED2`` runs both seeds again with every
``mpc_lm.approx`` / ``mpc_lm.layers`` result saved, opens them (adds the parties' shares) and prints the
first results where the two runs differ by more than ``--gap``: the step where the outlier starts.

    python benchmarks/outlier_hunt.py --seeds 1-40 [--json PATH] [--set approx.x=y ...]
    python benchmarks/outlier_hunt.py --dump 17 --against 18
    python benchmarks/outlier_hunt.py --seeds 1-3 --audit --json PATH    (truncation failures expected per run)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from mpc_lm import report
from mpc_lm.launch import launch

ROOT = Path(__file__).resolve().parent.parent
TEXTS = (ROOT / "launch" / "demo_sentences.txt").read_text().splitlines()
ENTRY = [sys.executable, str(ROOT / "benchmarks" / "replay_party.py"), "party"]


def _set(cfg: dict, assignments: list[str]) -> None:
    for item in assignments:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)


def run(seed: int, work: Path, port: int, settings: list[str], dump: Path | None = None,
        audit: Path | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "in.txt").write_text("\n".join(TEXTS) + "\n")
    cfg = {
        "name": f"hunt{seed}",
        "parties": [{"name": "vendor", "role": "model_owner"},
                    {"name": "hospital", "role": "data_owner", "input": str(work / "in.txt"),
                     "output": str(work / "out.jsonl")},
                    {"name": "dealer", "role": "dealer"}],
        "model": {"path": "builtin:demo-minilm-sentiment", "task": "embedding"},
        "job": {"kind": "classify", "seq_len": 16, "batch_size": 12},
        "rendezvous": {"port": port}, "run_dir": str(work / "runs"),
    }
    _set(cfg, settings)
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {"MPC_LM_REPLAY_SEED": str(seed)}
    if dump is not None:
        env["MPC_LM_REPLAY_DUMP"] = str(dump)
    if audit is not None:
        env["MPC_LM_REPLAY_AUDIT"] = str(audit)
    summary = report.build(launch(work / "c.yaml", extra_env=env, entry=ENTRY), check=True)
    fid = summary["fidelity"]["hospital"]
    logits = [json.loads(line).get("logits") for line in (work / "out.jsonl").read_text().splitlines()]
    return {"seed": seed, "max_abs_logit_error": fid["max_abs_logit_error"], "top1_agreement": fid["top1_agreement"],
            "logits": logits}


def _seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def opened(directory: Path) -> list[tuple[str, torch.Tensor]]:
    """The dumped results with the computing parties' shares added (mod 2^64), decoded at 16 bits."""
    a, b = torch.load(directory / "vendor.pt"), torch.load(directory / "hospital.pt")
    assert [k for k, _ in a] == [k for k, _ in b], "the parties dumped different call sequences"
    return [(k, (x + y).double() / 2**16) for (k, x), (_, y) in zip(a, b)]


def compare(bad: Path, good: Path, gap: float, show: int, only: str = "") -> list[dict]:
    x, y = opened(bad), opened(good)
    x = [(k, v) for k, v in x if k.strip().startswith(only)]
    y = [(k, v) for k, v in y if k.strip().startswith(only)]
    rows = []
    for i, ((k, u), (k2, v)) in enumerate(zip(x, y)):
        if k != k2 or u.shape != v.shape:
            rows.append({"index": i, "call": k, "note": f"call sequences diverge here ({k2})"})
            break
        d = (u - v).abs()
        if d.numel() and d.max().item() > gap:
            j = int(d.reshape(-1).argmax())
            rows.append({"index": i, "call": k.strip(), "depth": (len(k) - len(k.lstrip())) // 2,
                         "shape": list(u.shape), "elements_over_gap": int((d > gap).sum()),
                         "max_diff": d.max().item(), "flat_index": j,
                         "value_bad": u.reshape(-1)[j].item(), "value_good": v.reshape(-1)[j].item()})
            if len(rows) >= show:
                break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1-20", help="seeds to run, e.g. 1-40 or 3,9,12")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. approx.ring_products=digits")
    ap.add_argument("--dump", type=int, help="replay this seed with every result saved")
    ap.add_argument("--audit", action="store_true",
                    help="check every 2-party truncation of each run: expected and actual failures per call site")
    ap.add_argument("--against", type=int, help="a seed whose run is correct, to compare the dump with")
    ap.add_argument("--gap", type=float, default=1e3, help="difference that marks a result as broken")
    ap.add_argument("--show", type=int, default=8)
    ap.add_argument("--port", type=int, default=29640)
    ap.add_argument("--only", default="", help="compare only the results whose call name starts with this")
    ap.add_argument("--keep", help="keep the runs (and dumps) in this folder")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        if args.dump is not None:
            for seed in (args.dump, args.against):
                r = run(seed, tmp / f"s{seed}", args.port, args.set, dump=tmp / f"d{seed}")
                print(json.dumps({k: v for k, v in r.items() if k != "logits"}), flush=True)
            rows = compare(tmp / f"d{args.dump}", tmp / f"d{args.against}", args.gap, args.show, args.only)
            for row in rows:
                print(json.dumps(row), flush=True)
        else:
            for seed in _seeds(args.seeds):
                r = run(seed, tmp / f"s{seed}", args.port, args.set, audit=tmp / f"a{seed}" if args.audit else None)
                if args.audit:
                    r["truncations"] = json.loads((tmp / f"a{seed}" / "vendor.json").read_text())
                    r["expected_failures"] = sum(v["expected"] for v in r["truncations"].values())
                    r["failures"] = sum(v["failures"] for v in r["truncations"].values())
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("logits", "truncations")}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
