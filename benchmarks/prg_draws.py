"""Draw throughput of the dealer streams (mpc_lm/prg.py): AES-128-CTR against torch's CPU generator.

    python benchmarks/prg_draws.py [--json PATH]

Prints, per draw size, millions of ring elements (int64) and of single bits drawn per second on one
core (the best of 5), as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mpc_lm import prg


def _rate(draw, n: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        draw()
        best = min(best, time.perf_counter() - started)
    return round(n / best / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    aes, mt = prg.AesStream(bytes(16)), torch.Generator().manual_seed(1)
    rows = []
    for n in (4_096, 393_216, 4_718_592):  # a small tensor, 128 x 3072, 12 x 128 x 3072
        rows.append({"elements": n,
                     "ring_aes_M_per_s": _rate(lambda: prg.ring((n,), aes), n),
                     "ring_torch_M_per_s": _rate(lambda: prg.ring((n,), mt), n),
                     "bit_aes_M_per_s": _rate(lambda: prg.kbit((n,), 1, aes), n),
                     "bit_torch_M_per_s": _rate(lambda: prg.kbit((n,), 1, mt), n)})
    doc = {"machine": {"platform": platform.platform(), "processor": platform.processor()},
           "command": "python benchmarks/prg_draws.py", "rows": rows}
    print(json.dumps(doc, indent=2))
    if args.json:
        open(args.json, "w").write(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
