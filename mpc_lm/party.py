"""The body of one party process (``mpc-lm party CONFIG --name NAME``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from . import dealer, jobs, transport
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


def run_party(config_path: str, name: str, result_path: str | None = None, log_level: str = "info") -> int:
    """Run one party to the end; returns the process exit code (0 ok, 2 user error, 3 peer failure)."""
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
                summary = jobs.job_for(cfg.job.kind)(ctx)
            summary.update(party=name, role=ctx.role.value, rank=ctx.rank, device=str(ctx.device),
                           traffic_total=ctx.comm.traffic.snapshot())
            if audit is not None:
                _dump_audit(Path(audit_dir), name, audit)
    except MpcLmError as err:
        log.error("%s", err)
        print(f"mpc-lm party {name}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # gloo: a peer vanished or stopped answering
        failure = PartyFailure(
            f"party {name!r} lost contact with another party (it crashed, was killed, or did not "
            f"answer within timeouts.op_s): {str(err).splitlines()[0][:300]}"
        )
        log.error("%s", failure)
        print(f"mpc-lm party {name}: error: {failure}", file=sys.stderr)
        return 3
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    summary.update(_peak_memory())  # for `mpc-lm bench` (docs/bench.md)
    if result_path:
        Path(result_path).parent.mkdir(parents=True, exist_ok=True)
        Path(result_path).write_text(json.dumps(summary, indent=2))
    log.info("done in %.1fs", summary["wall_s"])
    return 0


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
