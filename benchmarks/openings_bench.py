"""Time of one opening (``all_reduce`` of a ring tensor) between two parties on loopback, three ways.

* ``allreduce``: gloo's all-reduce (``rendezvous.exchange_openings: false``, as stock CrypTen);
* ``gloo-exchange``: each party's tensor sent to the other by gloo's ``isend``/``irecv`` (lever 21);
* ``socket-exchange``: the same over the parties' own TCP socket (``rendezvous.exchange_socket``, lever 25),
  here at every size (the communicator's size limit lifted) to show where it stops paying.

Both processes use mpc_lm's ``PartyCommunicator``, so each figure includes the accounting and the sum.
Median microseconds per opening over ``--rounds`` (small) or ``--reps`` (large) repetitions.

    PYTHONPATH=. python benchmarks/openings_bench.py --out benchmarks/results/openings-loopback-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from transport_bench import two_processes  # noqa: E402
MODES = ("allreduce", "gloo-exchange", "socket-exchange")


def _party(mode: str, rank: int, port: int, sizes, rounds: int, reps: int, out) -> None:
    import torch
    import torch.distributed as dist

    from mpc_lm import transport

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=(rank == 0),
                          timeout=timedelta(seconds=60), wait_for_workers=False)
    comm = transport.PartyCommunicator(
        store=dist.PrefixStore("pg", store), rank=rank, world_size=2, init_ttp=False, timeout_s=120,
        name=f"p{rank}", exchange=mode != "allreduce",
        pair_host="127.0.0.1" if mode == "socket-exchange" else None)
    if mode == "socket-exchange":
        comm._exchange_max = 1 << 40
    res = {}
    for size in sizes:
        x = torch.randint(-(2**62), 2**62, (max(1, size // 8),), dtype=torch.long)
        n = rounds if size <= 1 << 16 else reps
        times = []
        comm.barrier()
        for _ in range(n + 2):
            t0 = time.perf_counter()
            comm.all_reduce(x)
            times.append(time.perf_counter() - t0)
        res[str(size)] = round(statistics.median(times[2:]) * 1e6, 1)
    comm.barrier()
    dist.destroy_process_group()
    if rank == 0:
        out.put(res)


def run(mode: str, port: int, sizes, rounds: int, reps: int) -> dict:
    return two_processes(_party, lambda r: (mode, r, port, sizes, rounds, reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file for the figures (default: print only)")
    ap.add_argument("--sizes", default="128,49152,1048576,4194304,16777216,67108864")
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--port", type=int, default=29940)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for i, mode in enumerate(MODES):
        results[mode] = run(mode, args.port + i, sizes, args.rounds, args.reps)
        print(mode, json.dumps(results[mode]), flush=True)
    record = {
        "what": "median microseconds per opening (all_reduce of an int64 tensor of SIZE bytes), 2 processes "
                "on loopback, mpc_lm's PartyCommunicator, 1 torch thread each",
        "host": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "python": platform.python_version(),
                 "platform": platform.platform()},
        "us_per_opening": results,
        "command": "PYTHONPATH=. python benchmarks/openings_bench.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
