"""One party = one OS process = one CrypTen rank.

:func:`party_session` is the whole lifecycle of a party process:

1. rendezvous on torch.distributed's ``TCPStore`` hosted by rank 0 at the
   config's address. Each party announces its name, config hash and code
   version; every party waits (``timeouts.startup_s``) until all have come and
   refuses to go on if any hash or version differs. A party that does not
   come is named in the error.
2. build the gloo process group on that store with ``timeouts.op_s`` as the
   bound on every communication step (or, with ``rendezvous.backend: tls``, the
   mutual-TLS mesh of :mod:`mpc_lm.tls_transport`, docs/transport.md), install it
   as CrypTen's communicator,
   and initialise CrypTen with the configured provider (TTP unless the
   insecure development mode is named).
3. yield a :class:`PartyContext` to the job; on exit, shut the process group
   down so the dealer stops.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from . import __version__, resources, transport
from ._compat import fix_party_settings, import_crypten
from .config import ConsortiumConfig, Party, Role, check_security
from .errors import MpcLmError, RendezvousError

crypten = import_crypten()
import torch.distributed as dist  # noqa: E402

log = logging.getLogger(__name__)

_POLL_S = 0.2


@dataclass
class PartyContext:
    """What a job running inside a party process may use."""

    config: ConsortiumConfig
    party: Party
    rank: int
    comm: transport.PartyCommunicator
    device: torch.device
    started: float = field(default_factory=time.perf_counter)

    @property
    def role(self) -> Role:
        return self.party.role

    def rank_of(self, name: str) -> int:
        return self.config.rank_of(name)

    @property
    def model_owner_rank(self) -> int:
        return self.config.rank_of(self.config.model_owner.name)


def code_version() -> str:
    return f"mpc_lm {__version__}; crypten {crypten.__version__}"


def _announce(store, rank: int, party: Party, digest: str) -> None:
    store.set(f"joined/{rank}", json.dumps({"name": party.name, "digest": digest, "version": code_version()}))


def _wait_for_all(store, cfg: ConsortiumConfig, total: int, deadline: float) -> dict[int, dict]:
    """Poll the store until every rank has announced itself, or name who is missing."""
    while True:
        for r in range(total):
            if store.check([f"failed/{r}"]):
                raise RendezvousError(
                    f"party {cfg.party_at(r).name!r} could not start: {store.get(f'failed/{r}').decode()}"
                )
        present = [r for r in range(total) if store.check([f"joined/{r}"])]
        if len(present) == total:
            return {r: json.loads(store.get(f"joined/{r}")) for r in range(total)}
        if time.monotonic() > deadline:
            missing = [cfg.party_at(r).name for r in range(total) if r not in present]
            raise RendezvousError(
                f"parties {missing} did not join the rendezvous at "
                f"{cfg.rendezvous.host}:{cfg.rendezvous.port} within "
                f"timeouts.startup_s={cfg.timeouts.startup_s:g}s. Start them with "
                f"'mpc-lm party CONFIG --name NAME' (same config file), or check that their "
                "host can reach this address."
            )
        time.sleep(_POLL_S)


def _check_agreement(cfg: ConsortiumConfig, joined: dict[int, dict], me: str, digest: str) -> None:
    for rank, info in sorted(joined.items()):
        expected = cfg.party_at(rank).name
        if info["name"] != expected:
            raise RendezvousError(
                f"rank {rank} should be party {expected!r} but {info['name']!r} joined there; "
                "all parties must use the same consortium config"
            )
        if info["digest"] != digest:
            raise RendezvousError(
                f"party {info['name']!r} joined with a different consortium config "
                f"(hash {info['digest'][:12]} vs {digest[:12]} at {me!r}); distribute one file to all parties"
            )
        if info["version"] != code_version():
            raise RendezvousError(
                f"party {info['name']!r} runs {info['version']!r} but {me!r} runs "
                f"{code_version()!r}; install the same mpc_lm and crypten versions everywhere"
            )


def _connect_store(cfg: ConsortiumConfig, rank: int, total: int):
    host, port = cfg.rendezvous.host, cfg.rendezvous.port
    try:
        return dist.TCPStore(
            host, port, world_size=total, is_master=(rank == 0),
            timeout=timedelta(seconds=cfg.timeouts.startup_s), wait_for_workers=False,
        )
    except (RuntimeError, OSError) as err:  # torch raises DistStoreError (a RuntimeError)
        host_party = cfg.party_at(0).name
        if rank == 0:
            raise RendezvousError(
                f"party {host_party!r} could not listen on {host}:{port} ({err}); pick a free "
                "rendezvous.port or stop the run that holds it"
            ) from None
        raise RendezvousError(
            f"could not reach the rendezvous at {host}:{port} hosted by party {host_party!r} "
            f"within timeouts.startup_s={cfg.timeouts.startup_s:g}s: {host_party!r} did not come "
            f"(start it with 'mpc-lm party CONFIG --name {host_party}') or the address is unreachable"
        ) from None


def _configure_crypten(cfg: ConsortiumConfig) -> None:
    check_security(cfg)  # defence in depth: never run TFP without the named mode
    crypten.cfg.mpc.provider = cfg.security.provider.upper()
    crypten.cfg.encoder.precision_bits = cfg.approx.precision_bits
    from . import ring  # exact ring products on float64 BLAS (CPU); the stock baseline keeps CrypTen's own

    if cfg.approx.mode == "crypten":
        ring.uninstall()
    else:
        ring.install()
        ring.choose(cfg.approx.ring_products)  # auto: timed here, at setup, not in a computation
    from . import approx  # comparison circuit for this process (docs/performance.md)

    approx.COMPARISON["method"] = "crypten" if cfg.approx.mode == "crypten" else cfg.approx.comparison
    approx.PRODUCTS["stock"] = cfg.approx.mode == "crypten"
    if cfg.security.provider == "ttp":  # CrypTen's TTP functions plus comparison tables and bit triples
        from . import offline, prg

        prg.MODE["prg"] = cfg.security.prg
        prg.install()  # the dealer streams' draws (AES-128-CTR by default; mpc_lm/prg.py)
        offline.install()
    fix_party_settings(crypten)  # this process's precision and provider, read once (mpc_lm/_compat.py)
    if cfg.security.provider == "tfp":
        log.warning(
            "INSECURE DEVELOPMENT MODE: provider TFP lets party %r reconstruct every secret. "
            "Never use this with real data.", cfg.party_at(0).name,
        )


@contextmanager
def party_session(cfg: ConsortiumConfig, name: str, audit: transport.Audit | None = None):
    """Run one party's lifecycle around the body of a ``with`` block."""
    party = cfg.party(name)
    rank = cfg.rank_of(name)
    total = cfg.world_size + (1 if cfg.dealer else 0)
    digest = cfg.digest()
    _configure_crypten(cfg)
    deadline = time.monotonic() + cfg.timeouts.startup_s
    store = _connect_store(cfg, rank, total)
    device = torch.device(party.device)
    try:
        resources.check_device(device, name)
    except MpcLmError as err:  # tell the others now rather than let them time out
        store.set(f"failed/{rank}", str(err))
        raise
    try:
        _announce(store, rank, party, digest)
        joined = _wait_for_all(store, cfg, total, deadline)
    except RuntimeError as err:  # the store's host went away while we waited
        raise RendezvousError(
            f"lost the rendezvous hosted by party {cfg.party_at(0).name!r} during start-up "
            f"(it stopped; see its log): {str(err).splitlines()[0][:200]}"
        ) from None
    _check_agreement(cfg, joined, name, digest)
    log.info("all %d parties joined; building the process group", total)

    if cfg.rendezvous.backend == "tls":  # mutual TLS between parties (docs/transport.md)
        from . import tls_transport

        comm = tls_transport.connect(cfg, name, dist.PrefixStore("tls", store), audit=audit)
    else:
        comm = transport.PartyCommunicator(
            store=dist.PrefixStore("pg", store), rank=rank, world_size=cfg.world_size,
            init_ttp=cfg.dealer is not None, timeout_s=cfg.timeouts.op_s, name=name, audit=audit,
            exchange=cfg.rendezvous.exchange_openings,
            pair_host=cfg.rendezvous.host if cfg.rendezvous.exchange_socket else None,
        )
    transport.install(comm)
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())
    ctx = PartyContext(config=cfg, party=party, rank=rank, comm=comm, device=device)
    clean = False
    try:
        if party.role != Role.DEALER:
            _init_crypten_party()
        yield ctx
        clean = True
    finally:
        _shutdown(store, clean)


def _init_crypten_party() -> None:
    """The part of ``crypten.init`` after the communicator (which is ours)."""
    crypten._setup_prng()
    if crypten.mpc.ttp_required():
        comm = transport.current()
        if comm.get_distributed_backend() == "tls":  # the dealer's seed over TLS, not gloo
            from .tls_transport import init_ttp_client

            init_ttp_client(comm)
        else:
            from .dealer import init_client

            init_client()


def _shutdown(store, clean: bool) -> None:
    """Tear down. Only a clean exit tells the dealer to stop; after a failure the
    process group is dropped, so peers (the dealer too) see the loss and fail."""
    inst = transport.DistributedCommunicator.instance
    if isinstance(inst, transport.PartyCommunicator) and inst.distributed_backend == "tls":
        from .tls_transport import shutdown

        shutdown(inst, clean)  # goodbye, or the error in flight, to every peer
        return
    if not dist.is_initialized():
        return
    try:
        if clean:
            crypten.uninit()
        else:
            dist.destroy_process_group()
    except Exception as err:  # a peer already gone: nothing left to tell it
        log.debug("shutdown: %s", err)
    del store
