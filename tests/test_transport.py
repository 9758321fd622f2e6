"""The gloo communicator's openings between two parties: a pairwise exchange of any size over the
parties' own socket, up to 1 MiB over gloo's isend/irecv (gloo's all-reduce above it), gloo's
all-reduce when ``rendezvous.exchange_openings`` is false; the same sums and the same counted traffic every way. The
exchange socket admits only the party holding the store's token, and a stopped or silent peer ends an
exchange with a clear error."""

from __future__ import annotations

import multiprocessing as mp
import socket
from datetime import timedelta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _party(rank: int, port: int, mode: str, out, device: str = "cpu", wrapped: bool = False) -> None:
    import torch
    import torch.distributed as dist

    from mpc_lm import transport

    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=rank == 0, timeout=timedelta(seconds=60))
    comm = transport.PartyCommunicator(store=store, rank=rank, world_size=2, init_ttp=False, timeout_s=60,
                                       name=f"p{rank}", exchange=mode != "allreduce",
                                       pair_host="127.0.0.1" if mode == "socket" else None)
    assert (comm._pair is not None) == (mode == "socket")
    used = []
    original = comm._exchange_reduce
    comm._exchange_reduce = lambda items, op: used.append(True) or original(items, op)
    gen = torch.Generator().manual_seed(11 + rank)
    results = {}
    for name, size in (("small", 1000), ("large", (1 << 17) + 1)):
        x = torch.randint(-(2**63), 2**63 - 1, (size,), dtype=torch.long, generator=gen).to(device)
        head = x[:7]
        if wrapped:  # CrypTen's GPU shares
            from crypten.cuda import CUDALongTensor

            x, head = CUDALongTensor(x), CUDALongTensor(head)
        before = len(used)
        total = comm.all_reduce(x)
        xor = comm.all_reduce(x, op=dist.ReduceOp.BXOR)
        pair = comm.all_reduce([x, head], batched=True)
        outs = (total, xor, *pair)
        plain = [t if torch.is_tensor(t) else t.tensor() for t in outs]
        results[name] = {"sum": plain[0].tolist()[:50], "xor": plain[1].tolist()[:50], "pair": plain[3].tolist(),
                         "exchanged": len(used) - before, "mine": (x if torch.is_tensor(x) else x.tensor()).tolist()[:50],
                         "devices": sorted({str(t.device) for t in plain}),
                         "types": sorted({type(t).__name__ for t in outs})}
    results["traffic"] = comm.traffic.snapshot()
    dist.destroy_process_group()
    out.put((rank, results))


def _run(mode: str, device: str = "cpu", wrapped: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_party, args=(r, port, mode, out, device, wrapped)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return got


def _wrap(v: int) -> int:
    return (v + 2**63) % 2**64 - 2**63


def check_openings(results: dict, device: str = "cpu") -> None:
    """The sums and XORs of both parties' tensors at both parties, exchanged as each mode promises."""
    for mode, got in results.items():
        exchange = mode != "allreduce"
        for name in ("small", "large"):
            a, b = got[0][name], got[1][name]
            want_sum = [_wrap(u + v) for u, v in zip(a["mine"], b["mine"])]
            want_xor = [u ^ v for u, v in zip(a["mine"], b["mine"])]
            for r in (0, 1):
                assert got[r][name]["sum"] == want_sum and got[r][name]["xor"] == want_xor
                assert got[r][name]["pair"] == want_sum[:7]
            # exchanged when asked (three calls): over gloo's isend/irecv only up to 1 MiB
            want = 3 if mode == "socket" or (exchange and name == "small") else 0
            assert a["exchanged"] == want, (mode, name, a["exchanged"])
            assert a["devices"] == [device], a["devices"]


def test_openings_exchange_and_sum_as_gloo_does():
    results = {mode: _run(mode) for mode in ("socket", "gloo", "allreduce")}
    check_openings(results)
    # the same bytes and rounds counted every way
    assert results["socket"][0]["traffic"] == results["gloo"][0]["traffic"] == results["allreduce"][0]["traffic"]


def _pair_sockets(timeout_s: float = 20.0):
    """Both ends of a PairSocket in this process (rank 0 accepting in a thread)."""
    import threading

    import torch.distributed as dist

    from mpc_lm.pair_socket import PairSocket

    port = _free_port()
    master = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=True,
                           timeout=timedelta(seconds=20), wait_for_workers=False)
    got = {"master": master}  # one store client per thread: a client is not shared across threads
    t = threading.Thread(target=lambda: got.update(a=PairSocket.connect(master, 0, "127.0.0.1", timeout_s)))
    t.start()
    client = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=False, timeout=timedelta(seconds=20))
    return client, t, got


def test_exchange_socket_admits_only_the_token_holder_and_exchanges():
    import threading

    import torch

    from mpc_lm.pair_socket import PairSocket

    store, t, got = _pair_sockets()
    port = int(store.get("pair_socket/port").decode())
    with socket.create_connection(("127.0.0.1", port)) as stranger:  # knows the port, not the token
        stranger.sendall(b"\0" * 32)
        stranger.settimeout(10)
        assert stranger.recv(1) == b""  # closed on it
    b = PairSocket.connect(store, 1, "127.0.0.1", 20)
    t.join(20)
    a = got["a"]
    big = torch.arange(300_000, dtype=torch.long)  # larger than a socket buffer: both directions at once
    mine = {0: [torch.tensor([1, 2, 3]), big, torch.ones(2, dtype=torch.bool)],
            1: [torch.tensor([7, 8, 9]), -big, torch.zeros(2, dtype=torch.bool)]}
    theirs = {r: [torch.empty_like(x) for x in mine[r]] for r in (0, 1)}
    th = threading.Thread(target=a.exchange, args=(mine[0], theirs[0]))
    th.start()
    b.exchange(mine[1], theirs[1])
    th.join(20)
    for r in (0, 1):
        for x, y in zip(theirs[r], mine[1 - r]):
            assert torch.equal(x, y)
    a.close(), b.close()


def test_exchange_socket_reports_a_stopped_or_silent_peer():
    import time

    import pytest
    import torch

    from mpc_lm.pair_socket import PairSocket

    store, t, got = _pair_sockets()
    b = PairSocket.connect(store, 1, "127.0.0.1", 0.5)
    t.join(20)
    a = got["a"]
    a.timeout_s = 0.5
    x = torch.arange(10)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer .* timeouts.op_s=0.5s"):
        a.exchange([x], [torch.empty_like(x)])  # b never sends
    assert time.monotonic() - started < 5
    b.close()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="closed the connection"):
        a.exchange([x], [torch.empty_like(x)])
    assert time.monotonic() - started < 0.5  # at once, not at the timeout
    a.close()
