"""The offline phase: the dealer's correlated randomness for a computation, before it runs.

Design and measurements: docs/performance.md. In short, a computation under
MPC is data-oblivious, so the sequence of triple/bit requests it makes depends
only on public shapes. :func:`run` therefore

1. records that sequence with a dry run (a communicator that sends nothing and
   a provider that answers every request with zeros), cached per ``key``;
2. has party 0 send the plan to the dealer in chunks and receive, per chunk,
   all its correction shares as one flat tensor (the other parties draw their
   shares from the seed they share with the dealer, as with CrypTen's TTP);
3. runs the computation for real, its requests answered from that queue.

The online phase then never waits on the dealer. The dealer sees only the
plan: function names and tensor sizes, the same public facts that on-demand
requests tell it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from contextlib import contextmanager

import torch
from pydantic import BaseModel

from . import opcount, prg, ring
from ._compat import import_crypten, plain_ring

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402
from crypten.communicator import DistributedCommunicator  # noqa: E402
from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor  # noqa: E402
from crypten.mpc.provider.ttp_provider import TTPClient, TrustedThirdParty  # noqa: E402

log = logging.getLogger(__name__)


class PlanMismatch(RuntimeError):
    """The online run asked for other randomness than its plan listed (a bug, never data)."""


# ---------------------------------------------------------------- shapes without arithmetic


def _result_size(op: str, size0, size1, *args, **kwargs) -> torch.Size:
    """Shape of ``torch.<op>(a, b)`` for tensors of these sizes, by shape inference only (remembered: every
    product asks, and a meta-tensor dry run costs ~20 us of dispatch; a generation step makes about a thousand)."""
    try:
        key = (op, tuple(size0), tuple(size1), args, tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:  # an unhashable argument: work it out
        return _infer_size(op, size0, size1, *args, **kwargs)
    size = _RESULT_SIZES.get(key)
    if size is None:
        size = _RESULT_SIZES[key] = _infer_size(op, size0, size1, *args, **kwargs)
    return size


_RESULT_SIZES: dict = {}


def _infer_size(op: str, size0, size1, *args, **kwargs) -> torch.Size:
    a = torch.empty(size0, device="meta")
    b = torch.empty(size1, device="meta")
    return getattr(torch, op)(a, b, *args, **kwargs).size()


def _broadcast_size(size0, size1) -> torch.Size:
    return torch.broadcast_shapes(torch.Size(size0), torch.Size(size1))


def _zeros(size, device) -> torch.Tensor:
    return torch.zeros(tuple(size), dtype=torch.long, device=device)


# ---------------------------------------------------------------- the provider


class PlannedDealer(TrustedThirdParty):
    """CrypTen's TTP provider with two more modes: ``record`` (dry run) and ``replay``.

    In ``pass`` mode it is CrypTen's TTP provider (one request/response per call).
    """

    NAME = "TTP"

    def __init__(self):
        super().__init__()
        self.mode = "pass"
        self.requests: list[tuple] = []
        self.result_sizes: list[torch.Size] = []
        self.queue: deque = deque()
        self.plan_device = None
        self.next_weight_id = 0
        self.opened: dict = {}  # weight id -> E = W - B (public to the computing parties; premask.mask_weights)
        self.mask_generators: dict = {}  # device type -> this party's stream for premasked products' masks
        self.products_ahead: deque = deque()  # replay: (a, a @ E) per premasked product, made offline
        # record: per request, the (size, draw) of what every party draws from its dealer stream and of
        # the dealt share (which party 1 draws too); replay: each request's draws, made offline (or empty)
        self.draw_specs: list = []
        self.planned_draws: list = []  # the last dry run's draw_specs
        self.drawn: deque = deque()

    # -- helpers
    def _record(self, function: str, device, result_size, *args, **kwargs) -> None:
        if device is not None and torch.device(device).type == "meta":
            device = self.plan_device  # planned on shape-only tensors: the real run's device
        self.requests.append((function, None if device is None else str(device), args, kwargs))
        self.result_sizes.append(torch.Size(result_size))

    def _take(self, function: str, size) -> torch.Tensor:
        if not self.queue:
            raise PlanMismatch(f"the online run asked the dealer for more than its offline plan ({function})")
        got = self.queue.popleft()
        if tuple(got.size()) != tuple(size):
            raise PlanMismatch(f"offline plan mismatch at {function}: planned {tuple(got.size())}, "
                               f"asked {tuple(size)}")
        return got

    def _shares(self, function, device, seeded, dealt, args=(), kwargs=None):
        """Plain shares: ``seeded`` [(size, draw)] every party draws from its dealer seed, then the
        ``dealt`` (size, draw) share, which party 0 instead takes from the plan's queue (replay)
        or asks the dealer's ``function(*args, **kwargs)`` for (pass)."""
        if self.mode == "record":
            self._record(function, device, dealt[0], *args, **(kwargs or {}))
            self.draw_specs.append((tuple(seeded), dealt))
            return [_zeros(size, device) for size, _ in seeded + [dealt]]
        size, draw = dealt
        rank0 = comm.get().get_rank() == 0
        if self.mode == "replay" and self.drawn:
            out = self.drawn.popleft()
            want = [tuple(sz) for sz, _ in seeded] + ([] if rank0 else [tuple(size)])
            if [tuple(t.size()) for t in out] != want:
                raise PlanMismatch(f"offline plan mismatch at {function}: drew {[tuple(t.size()) for t in out]} "
                                   f"ahead, asked {want}")
            out = list(out)
            if rank0:
                out.append(self._take(function, size))
            return out
        gen = TTPClient.get().get_generator(device=device)
        out = [draw(sz, gen, device) for sz, draw in seeded]
        if not rank0:
            out.append(draw(size, gen, device))
        elif self.mode == "replay":
            out.append(self._take(function, size))
        else:
            out.append(TTPClient.get().ttp_request(function, device, *args, **(kwargs or {})))
        return out

    # -- the five TTP functions
    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        if self.mode == "pass":
            return super().generate_additive_triple(size0, size1, op, device, *args, **kwargs)
        c_size = _result_size(op, size0, size1, *args, **kwargs)
        shares = self._shares("additive", device, [(size0, _ring), (size1, _ring)], (c_size, _ring),
                              (size0, size1, op, *args), kwargs)
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in shares)

    def square(self, size, device=None):
        if self.mode == "pass":
            return super().square(size, device)
        shares = self._shares("square", device, [(size, _ring)], (size, _ring), (size,))
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in shares)

    def generate_binary_triple(self, size0, size1, device=None):
        if self.mode == "pass":
            return super().generate_binary_triple(size0, size1, device)
        c_size = _broadcast_size(size0, size1)
        shares = self._shares("binary", device, [(size0, _bits), (size1, _bits)], (c_size, _bits), (size0, size1))
        return tuple(BinarySharedTensor.from_shares(t) for t in shares)

    def wrap_rng(self, size, device=None):
        if self.mode == "pass":
            return super().wrap_rng(size, device)
        shares = self._shares("wraps", device, [(size, _ring)], (size, _ring), (size,))
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in shares)

    # -- weights masked once (mpc_lm/premask.py)
    def weight_masks(self, sizes, device=None) -> list:
        """This party's shares of one fresh mask per weight size; party 0 has the dealer draw them too.

        Always a direct request (called at setup, outside any plan)."""
        if self.mode != "pass":
            raise PlanMismatch("weight masks are drawn at setup, not inside a planned computation")
        gen = TTPClient.get().get_generator(device=device)
        shares = [_ring(size, gen, device) for size in sizes]
        # then the seed of a separate stream for the premasked products' masks a, so that a party can
        # draw them, and form its a @ E, in the offline phase (the dealer draws the same seed)
        self.mask_generators[_device_type(device)] = _stream(_ring((2,), gen, device), device)
        if comm.get().get_rank() == 0:
            TTPClient.get().ttp_request("weight_masks", device, [tuple(s) for s in sizes])
        self.next_weight_id += len(sizes)
        return shares

    def _mask_stream(self, device):
        stream = self.mask_generators.get(_device_type(device))
        if stream is None:
            raise RuntimeError("a premasked product before its weights' masks were drawn (premask.mask_weights)")
        return stream

    def masked_triple(self, size_x, weight, device=None):
        """(a, c, a_e) with c = a @ B for the mask B of a :class:`mpc_lm.premask.MaskedWeight`: this party's
        shares of a (from the mask stream) and c, and its a @ E if made in the offline phase (else None)."""
        c_size = _result_size("matmul", size_x, tuple(weight.size()))
        args = (tuple(size_x), weight.wid, weight.transposed)
        if self.mode == "record":
            a, a_e = _zeros(size_x, device), None
        elif self.mode == "replay" and self.products_ahead:
            a, a_e = self.products_ahead.popleft()
            if tuple(a.size()) != tuple(size_x):
                raise PlanMismatch(f"offline plan mismatch at a premasked product: planned {tuple(a.size())}, "
                                   f"asked {tuple(size_x)}")
        else:
            a, a_e = _ring(size_x, self._mask_stream(device), device), None
        (c,) = self._shares("masked", device, [], (c_size, _ring), args)
        return ArithmeticSharedTensor.from_shares(a, precision=0), ArithmeticSharedTensor.from_shares(c, precision=0), a_e

    def comparison_key(self, n: int, lane_bits: int, device=None, form: str = "narrow"):
        """This party's shares of the masks r and of their comparison tables (mpc_lm/tables.py):
        every party draws its share of r, party 1 its table shares, from its dealer seed; the
        dealer deals party 0's table shares."""
        from . import tables

        words = tables.words_per_element(lane_bits, n, form)
        shares = self._shares("compare", device, [((n,), _ring)], ((n, words), _bits), (n, lane_bits, form))
        return tuple(plain_ring(t) for t in shares)

    def product_triples(self, size, m: int, pairs, device=None):
        """(a, c): masks a (m, *size) for m values opened once each, and c (len(pairs), *size) with
        c[p] = a[i] a[j] for the p-th pair (i, j) (approx.merged_round's ``products``). Every party
        draws its share of a from its dealer seed; the dealer deals party 0's share of c."""
        size = torch.Size(size)
        masks, products = torch.Size([m, *size]), torch.Size([len(pairs), *size])
        pairs = tuple((int(i), int(j)) for i, j in pairs)
        a, c = self._shares("products", device, [(masks, _ring)], (products, _ring), (size, m, pairs))
        return plain_ring(a), plain_ring(c)

    def _bits_and_masks(self, function: str, bit_size, mask_size, rows: int, device, size=None):
        """(r_bin, a, tail): random bits r (XOR shares) and ring masks a every party draws from its dealer
        seed, and the ``rows`` dealt correlations of the dealer's ``function(size)`` (party 0's shares dealt,
        party 1's drawn), shaped (rows, *size); ``size`` defaults to ``bit_size``."""
        size = torch.Size(bit_size if size is None else size)
        r_bin, a, tail = self._shares(function, device, [(torch.Size(bit_size), _bit), (torch.Size(mask_size), _ring)],
                                      (torch.Size([rows, *size]), _ring), (size,))
        return BinarySharedTensor.from_shares(r_bin), ArithmeticSharedTensor.from_shares(a, precision=0), tail

    def bit_triple(self, size, device=None):
        """(r_bin, r_arith, b, c): a random bit r as XOR and as arithmetic shares, a random ring tensor
        b and c = r b, for a bit times a value in one opening of the value (approx.merged_round).
        Every party draws r_bin and b from its dealer seed; the dealer deals party 0's shares of
        r_arith and c (stacked)."""
        r_bin, b, dealt = self._bits_and_masks("bit_triple", size, size, 2, device)
        r_arith, c = plain_ring(dealt).unbind(0)
        return (r_bin, ArithmeticSharedTensor.from_shares(r_arith, precision=0), b,
                ArithmeticSharedTensor.from_shares(c, precision=0))

    def bit_square(self, size, device=None):
        """(r_bin, a, tail): a random bit r as XOR shares, a random ring tensor a, and the arithmetic
        shares of (r, a^2, r a, r a^2) stacked, for a bit times a square in one opening of the value
        (approx.merged_round's ``bit_square``). Every party draws r_bin and a from its dealer seed;
        the dealer deals party 0's shares of the tail."""
        return self._bits_and_masks("bit_square", size, size, 4, device)

    def select4(self, size, device=None):
        """(r_bin, a, tail): random bits r (6, *size) for a group of four's pairwise bits, masks a (4, *size)
        of its values, and the arithmetic shares of approx.select4_correlations(r, a) (50, *size), for the
        winner's value in one opening (approx.merged_round's ``select4``). Every party draws r_bin and a
        from its dealer seed; the dealer deals party 0's shares of the tail."""
        return self._bits_and_masks("select4", (6, *size), (4, *size), 50, device, size)

    def select_fma(self, size, device=None):
        """(r_bin, a, tail): random bits r (2, *size) for a piece's two selection bits, masks a (4, *size) of
        (L, U, W, X), and the arithmetic shares of approx.select_fma_correlations(r, a) (7, *size), for
        m (L + U W) + h X in one opening (approx.merged_round's ``select_fma``). Every party draws r_bin and a
        from its dealer seed; the dealer deals party 0's shares of the tail."""
        return self._bits_and_masks("select_fma", (2, *size), (4, *size), 7, device, size)

    def B2A_rng(self, size, device=None):
        if self.mode == "pass":
            return super().B2A_rng(size, device)
        r_bin, r_arith = self._shares("B2A", device, [(size, _bit)], (size, _ring), (size,))
        return ArithmeticSharedTensor.from_shares(r_arith, precision=0), BinarySharedTensor.from_shares(r_bin)


