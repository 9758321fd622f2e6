"""The dealer: a separate process that streams correlated randomness (TTP).

The dealer shares one PRNG seed with each computing party. For a Beaver triple
every party draws its shares of ``a`` and ``b`` (and all but party 0 their
share of ``c``) from that seed locally; the dealer, which can replay all
seeds, computes ``c = a * b`` and sends party 0 the one share that makes the
sum right. The dealer learns nothing about inputs: it never receives a share
of any data, only requests naming a function and tensor sizes (public).

CrypTen's ``TTPServer`` runs its loop inside ``__init__`` and swallows a
``RuntimeError`` from a vanished party, returning as if all went well. This
loop reuses its generators and functions but lets failures surface, so the
dealer exits non-zero when a party crashes.
"""

from __future__ import annotations

import functools
import logging
import operator

import torch
import torch.distributed as dist

from . import approx, offline, prg, ring
from ._compat import import_crypten, plain_ring

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402
from crypten.mpc.provider.ttp_provider import TTPServer  # noqa: E402

log = logging.getLogger(__name__)

_FUNCTIONS = {"additive", "square", "binary", "wraps", "B2A", "weight_masks", "masked", "compare", "bit_triple", "bit_square", "select4", "select_fma", "products"}


class Dealer(TTPServer):
    """CrypTen's TTP functions plus the weight masks of mpc_lm/premask.py, the comparison
    tables of mpc_lm/tables.py, bit triples and multi-product triples (mpc_lm/approx.py, merged rounds).

    ``weight_masks`` draws every party's share of one mask per weight (replaying their
    seeds, in the order the parties draw them) and keeps the masks; ``masked`` deals
    ``a`` and party 0's share of ``c = a @ B`` for a kept mask ``B``. The dealer never
    sees the opened ``W - B``.
    """

    masks: list
    mask_streams: dict  # device type -> per party, the stream of its premasked products' masks a

    def _setup_generators(self):
        """A fresh seed per party from the operating system, sent to that party alone over the dealer's gloo
        group, and that party's streams from it (mpc_lm/prg.py: AES-128-CTR, or CrypTen's generators)."""
        ws = comm.get().get_world_size()
        seeds = [prg.new_seed() for _ in range(ws)]
        sent = [dist.isend(tensor=seeds[i], dst=i, group=self.ttp_group) for i in range(ws)]
        self.generators, self.generators_cuda = map(list, zip(*(prg.generators(s) for s in seeds)))
        for request in sent:
            request.wait()
        dist.barrier(group=self.ttp_group)

    def weight_masks(self, sizes):
        self.masks.extend(self._get_additive_PRSS(torch.Size(size)) for size in sizes)
        # each party then seeds its mask stream from its dealer seed (offline.PlannedDealer.weight_masks)
        gens = self._get_generators(device=self.device)
        self.mask_streams[offline._device_type(self.device)] = [
            offline._stream(offline._ring((2,), g, g.device), g.device) for g in gens]
        return torch.tensor([len(self.masks)], dtype=torch.long, device=self.device)

    def masked(self, size_x, wid, transposed):
        if wid >= len(self.masks):
            raise RuntimeError(f"dealer asked for weight mask {wid} but holds {len(self.masks)}")
        # every party's share of a, from its mask stream (CrypTen's _get_additive_PRSS, on those streams)
        streams = self.mask_streams[offline._device_type(self.device)]
        a = functools.reduce(operator.add, (offline._ring(torch.Size(size_x), g, g.device) for g in streams))
        b = self.masks[wid].t() if transposed else self.masks[wid]
        c = ring.matmul(a, b)
        return c - self._get_additive_PRSS(c.size(), remove_rank=True)

    def wraps(self, size):
        """Party 0's share of the wraps of r (CrypTen's truncation with more than two computing parties):
        every party's share of r drawn from its stream on the request's device, as the parties draw it.
        (CrypTen's own draws r on the CPU streams whatever the device, so a GPU run would fail or be wrong.)"""
        from crypten.common.util import count_wraps
        from crypten.mpc.provider import ttp_provider

        size = torch.Size(size)
        r = [plain_ring(ttp_provider.generate_random_ring_element(size, generator=g, device=g.device))
             for g in self._get_generators(device=self.device)]
        return count_wraps(r) - plain_ring(self._get_additive_PRSS(size, remove_rank=True))

    def _deal(self, values):
        """Party 0's shares of ``values``: the values minus every other party's seeded share."""
        return values - plain_ring(self._get_additive_PRSS(values.size(), remove_rank=True))

    def _deal_bits_and_masks(self, bit_size, mask_size, correlations):
        """Random bits r and ring masks a drawn from every party's seed (in that order), and party 0's
        shares of correlations(r, a)."""
        r = plain_ring(self._get_binary_PRSS(torch.Size(bit_size), bitlength=1))
        a = plain_ring(self._get_additive_PRSS(torch.Size(mask_size)))
        return self._deal(correlations(r, a))

    def products(self, size, m, pairs):
        """Party 0's shares of a_i a_j for each pair (i, j) of m fresh masks a (approx.merged_round)."""
        a = plain_ring(self._get_additive_PRSS(torch.Size([m, *size])))
        return self._deal(approx.product_correlations(a, pairs))

    def bit_triple(self, size):
        """Party 0's shares of (r, r b) for a random bit r and a random ring tensor b (both drawn from
        every party's seed): a bit times a value (mpc_lm/approx.py, merged rounds)."""
        return self._deal_bits_and_masks(size, size, approx.bit_correlations)

    def bit_square(self, size):
        """Party 0's shares of (r, a^2, r a, r a^2) for a random bit r and a random ring tensor a (both
        drawn from every party's seed): a bit times a square (mpc_lm/approx.py, merged rounds)."""
        return self._deal_bits_and_masks(size, size, approx.bit_square_correlations)

    def select4(self, size):
        """Party 0's shares of approx.select4_correlations(r, a) for random pair bits r (6, *size) and masks
        a (4, *size) (both drawn from every party's seed): a group of four's winner in one opening."""
        return self._deal_bits_and_masks((6, *size), (4, *size), approx.select4_correlations)

    def select_fma(self, size):
        """Party 0's shares of approx.select_fma_correlations(r, a) for random bits r (2, *size) and masks
        a (4, *size) (both drawn from every party's seed): a piece's selection folded into its last product."""
        return self._deal_bits_and_masks((2, *size), (4, *size), approx.select_fma_correlations)

    def compare(self, n, lane_bits, form="narrow"):
        """Party 0's shares of the comparison tables of fresh masks r (mpc_lm/tables.py)."""
        from . import tables

        r = self._get_additive_PRSS(torch.Size([n]))
        table = tables.build(plain_ring(r), lane_bits, form)
        return table ^ plain_ring(self._get_binary_PRSS(table.size(), remove_rank=True))


