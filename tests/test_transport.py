"""The gloo communicator's openings between two parties: a pairwise exchange up to 1 MiB, gloo's
all-reduce above it or when ``rendezvous.exchange_openings`` is false; the same sums either way."""

from __future__ import annotations

import multiprocessing as mp
import socket
from datetime import timedelta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _party(rank: int, port: int, exchange: bool, out) -> None:
    import torch
    import torch.distributed as dist

    from mpc_lm import transport

    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=rank == 0, timeout=timedelta(seconds=60))
    comm = transport.PartyCommunicator(store=store, rank=rank, world_size=2, init_ttp=False, timeout_s=60,
                                       name=f"p{rank}", exchange=exchange)
    used = []
    original = comm._exchange_reduce
    comm._exchange_reduce = lambda items, op: used.append(True) or original(items, op)
    gen = torch.Generator().manual_seed(11 + rank)
    results = {}
    for name, size in (("small", 1000), ("large", (1 << 17) + 1)):
        x = torch.randint(-(2**63), 2**63 - 1, (size,), dtype=torch.long, generator=gen)
        before = len(used)
        total = comm.all_reduce(x)
        xor = comm.all_reduce(x, op=dist.ReduceOp.BXOR)
        pair = comm.all_reduce([x, x[:7]], batched=True)
        results[name] = {"sum": total.tolist()[:50], "xor": xor.tolist()[:50], "pair": pair[1].tolist(),
                         "exchanged": len(used) - before, "mine": x.tolist()[:50]}
    results["traffic"] = comm.traffic.snapshot()
    dist.destroy_process_group()
    out.put((rank, results))


def _run(exchange: bool) -> dict:
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_party, args=(r, port, exchange, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return got


def _wrap(v: int) -> int:
    return (v + 2**63) % 2**64 - 2**63


def test_openings_exchange_up_to_a_mebibyte_and_sum_as_gloo_does():
    results = {exchange: _run(exchange) for exchange in (True, False)}
    for exchange, got in results.items():
        for name in ("small", "large"):
            a, b = got[0][name], got[1][name]
            want_sum = [_wrap(u + v) for u, v in zip(a["mine"], b["mine"])]
            want_xor = [u ^ v for u, v in zip(a["mine"], b["mine"])]
            for r in (0, 1):
                assert got[r][name]["sum"] == want_sum and got[r][name]["xor"] == want_xor
                assert got[r][name]["pair"] == want_sum[:7]
            # exchanged: the small openings (three calls) when asked; never above 1 MiB
            assert a["exchanged"] == (3 if exchange and name == "small" else 0), (exchange, name, a["exchanged"])
    # the same bytes and rounds counted either way
    assert results[True][0]["traffic"] == results[False][0]["traffic"]
