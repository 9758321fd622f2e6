"""Print the recorded results (benchmarks/results/*.json) as markdown tables.

    PYTHONPATH=. python benchmarks/summarize.py [FILE.json ...]

A thin script: the logic is in mpc_lm.bench.output (this folder is never imported).
"""

import json
import sys
from pathlib import Path

from mpc_lm.bench.output import markdown

files = sys.argv[1:] or sorted(str(p) for p in (Path(__file__).parent / "results").glob("*.json"))
for f in files:
    doc = json.loads(Path(f).read_text())
    if "benchmark" not in doc:  # not an `mpc-lm bench` result (bench_causal, transport, fidelity files)
        continue
    b = doc["benchmark"]
    print(f"### {Path(f).name}: {b['model']} on {b['task']}\n\n`{b['command']}`\n")
    if doc["modes"]:
        print(markdown(doc) + "\n")
    for s in doc["skipped"]:
        print(f"- skipped {s['mode']}: {s['reason']}")
    print()
