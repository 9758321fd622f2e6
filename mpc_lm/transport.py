"""CrypTen's communicator, with timeouts, traffic accounting and an audit hook.

:class:`PartyCommunicator` replaces CrypTen's ``DistributedCommunicator``
instance. It differs in three ways:

* the process group is built on a store that :mod:`mpc_lm.runtime` already
  rendezvoused on, with a bounded ``timeout`` for every collective (CrypTen
  passes none: a dead peer would hang the others for 30 minutes);
* every call is counted: bytes sent and received and rounds, split into the
  *online* channel (computing parties among themselves) and the *dealer*
  channel (correlated randomness from the TTP);
* with an :class:`Audit`, every tensor the party receives is recorded so a
  test can check that it looks uniformly random on the ring (see
  docs/security.md).

Counting model (per party; gloo's real algorithms may route differently):
send/recv count the tensor once; ``broadcast`` from src counts ``(n-1)``
copies sent, a receiver one copy received; ``all_reduce`` counts
``2(n-1)/n`` of the tensor each way (ring); ``reduce``/``gather`` count one
copy sent by each non-destination and ``n-1`` received by the destination.
A *round* is one blocking call that waits on a peer; calls batched into one
(``batched=True``) are one round.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ._compat import import_crypten, plain_rings, wrap_rings

import_crypten()
from crypten.communicator import DistributedCommunicator  # noqa: E402

ONLINE, DEALER = "online", "dealer"

#: Two parties' openings up to this size (all tensors of one call) are a pairwise exchange, each party's
#: tensors sent to the other in one message while it receives theirs: 0.2 ms against gloo's all-reduce
#: 0.4 ms for small tensors on loopback (2-core machine B); from about 1 MiB gloo's reduce-scatter and
#: all-gather are as fast or faster (docs/performance.md, lever 21).
EXCHANGE_MAX_BYTES = 1 << 20
#: Over the parties' own socket (:mod:`mpc_lm.pair_socket`) every opening is an exchange: with the sum made
#: in the receive buffer it is about 2x faster than gloo's all-reduce at 1-16 MiB too (lever 29).
SOCKET_EXCHANGE_MAX_BYTES = 1 << 62


@dataclass
class ChannelStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0

    def as_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "rounds": self.rounds}


@dataclass
class TrafficStats:
    channels: dict[str, ChannelStats] = field(
        default_factory=lambda: {ONLINE: ChannelStats(), DEALER: ChannelStats()}
    )

    def add(self, channel: str, sent: float = 0, received: float = 0, rounds: int = 1) -> None:
        c = self.channels[channel]
        c.bytes_sent += int(sent)
        c.bytes_received += int(received)
        c.rounds += rounds

    def snapshot(self) -> dict:
        return {name: c.as_dict() for name, c in self.channels.items()}

    @staticmethod
    def diff(after: dict, before: dict) -> dict:
        return {
            ch: {k: after[ch][k] - before[ch][k] for k in after[ch]} for ch in after
        }


class Audit:
    """Records what a party receives, for the security tests (docs/security.md)."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.tensors: list[torch.Tensor] = []
        self.objects: list[object] = []
        self.held: list[torch.Tensor] = []
        self._budget = max_bytes

    def tensor(self, t: torch.Tensor, op: str) -> None:
        nbytes = t.numel() * _element_size(t)
        if nbytes <= self._budget:
            self._budget -= nbytes
            self.tensors.append(t.detach().to("cpu").clone())

    def obj(self, o: object, op: str) -> None:
        self.objects.append(o)

    def snapshot_held(self) -> None:
        """Copy every tensor alive in this process (called while a job's state is live)."""
        import gc

        self.held = [
            obj.detach().to("cpu").clone()
            for obj in gc.get_objects()
            if torch.is_tensor(obj) and not obj.is_meta and obj.numel() <= 4_000_000
        ]  # meta tensors (the offline plan's shape-only copies) hold no data


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * _element_size(t)


def _element_size(t) -> int:
    """Bytes per element; CrypTen's CUDALongTensor (a ring tensor on the GPU) has no element_size."""
    return t.element_size() if hasattr(t, "element_size") else 8