def dealt_by(name: str) -> str | None:
    """Who makes the correlated randomness ``name`` in this process: "dealer" (the provider has it:
    the planned dealer, which the party runtime installs for every TTP run), "tfp" (CrypTen's insecure
    TFP provider: party 0 draws and secret-shares it), or None (neither)."""
    provider = crypten.mpc.get_default_provider()
    if hasattr(provider, name):
        return "dealer"
    from crypten.mpc.provider.tfp_provider import TrustedFirstParty

    return "tfp" if isinstance(provider, TrustedFirstParty) else None


def _device_type(device) -> str:
    return torch.device(device if device is not None else "cpu").type


def _stream(seed, device):
    """A stream on ``device``'s type seeded with the two ring elements ``seed`` (both sides draw them alike):
    AES-128-CTR, or a torch generator under ``security.prg: torch`` (mpc_lm/prg.py)."""
    return prg.stream_from(plain_ring(seed), device)


def products_ahead(provider: "PlannedDealer", requests: list) -> deque:
    """This party's mask share a of each premasked product of a plan, drawn in order from its mask stream,
    and its a @ E (E = W - B, public to the computing parties): the half of the product's local work that
    does not depend on the input, made in the offline phase."""
    out: deque = deque()
    for function, device, args, _ in requests:
        if function != "masked":
            continue
        size_x, wid, transposed = args
        a = _ring(torch.Size(size_x), provider._mask_stream(device), device)
        e = provider.opened[wid]
        out.append((a, ring.matmul(plain_ring(a), plain_ring(e.t() if transposed else e))))
    return out


