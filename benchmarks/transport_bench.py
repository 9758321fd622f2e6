"""Throughput and per-round latency: mutual-TLS transport vs gloo, two processes on loopback.

Both sides use mpc_lm's real communicators (``PartyCommunicator`` over gloo,
``TlsCommunicator`` over the TLS mesh), so the figures include everything a
CrypTen call pays: accounting, framing, the reader thread hand-off.

* throughput: party 0 sends an int64 tensor of SIZE bytes, party 1 answers a
  1-element ack; bytes / time, best and median of the repetitions;
* latency: ping-pong of one int64 (send + recv each way), and ``all_reduce``
  of 16 int64 (one CrypTen round), microseconds per round, median.

    PYTHONPATH=. python benchmarks/transport_bench.py --out benchmarks/results/transport-loopback.json

Ports: 29960-29969 (rendezvous + TLS listeners).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



def _exchange(comm, rank: int, payload, buf, ack) -> None:
    """Rank 0 sends ``payload`` and waits for ``ack``; rank 1 receives into ``buf`` and acks."""
    if rank == 0:
        comm.send(payload, 1)
        comm.recv(ack, 1)
    else:
        comm.recv(buf, 0)
        comm.send(ack, 0)

def _comm(backend: str, rank: int, port: int, certs: str):
    import torch.distributed as dist

    from mpc_lm import transport

    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=(rank == 0),
                          timeout=timedelta(seconds=60), wait_for_workers=False)
    if backend == "gloo":
        return transport.PartyCommunicator(store=dist.PrefixStore("pg", store), rank=rank, world_size=2,
                                           init_ttp=False, timeout_s=120, name=f"p{rank}")
    from mpc_lm import tls_transport as T

    names = ["p0", "p1"]
    d = Path(certs)
    sctx, cctx = T.make_contexts(d / "ca.pem", d / f"{names[rank]}.pem", d / f"{names[rank]}.key")
    mesh = T.Mesh(rank, names, op_s=120, heartbeat_s=1, silence_s=30, digest="bench")
    p = mesh.listen("127.0.0.1", port + 1 + rank)
    store.set(f"addr/{rank}", json.dumps(["127.0.0.1", p]))

    def lookup(r, deadline):
        store.wait([f"addr/{r}"])
        host, pp = json.loads(store.get(f"addr/{r}"))
        return host, pp

    mesh.establish(sctx, cctx, lookup, time.monotonic() + 60)
    return T.TlsCommunicator(mesh=mesh, world_size=2, init_ttp=False, name=names[rank])


def _party(backend, rank, port, certs, sizes, reps, rounds, out):
    import torch

    torch.set_num_threads(1)
    comm = _comm(backend, rank, port, certs)
    ack = torch.zeros(1, dtype=torch.long)
    res = {"throughput": {}, "latency_us": {}}
    for size in sizes:
        t = torch.randint(0, 1 << 62, (size // 8,), dtype=torch.long)
        buf = torch.empty_like(t)
        times = []
        for _ in range(reps + 1):
            comm.barrier()
            t0 = time.perf_counter()
            _exchange(comm, rank, t, buf, ack)
            times.append(time.perf_counter() - t0)
        times = times[1:]  # first one warms up
        res["throughput"][str(size)] = {"best_MBps": round(size / min(times) / 1e6, 1),
                                        "median_MBps": round(size / statistics.median(times) / 1e6, 1)}
    one = torch.ones(1, dtype=torch.long)
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(rounds):
        _exchange(comm, rank, one, ack, ack)
    res["latency_us"]["ping_pong"] = round((time.perf_counter() - t0) / rounds * 1e6, 1)
    x = torch.ones(16, dtype=torch.long)
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(rounds):
        comm.all_reduce(x)
    res["latency_us"]["all_reduce_16"] = round((time.perf_counter() - t0) / rounds * 1e6, 1)
    comm.barrier()
    if backend == "tls":
        comm.close(True)
    else:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank == 0:
        out.put(res)


def two_processes(target, args_of) -> dict:
    """Run ``target(*args_of(rank), queue)`` for ranks 0 and 1 in spawned processes; what rank 0 puts."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(r), out)) for r in range(2)]
    for p in procs:
        p.start()
    res = out.get(timeout=600)
    for p in procs:
        p.join(60)
    return res


def run(backend: str, port: int, certs: str, sizes, reps, rounds) -> dict:
    return two_processes(_party, lambda r: (backend, r, port, certs, sizes, reps, rounds))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/transport-loopback.json"))
    ap.add_argument("--sizes", default="65536,1048576,16777216,134217728")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--port", type=int, default=29960)
    args = ap.parse_args()
    from mpc_lm.pki import create_consortium

    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as certs:
        create_consortium(Path(certs), ["p0", "p1"])
        results = {}
        for i, backend in enumerate(("gloo", "tls")):
            results[backend] = run(backend, args.port + 4 * i, certs, sizes, args.reps, args.rounds)
            print(backend, json.dumps(results[backend]), flush=True)
    ratio = {s: round(results["gloo"]["throughput"][s]["median_MBps"] /
                      max(results["tls"]["throughput"][s]["median_MBps"], 1e-9), 2) for s in results["gloo"]["throughput"]}
    lat = {k: round(results["tls"]["latency_us"][k] / results["gloo"]["latency_us"][k], 2)
           for k in results["gloo"]["latency_us"]}
    record = {
        "what": "2 processes on loopback, mpc_lm communicators; gloo vs mutual TLS 1.3 (AES-256-GCM)",
        "host": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "python": platform.python_version(),
                 "platform": platform.platform()},
        "gloo": results["gloo"], "tls": results["tls"],
        "tls_slowdown_throughput": ratio, "tls_slowdown_latency": lat,
        "command": "PYTHONPATH=. python benchmarks/transport_bench.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps({"tls_slowdown_throughput": ratio, "tls_slowdown_latency": lat}))


if __name__ == "__main__":
    main()