class PartyCommunicator(DistributedCommunicator):
    """A CrypTen communicator built on an already-rendezvoused store."""

    def __init__(self, *, store, rank: int, world_size: int, init_ttp: bool,
                 timeout_s: float, name: str, audit: Audit | None = None, exchange: bool = True,
                 pair_host: str | None = None):
        # Deliberately not calling DistributedCommunicator.__init__: it builds the
        # process group from environment variables with no timeout.
        self._init_state(rank=rank, world_size=world_size, name=name, audit=audit, backend="gloo")
        total = world_size + 1 if init_ttp else world_size
        timeout = timedelta(seconds=timeout_s)
        self._op_timeout = timeout
        self._exchange = exchange
        dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=total, timeout=timeout)
        self.ttp_group = dist.new_group(list(range(total)), timeout=timeout)
        if total > 1:
            self.ttp_comm_group = dist.new_group([0, total - 1], timeout=timeout)
        self.main_group = dist.new_group(list(range(world_size)), timeout=timeout)
        self.ttp_initialized = init_ttp
        self._pair = None  # the exchange's own socket (mpc_lm/pair_socket.py), when asked for
        self._exchange_max = EXCHANGE_MAX_BYTES  # lifted with the own socket; benchmarks/openings_bench.py too
        if exchange and pair_host is not None and world_size == 2 and rank in (0, 1):
            from .pair_socket import PairSocket

            self._pair = PairSocket.connect(store, rank, pair_host, timeout_s)
            self._exchange_max = SOCKET_EXCHANGE_MAX_BYTES

    def _init_state(self, *, rank: int, world_size: int, name: str, audit, backend: str) -> None:
        """Identity, counters and audit: what every transport's communicator holds."""
        self.world_size = world_size
        self.rank = rank
        self.distributed_backend = backend
        self.rendezvous = "store"
        self._name = name
        self.reset_communication_stats()
        self.traffic = TrafficStats()
        self.audit = audit

    # ---- accounting helpers -------------------------------------------
    def _channel(self, group) -> str:
        return ONLINE if group is None or group is self.main_group else DEALER

    def _received(self, value, op: str) -> None:
        if self.audit is None:
            return
        if isinstance(value, (list, tuple)):
            for v in value:
                self._received(v, op)
        elif torch.is_tensor(value):
            self.audit.tensor(value, op)
        else:
            self.audit.obj(value, op)

    # ---- point to point ----------------------------------------------------
    def send(self, tensor, dst):
        self.traffic.add(ONLINE, sent=_nbytes(tensor))
        return super().send(tensor, dst)

    def recv(self, tensor, src=None):
        result = super().recv(tensor, src)
        self.traffic.add(ONLINE, received=_nbytes(result))
        self._received(result, "recv")
        return result

    def isend(self, tensor, dst):
        self.traffic.add(ONLINE, sent=_nbytes(tensor), rounds=0)
        return super().isend(tensor, dst)

    def irecv(self, tensor, src=None):
        # The paired isend counts nothing; the round is counted here. The audit
        # sees irecv buffers after the caller waits: CrypTen uses irecv only for
        # the pairwise PRNG seeds, which are random by construction.
        self.traffic.add(ONLINE, received=_nbytes(tensor))
        return super().irecv(tensor, src)

    # ---- collectives -------------------------------------------------------
    def _group_size(self, group) -> int:
        return dist.get_world_size(group or self.main_group)

    def broadcast(self, input, src, group=None, batched=False):
        n = self._group_size(group)
        size = _nbytes(input)
        channel = self._channel(group)
        if src == self.get_rank():
            self.traffic.add(channel, sent=size * (n - 1))
        else:
            self.traffic.add(channel, received=size)
        result = super().broadcast(input, src, group=group, batched=batched)
        if src != self.get_rank():
            self._received(result, "broadcast")
        return result

    def all_reduce(self, input, op=dist.ReduceOp.SUM, batched=False):
        n = self.world_size
        size = _nbytes(input) * 2 * (n - 1) / n
        self.traffic.add(ONLINE, sent=size, received=size)
        # CrypTen's own GPU shares (CUDALongTensor: its openings, its Beaver products) travel as plain tensors
        items, wrapped = plain_rings(list(input) if batched else [input])
        if self._exchanges(items, op):
            result = wrap_rings(self._exchange_reduce(items, op), wrapped)
            result = result if batched else result[0]
        else:
            result = super().all_reduce(input, op=op, batched=batched)
        self._received(result, "all_reduce")
        return result

    def _exchanges(self, items, op) -> bool:
        """Whether an ``all_reduce`` of ``items`` is made as a pairwise exchange: CPU tensors of at most
        :data:`EXCHANGE_MAX_BYTES` over gloo; tensors of any size, on any device, over the parties' own socket."""
        return (self.distributed_backend == "gloo" and self._exchange
                and self.world_size == 2 and self.rank in (0, 1)
                and op in (dist.ReduceOp.SUM, dist.ReduceOp.BXOR)
                and all(torch.is_tensor(t) and (t.device.type == "cpu" or self._pair is not None) for t in items)
                and sum(_nbytes(t) for t in items) <= self._exchange_max)

    def _exchange_reduce(self, items, op) -> list:
        """Two parties: each sends its tensors to the other and adds (or XORs) what it receives. One
        message each way, both in flight at once: half of gloo's all-reduce latency for small tensors."""
        mine = [t.contiguous() for t in items]
        # The socket reads and writes host memory: a GPU tensor is copied out and the other party's back in
        # (gloo's all-reduce of a CUDA tensor stages it through the host too). On the CPU these are no-ops.
        host = [t.cpu() for t in mine]
        theirs = [torch.empty_like(t) for t in host]
        if self._pair is not None:
            self._pair.exchange(host, theirs)
        else:
            self._gloo_exchange(host, theirs)
        theirs = [b.to(a.device) for a, b in zip(mine, theirs)]
        # in place: ``theirs`` is this call's own fresh buffer (no second allocation of the result)
        if op == dist.ReduceOp.SUM:
            return [b.add_(a) for a, b in zip(mine, theirs)]
        return [b.bitwise_xor_(a) for a, b in zip(mine, theirs)]

    def _gloo_exchange(self, mine, theirs) -> None:
        other = 1 - self.rank
        works = [dist.isend(t, other, group=self.main_group) for t in mine]
        works += [dist.irecv(t, other, group=self.main_group) for t in theirs]
        for w in works:
            w.wait(self._op_timeout)

    def reduce(self, input, dst, op=dist.ReduceOp.SUM, batched=False):
        size = _nbytes(input)
        if dst == self.get_rank():
            self.traffic.add(ONLINE, received=size * (self.world_size - 1))
        else:
            self.traffic.add(ONLINE, sent=size)
        result = super().reduce(input, dst, op=op, batched=batched)
        if dst == self.get_rank():
            self._received(result, "reduce")
        return result

    def gather(self, tensor, dst):
        size = _nbytes(tensor)
        if dst == self.get_rank():
            self.traffic.add(ONLINE, received=size * (self.world_size - 1))
        else:
            self.traffic.add(ONLINE, sent=size)
        result = super().gather(tensor, dst)
        if dst == self.get_rank():
            self._received([t for i, t in enumerate(result) if i != dst], "gather")
        return result

    def all_gather(self, tensor):
        size = _nbytes(tensor) * (self.world_size - 1)
        self.traffic.add(ONLINE, sent=size, received=size)
        result = super().all_gather(tensor)
        self._received([t for i, t in enumerate(result) if i != self.get_rank()], "all_gather")
        return result

    def scatter(self, scatter_list, src, size=None, device=None):
        result = super().scatter(scatter_list, src, size=size, device=device)
        if src == self.get_rank():
            self.traffic.add(ONLINE, sent=sum(_nbytes(t) for i, t in enumerate(scatter_list) if i != src))
        else:
            self.traffic.add(ONLINE, received=_nbytes(result))
            self._received(result, "scatter")
        return result

    def barrier(self):
        self.traffic.add(ONLINE, rounds=1)
        return super().barrier()

    # ---- python objects ----------------------------------------------------
    def send_obj(self, obj, dst, group=None):
        self.traffic.add(self._channel(group), sent=len(pickle.dumps(obj)) + 4)
        return super().send_obj(obj, dst, group=group)

    def recv_obj(self, src, group=None):
        obj = super().recv_obj(src, group=group)
        self.traffic.add(self._channel(group), received=len(pickle.dumps(obj)) + 4)
        self._received(obj, "recv_obj")
        return obj

    def broadcast_obj(self, obj, src, group=None):
        result = super().broadcast_obj(obj, src, group=group)
        n = self._group_size(group)
        size = len(pickle.dumps(result)) + 4
        if src == self.get_rank():
            self.traffic.add(self._channel(group), sent=size * (n - 1))
        else:
            self.traffic.add(self._channel(group), received=size)
            self._received(result, "broadcast_obj")
        return result


def install(communicator: PartyCommunicator) -> None:
    """Make ``crypten.communicator.get()`` return ``communicator``."""
    DistributedCommunicator.instance = communicator


def current() -> PartyCommunicator:
    inst = DistributedCommunicator.instance
    if not isinstance(inst, PartyCommunicator):
        raise RuntimeError("mpc_lm party runtime is not initialised (use mpc_lm.runtime)")
    return inst


def object_size(obj) -> int:
    return sys.getsizeof(pickle.dumps(obj))