def draws_ahead(requests: list, specs: list) -> deque:
    """Everything this party draws from its dealer stream for a plan's requests, in order, made in the
    offline phase: the masks every party draws (a Beaver triple's a and b, a table's r, ...) and, at the
    parties other than 0, their dealt shares (party 0 takes its own from the dealer). The online run then
    only reads them (docs/performance.md, lever 23); the draws are the same, in the same order."""
    rank0 = comm.get().get_rank() == 0
    out: deque = deque()
    for (_, device, _, _), (seeded, (size, draw)) in zip(requests, specs, strict=True):
        gen = TTPClient.get().get_generator(device=device)
        drawn = [d(sz, gen, device) for sz, d in seeded]
        if not rank0:
            drawn.append(draw(size, gen, device))
        out.append(tuple(drawn))
    return out


def _ring(size, gen, device):
    return prg.ring(size, gen, device)


def _bits(size, gen, device):
    return prg.kbit(size, generator=gen, device=device)


def _bit(size, gen, device):
    return prg.kbit(size, bitlength=1, generator=gen, device=device)


def install() -> PlannedDealer:
    """Make the planned dealer CrypTen's TTP provider in this process (idempotent)."""
    providers = vars(crypten.mpc)["__SUPPORTED_PROVIDERS"]
    current = providers["TTP"]
    if isinstance(current, PlannedDealer):
        return current
    planned = PlannedDealer()
    providers["TTP"] = planned
    return planned


