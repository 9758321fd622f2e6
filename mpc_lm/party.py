"""The body of one party process (``mpc-lm party CONFIG --name NAME``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from . import dealer, jobs, ring, transport
from .config import Role, load_config
from .errors import MpcLmError, PartyFailure
from .runtime import party_session

log = logging.getLogger("mpc_lm.party")

AUDIT_ENV = "MPC_LM_AUDIT_DIR"


def _setup_logging(name: str, level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr, force=True,
        format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s",
    )


def run_party(config_path: str, name: str, result_path: str | None = None, log_level: str = "info",
              job=None) -> int:
    """Run one party to the end; returns the process exit code (0 ok, 2 user error, 3 peer failure).

    ``job(ctx) -> dict`` replaces the job of ``job.kind`` for a computing party (the cost benchmarks
    at real shapes, e.g. :mod:`mpc_lm.bench_train`); the dealer serves randomness either way."""
    _setup_logging(name, log_level)
    started = time.perf_counter()
    audit_dir = os.environ.get(AUDIT_ENV)
    audit = transport.Audit() if audit_dir else None
    try:
        cfg = load_config(config_path)
        with party_session(cfg, name, audit=audit) as ctx:
            if ctx.role == Role.DEALER:
                summary = {"requests_served": dealer.serve()}
            else:
                summary = (job or jobs.job_for(cfg.job.kind))(ctx)
            summary.update(party=name, role=ctx.role.value, rank=ctx.rank, device=str(ctx.device),
                           torch_threads=torch.get_num_threads(), ring_products=ring.PRODUCTS["method"],
                           dealer_streams=_dealer_streams(cfg, ctx.role),
                           traffic_total=ctx.comm.traffic.snapshot())
            if audit is not None:
                _dump_audit(Path(audit_dir), name, audit)
    except MpcLmError as err:
        log.error("%s", err)
        print(f"mpc-lm party {name}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ConnectionError, TimeoutError) as err:  # the last two: the openings' socket (pair_socket)
        first = (str(err).splitlines() or [type(err).__name__])[0][:300]
        if _is_transport_error(err):  # gloo / TLS / the openings' socket: a peer vanished or stopped answering
            failure = PartyFailure(
                f"party {name!r} lost contact with another party (it crashed, was killed, or did not "
                f"answer within timeouts.op_s): {first}"
            )
        else:
            failure = PartyFailure(f"party {name!r} stopped on an internal error (traceback in its log): {first}")
        log.error("%s", failure, exc_info=True)
        print(f"mpc-lm party {name}: error: {failure}", file=sys.stderr)
        return 3
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    summary.update(_peak_memory())  # for `mpc-lm bench` (docs/bench.md)
    if result_path:
        Path(result_path).parent.mkdir(parents=True, exist_ok=True)
        Path(result_path).write_text(json.dumps(summary, indent=2))
    log.info("done in %.1fs", summary["wall_s"])
    return 0


_TRANSPORT_WORDS = ("gloo", "connection", "timed out", "timeout", "peer", "socket", "broken pipe", "closed",
                    "lost contact", "did not answer")


def _dealer_streams(cfg, role) -> str | None:
    """What this process's streams shared with the dealer are (mpc_lm/prg.py), read from the objects."""
    if cfg.dealer is None:
        return None
    if role == Role.DEALER:
        return dealer.STREAMS.get("kind")
    from crypten.mpc.provider.ttp_provider import TTPClient

    from . import prg

    return prg.describe(TTPClient.get().get_generator())


def _is_transport_error(err: Exception) -> bool:
    """A failure of the links between parties (as opposed to a bug in this party's own computation)."""
    text = str(err).lower()
    from .tls_transport import PeerLost

    return isinstance(err, (ConnectionError, TimeoutError, PeerLost)) or any(w in text for w in _TRANSPORT_WORDS)


def _peak_memory() -> dict:
    """This process's peak resident memory (Linux ru_maxrss is KiB) and peak CUDA allocation, MB."""
    import resource

    out = {"peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _dump_audit(directory: Path, name: str, audit: transport.Audit) -> None:
    """Test instrument: what this party received, and the tensors it held at the end of its job."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"received": audit.tensors, "objects": [repr(o)[:2000] for o in audit.objects],
                "held": audit.held}, directory / f"{name}.pt")
