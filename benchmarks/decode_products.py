"""A GPT-2-small generation step's 48 layer weight products (one row each), with the weights in the usual
(in, out) layout and kept by output column (premask's ``by_rows``, docs/performance.md lever 31).

Run two at once to share the memory bus as the two computing parties do:

    python benchmarks/decode_products.py & python benchmarks/decode_products.py; wait
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mpc_lm import ring  # noqa: E402

#: one layer's weights: QKV, attention output, feed-forward in and out (GPT-2 small), 12 layers
SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12


def main(reps: int = 15) -> None:
    torch.set_num_threads(1)
    ring.PRODUCTS["method"] = "int64"
    usual = [torch.randint(-(2**62), 2**62, s) for s in SHAPES]
    by_column = [w.t().contiguous().t() for w in usual]  # the same values, each output column contiguous
    rows = {k: torch.randint(-(2**62), 2**62, (1, k)) for k in (768, 3072)}
    times = {"usual": [], "by_column": []}
    for _ in range(reps):
        for name, weights in (("usual", usual), ("by_column", by_column)):
            started = time.perf_counter()
            for w in weights:
                ring.matmul(rows[w.size(0)], w)
            times[name].append(time.perf_counter() - started)
    print(f"pid {os.getpid()}: 48 one-row products, median of {reps}: "
          + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