# ---------------------------------------------------------------- the dry communicator


class _DryCommunicator:
    """Answers every collective with the local value and sends nothing (planning only)."""

    def __init__(self, real):
        self._real = real
        self.wrapped = real  # what crypten.communicator.get() checks for initialisation (TLS)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _nothing_to(self, what: str):
        raise RuntimeError(f"{what} inside an offline plan: the planned computation must only open values")

    def all_reduce(self, input, op=None, batched=False):
        return [x.clone() for x in input] if batched else input.clone()

    def reduce(self, input, dst, op=None, batched=False):
        return [x.clone() for x in input] if batched else input.clone()

    def broadcast(self, input, src, group=None, batched=False):
        return input

    def all_gather(self, tensor):
        return [tensor.clone() for _ in range(self._real.get_world_size())]

    def gather(self, tensor, dst):
        return [tensor.clone() for _ in range(self._real.get_world_size())] if dst == self._real.get_rank() else None

    def broadcast_obj(self, obj, src, group=None):
        return obj

    def barrier(self):
        return None

    def send(self, *a, **k):
        self._nothing_to("send")

    def recv(self, *a, **k):
        self._nothing_to("recv")

    def isend(self, *a, **k):
        self._nothing_to("isend")

    def irecv(self, *a, **k):
        self._nothing_to("irecv")

    def send_obj(self, *a, **k):
        self._nothing_to("send_obj")

    def recv_obj(self, *a, **k):
        self._nothing_to("recv_obj")