#: What the dealer's streams are (mpc_lm/prg.py), for its report.
STREAMS: dict = {}


def install_client(ttp_group, comm_group, seed: torch.Tensor) -> None:
    """CrypTen's ``TTPClient`` singleton for a computing party, its streams made from the ``seed`` the dealer
    sent it (mpc_lm/prg.py), whichever transport carried the seed."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    client = object.__new__(TTPClient._TTPClient__TTPClient)  # the private singleton class
    client.ttp_group, client.comm_group = ttp_group, comm_group
    client.generator, client.generator_cuda = prg.generators(seed)
    TTPClient._TTPClient__instance = client


def init_client() -> None:
    """A computing party's half of the seed exchange over gloo (CrypTen's ``TTPClient._init``): its seed
    from the dealer, its streams from it."""
    c = comm.get()
    seed = torch.empty(prg.seed_size(), dtype=torch.long)
    dist.irecv(tensor=seed, src=c.get_ttp_rank(), group=c.ttp_group).wait()
    dist.barrier(group=c.ttp_group)
    install_client(c.ttp_group, c.ttp_comm_group, seed)


def serve() -> int:
    """Answer requests until party 0 says ``terminate``; return the number served."""
    server = object.__new__(Dealer)
    server.masks = []
    server.mask_streams = {}
    server.ttp_group = comm.get().ttp_group
    server.comm_group = comm.get().ttp_comm_group
    server.device = "cpu"
    if comm.get().get_distributed_backend() == "tls":  # seeds over mutual TLS (docs/transport.md)
        from .tls_transport import setup_dealer_generators

        setup_dealer_generators(server, comm.get())
    else:
        server._setup_generators()
    STREAMS["kind"] = prg.describe(server.generators[0])
    ttp_rank = comm.get().get_ttp_rank()
    served = 0
    while True:
        message = comm.get().recv_obj(0, server.ttp_group)
        if message == "terminate":
            log.info("dealer done after %d requests", served)
            audit = getattr(comm.get(), "audit", None)
            if audit is not None:  # test instrument (docs/security.md): the kept weight masks are live here
                audit.snapshot_held()
            return served
        function = message["function"]
        if function == "plan":  # an offline-phase chunk (mpc_lm/offline.py): one flat answer
            served += offline.serve_plan(server, message)
            continue
        if function not in _FUNCTIONS:
            raise RuntimeError(f"dealer received an unknown request {function!r}")
        server.device = message["device"]
        result = getattr(server, function)(*message["args"], **message["kwargs"])
        comm.get().send_obj(result.size(), 0, server.ttp_group)
        comm.get().broadcast(result, ttp_rank, server.comm_group)
        served += 1
