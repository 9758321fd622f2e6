"""Time one ring product at BERT-base shapes: int64 ``torch.matmul`` against the float64 digits of
``mpc_lm.ring``, and say which one ``ring.choose("auto")`` picks on this machine.

    python benchmarks/ring_matmul.py [--json PATH]

Prints, per shape, the seconds of one product each way (the best of ``--repeat``) and checks that
the two results are bit-identical (docs/performance.md, levers 13, 15 and 17).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mpc_lm import ring

SHAPES = {"FF1 128x768 @ 768x3072": ((128, 768), (768, 3072)), "FF2 128x3072 @ 3072x768": ((128, 3072), (3072, 768)),
          "one-hot embedding 128x30522 @ 30522x768": ((128, 30522), (30522, 768)),
          "QKV 8x128x768 @ 768x2304": ((8, 128, 768), (768, 2304)),
          "one token 1x768 @ 768x3072": ((1, 768), (768, 3072)),
          "scores 12x128x64 @ 12x64x128": ((12, 128, 64), (12, 64, 128))}


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; a party on a shared machine: "
                                                "cores / computing parties)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (a_size, b_size) in SHAPES.items():
        a = torch.randint(-(2**63), 2**63 - 1, a_size, generator=gen)
        b = torch.randint(-(2**63), 2**63 - 1, b_size, generator=gen)
        same = torch.equal(torch.matmul(a, b), ring._blas_matmul(a, b))
        row = {"product": name, "int64_s": _best(lambda: torch.matmul(a, b), args.repeat),
               "ring_s": _best(lambda: ring._blas_matmul(a, b), args.repeat), "bit_identical": same}
        rows.append(row)
        print(f"{name:42s} int64 {row['int64_s']:7.3f} s   digits {row['ring_s']:6.3f} s   identical: {same}")
    chosen = ring.choose("auto")
    print(f"ring.choose('auto') on this machine: {chosen} {ring.PRODUCTS['measured']}")
    if args.json:
        doc = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability()},
               "auto": {"method": chosen, **ring.PRODUCTS["measured"]}, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