_PLANNING = {"on": False}


def planning() -> bool:
    """True inside an offline plan's dry run (shape-only tensors, nothing sent)."""
    return _PLANNING["on"]


@contextmanager
def _dry():
    """Planning context: nothing is sent, and shape-only ("meta") shares draw their (empty)
    randomness from throwaway generators, so the real generators are left untouched."""
    real = DistributedCommunicator.instance
    DistributedCommunicator.instance = _DryCommunicator(real)
    meta = torch.device("meta")
    for table in crypten.generators.values():
        table[meta] = torch.Generator()
    _PLANNING["on"] = True
    try:
        yield
    finally:
        _PLANNING["on"] = False
        DistributedCommunicator.instance = real
        for table in crypten.generators.values():
            table.pop(meta, None)


# ---------------------------------------------------------------- repeated segments of a plan


# During a dry run: a segment's signature -> (its requests, their result sizes, the premasked
# weights' ids it was given, its shape-only result); None outside a dry run.
_SEGMENTS: dict | None = None


def _signature(obj, wids: list):
    """What a segment's requests can depend on: the shapes and encodings of its secret inputs, the
    values of its public ones. Appends the ids of the premasked weights it meets to ``wids``, in a
    fixed order (two arguments with one signature list their weights in corresponding order)."""
    from crypten.mpc import MPCTensor

    from .premask import MaskedWeight

    if isinstance(obj, MPCTensor):
        return ("s", type(obj._tensor).__name__, tuple(obj.size()), obj.encoder.scale)
    if isinstance(obj, MaskedWeight):
        wids.append(obj.wid)
        return ("w", tuple(obj.size()), obj.transposed, obj.encoder.scale)
    if isinstance(obj, torch.Tensor):
        return ("t", tuple(obj.size()), obj.dtype)
    if isinstance(obj, dict):
        return ("d", tuple((k, _signature(obj[k], wids)) for k in sorted(obj)))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_signature(v, wids) for v in obj))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, BaseModel) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return repr(obj)  # a configuration (Approximations, an architecture): all public values
    raise TypeError(f"offline.segment cannot tell what its requests depend on from a {type(obj).__name__}")


