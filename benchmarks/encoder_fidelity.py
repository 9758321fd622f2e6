"""Fidelity and cost of encrypted encoder inference, per model family.

Runs real local consortia (model owner, data owner, dealer) on the 12 bundled
demo sentences and prints, per model, the max |logit error| and top-1
agreement against the plaintext HF model on the same padded input, with the
wall time, bytes sent per party and online rounds of the encrypted forward.

    python benchmarks/encoder_fidelity.py [--json PATH] [--device cpu|cuda] [--port 29580]

Models: tiny random BERT / RoBERTa / DistilBERT (2 layers, hidden 32; no real
checkpoint of those families ships offline) and the real demo model
(all-MiniLM-L6-v2 + sentiment head).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import yaml

from mpc_lm import report
from mpc_lm.launch import launch
from mpc_lm.zoo import random_encoder

ROOT = Path(__file__).resolve().parent.parent
TEXTS = (ROOT / "launch" / "demo_sentences.txt").read_text().splitlines()


def run(name: str, model: str, task: str, work: Path, port: int, device: str) -> dict:
    (work / "in.txt").write_text("\n".join(TEXTS) + "\n")
    cfg = {
        "name": name,
        "parties": [{"name": "vendor", "role": "model_owner", "device": device},
                    {"name": "hospital", "role": "data_owner", "device": device,
                     "input": str(work / "in.txt"), "output": str(work / "out.jsonl")},
                    {"name": "dealer", "role": "dealer", "device": device}],
        "model": {"path": model, "task": task},
        "job": {"kind": "classify", "seq_len": 16, "batch_size": 12},
        "rendezvous": {"port": port}, "run_dir": str(work / "runs"),
    }
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    summary = report.build(launch(work / "c.yaml"), check=True)
    cost, fid = summary["inference"]["hospital"], summary["fidelity"]["hospital"]
    sent = max(p["online_bytes_sent"] for p in cost["per_party"].values())
    return {"model": name, "texts": fid["n"], "max_abs_logit_error": round(fid["max_abs_logit_error"], 5),
            "top1_agreement": fid["top1_agreement"], "wall_s": cost["wall_s"],
            "online_bytes_sent_per_party": sent, "online_rounds": cost["rounds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--port", type=int, default=29580)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, fam in enumerate(("bert", "roberta", "distilbert")):
            model = random_encoder(fam, tmp / fam)
            (tmp / f"w{i}").mkdir()
            rows.append(run(f"tiny-{fam}", str(model), "sequence-classification", tmp / f"w{i}", args.port + i, args.device))
        (tmp / "w3").mkdir()
        rows.append(run("demo-minilm-sentiment (real MiniLM-L6)", "builtin:demo-minilm-sentiment", "embedding",
                        tmp / "w3", args.port + 3, args.device))
    doc = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "device": args.device},
           "command": "python benchmarks/encoder_fidelity.py", "rows": rows}
    print(json.dumps(doc, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