def segment(name: str, fn, *args):
    """``fn(*args)``, where ``fn`` is a repeated part of a computation (one transformer layer).

    Outside an offline plan's dry run this is exactly ``fn(*args)``. Inside one, the first
    segment with a given ``name`` and argument signature runs (on shape-only tensors) and its
    requests are remembered; a later segment with the same signature does not run again: its
    requests are the remembered ones, each premasked weight's id replaced by the corresponding
    weight's id among this segment's arguments, and its result is a shape-only copy of the first
    one's. ``fn`` must read nothing secret but its arguments (a layer's weights are passed in, not
    looked up in the whole model), and must have no effect but its result.
    """
    if _SEGMENTS is None:  # online, and every mode but a dry run: nothing to look up
        return fn(*args)
    provider = install()
    if provider.mode != "record":
        return fn(*args)
    wids: list = []
    key = (name, _signature(args, wids))
    known = _SEGMENTS.get(key)
    if known is None:
        start = len(provider.requests)
        result = fn(*args)
        requests, sizes = provider.requests[start:], provider.result_sizes[start:]
        specs = provider.draw_specs[start:]
        for function, _, req_args, _ in requests:
            if function == "masked" and req_args[1] not in wids:
                raise RuntimeError(f"offline.segment {name!r} used a premasked weight that is not among its arguments")
        _SEGMENTS[key] = (requests, sizes, wids, result, specs)
        return result
    requests, sizes, first_wids, result, specs = known
    renamed = dict(zip(first_wids, wids))
    for function, device, req_args, kwargs in requests:
        if function == "masked":
            req_args = (req_args[0], renamed[req_args[1]], *req_args[2:])
        provider.requests.append((function, device, req_args, kwargs))
    provider.result_sizes.extend(sizes)
    provider.draw_specs.extend(specs)
    return _meta(result)


# ---------------------------------------------------------------- the phase


_PLANS: dict = {}


def _fetch(requests: list[tuple], sizes: list[torch.Size], chunk_bytes: int) -> tuple[deque, int]:
    """Party 0: the dealer's answers to ``requests``, chunk by chunk; returns (queue, chunks)."""
    c = comm.get()
    client = TTPClient.get()
    ttp = c.get_ttp_rank()
    queue: deque = deque()
    start, chunks = 0, 0
    while start < len(requests):
        device = requests[start][1]
        end, nbytes = start, 0
        while end < len(requests) and requests[end][1] == device and (end == start or nbytes < chunk_bytes):
            nbytes += math.prod(sizes[end]) * 8
            end += 1
        c.send_obj({"function": "plan", "device": device, "requests": requests[start:end]}, ttp, client.ttp_group)
        total = c.recv_obj(ttp, client.ttp_group)
        flat = torch.empty(total, dtype=torch.long, device=device)
        c.broadcast(flat, ttp, client.comm_group)
        offset = 0
        for size in sizes[start:end]:
            n = math.prod(size)
            queue.append(flat[offset : offset + n].view(size))
            offset += n
        if offset != total:
            raise PlanMismatch(f"the dealer returned {total} ring elements for a chunk that needs {offset}")
        start, chunks = end, chunks + 1
    return queue, chunks


def serve_plan(server, message: dict) -> int:
    """Dealer: answer one plan chunk with one flat tensor; returns the number of requests."""
    from .dealer import _FUNCTIONS

    for function, *_ in message["requests"]:  # the functions of a direct request, nothing else of the server
        if function not in _FUNCTIONS:
            raise RuntimeError(f"dealer received an unknown planned request {function!r}")
    c = comm.get()
    server.device = message["device"]
    parts = []
    for function, device, args, kwargs in message["requests"]:
        server.device = device
        parts.append(plain_ring(getattr(server, function)(*args, **kwargs)).reshape(-1))
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    c.send_obj(flat.numel(), 0, server.ttp_group)
    c.broadcast(flat, c.get_ttp_rank(), server.comm_group)
    return len(message["requests"])


def enabled(cfg) -> bool:
    return cfg.security.provider == "ttp" and cfg.preprocessing.mode == "offline"


def _device_of(obj):
    """The device of the first secret share in ``obj`` (None if it holds none)."""
    from crypten.mpc import MPCTensor

    if isinstance(obj, MPCTensor):
        return obj.device
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for v in items:
        d = _device_of(v)
        if d is not None:
            return d
    return None


def _meta(obj):
    """``obj`` with every secret share replaced by a data-less tensor of the same shape (device "meta")."""
    from crypten.mpc import MPCTensor

    if isinstance(obj, MPCTensor):
        out = obj.shallow_copy()
        out._tensor = obj._tensor.shallow_copy()
        out._tensor._tensor = torch.empty(obj._tensor.share.size(), dtype=torch.long, device="meta")
        return out
    if hasattr(obj, "to_meta"):  # premask.MaskedWeight
        return obj.to_meta()
    if isinstance(obj, dict):
        return {k: _meta(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_meta(v) for v in obj)
    return obj


def plan(fn, args, reuse_segments: bool = True) -> tuple[list, list]:
    """The dealer requests ``fn(*args)`` will make and their result sizes, by a dry run on shape-only
    copies of ``args`` (nothing computed, nothing sent); ``reuse_segments``: repeated segments
    (:func:`segment`) are planned once."""
    global _SEGMENTS
    provider = install()
    provider.mode, provider.requests, provider.result_sizes, provider.draw_specs = "record", [], [], []
    provider.plan_device = _device_of(args)
    _SEGMENTS = {} if reuse_segments else None
    try:
        with _dry():
            fn(*_meta(args))
        provider.planned_draws = provider.draw_specs  # what each request draws, for run() to keep with the plan
        return provider.requests, provider.result_sizes
    finally:
        provider.mode, _SEGMENTS = "pass", None
        provider.requests, provider.result_sizes, provider.draw_specs = [], [], []


def run(cfg, key, fn, *args):
    """``fn(*args)`` with its dealer randomness fetched beforehand; returns (result, offline stats).

    With the offline phase disabled (or the TFP provider), just ``fn(*args)``. ``key``
    names the computation's public shape; its plan is recorded once per process, by a
    dry run on ``args`` whose shares are replaced by shape-only ("meta") tensors: the
    plan needs the shapes of the requests, never their values, so planning does no
    arithmetic.
    """
    if not enabled(cfg):
        return fn(*args), None
    provider = install()
    started = time.perf_counter()
    planned = key in _PLANS
    if not planned:
        _PLANS[key] = (*plan(fn, args, cfg.preprocessing.reuse_segments), provider.planned_draws)
    requests, sizes, specs = _PLANS[key]
    plan_s = time.perf_counter() - started
    chunks = 0
    if comm.get().get_rank() == 0 and requests:
        provider.queue, chunks = _fetch(requests, sizes, int(cfg.preprocessing.chunk_mb * 2**20))
    if cfg.preprocessing.weight_products_ahead:
        provider.products_ahead = products_ahead(provider, requests)
    ahead = len(provider.products_ahead)
    if cfg.preprocessing.draws_ahead:
        provider.drawn = draws_ahead(requests, specs)
    drawn = len(provider.drawn)
    offline_s = time.perf_counter() - started
    provider.mode = "replay"
    try:
        with opcount.counting(comm.get().get_rank()):  # MPC_LM_OP_COUNT (off by default)
            result = fn(*args)
        if provider.queue or provider.products_ahead or provider.drawn:
            raise PlanMismatch(f"the online run left {len(provider.queue)} planned dealer answers, "
                               f"{len(provider.products_ahead)} premasked products and {len(provider.drawn)} "
                               "draws unused")
    finally:
        provider.mode, provider.queue, provider.products_ahead = "pass", deque(), deque()
        provider.drawn = deque()
    stats = {"offline_s": round(offline_s, 4), "plan_s": round(plan_s, 4), "plan_cached": planned,
             "requests": len(requests), "chunks": chunks, "products_ahead": ahead, "draws_ahead": drawn,
             "elements": int(sum(math.prod(s) for s in sizes))}
    return result, stats
