"""Per-party training checkpoints: each party writes only its own shares.

Layout (one directory per party; in a real deployment each on its own disk)::

    CHECKPOINT_DIR/PARTY/step-00000004/state.pt   # int64 shares: trainable params, optimizer state
    CHECKPOINT_DIR/PARTY/step-00000004/meta.json  # run id, step, party, rank, precision, names

``meta.json`` is written last (write to a temporary name, then rename): a
directory without it is an interrupted write and is ignored. A share alone is
uniformly random and reveals nothing; the two parties' files together are the
weights. On resume, :func:`choose` picks the newest step that *every*
computing party has complete, and refuses checkpoints of a different run (run
id: a hash of everything that defines the computation) or sets with no common
step, naming each party's steps.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ._compat import import_crypten
from .errors import MpcLmError

crypten = import_crypten()
FORMAT = 1


class CheckpointError(MpcLmError):
    """Checkpoints that cannot be resumed from (other run, no common step, damaged)."""


def run_id(cfg) -> str:
    """Hash of what determines the weights: model, job, approximations, parties and their data.

    Excluded: where and how often to checkpoint, whether to resume, evaluation
    cadence, who sees metrics, output paths, timeouts, ports, security and
    run directories (so a resumed launch may change those).
    """
    full = cfg.model_dump(mode="json")
    train = dict(full["job"].get("train") or {})
    for key in ("checkpoint_every", "checkpoint_dir", "resume", "eval_every", "reveal_metrics_to", "output_dir"):
        train.pop(key, None)
    data = {"model": full["model"], "job": {**full["job"], "train": train}, "approx": full["approx"],
            "parties": [[p["name"], p["role"], p.get("train_data"), p.get("eval_data")] for p in full["parties"]]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def party_dir(root: Path, party: str) -> Path:
    return Path(root) / party


def list_complete(root: Path, party: str) -> list[dict]:
    """Meta of this party's complete checkpoints, oldest first."""
    found = []
    base = party_dir(root, party)
    if not base.is_dir():
        return found
    for d in sorted(base.glob("step-*")):
        meta = d / "meta.json"
        if meta.is_file() and (d / "state.pt").is_file():
            try:
                info = json.loads(meta.read_text())
            except json.JSONDecodeError:
                continue
            info["dir"] = str(d)
            found.append(info)
    return found


def save(root: Path, party: str, rank: int, step: int, rid: str, params: dict, opt_state: dict,
         opt_t: int, extra: dict | None = None) -> Path:
    d = party_dir(root, party) / f"step-{step:08d}"
    d.mkdir(parents=True, exist_ok=True)
    meta_path = d / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # a re-run step: mark incomplete before rewriting the shares
    first = next(iter(params.values()))
    state = {
        "params": {n: t._tensor.share.cpu().clone() for n, t in params.items()},
        "opt": {n: t._tensor.share.cpu().clone() for n, t in opt_state.items()},
        "precision": first.encoder._precision_bits,
    }
    torch.save(state, d / "state.pt")
    meta = {"format": FORMAT, "run_id": rid, "step": step, "party": party, "rank": rank,
            "world_size": crypten.communicator.get().get_world_size(), "opt_t": opt_t,
            "params": sorted(params), "opt": sorted(opt_state), **(extra or {})}
    tmp = d / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return d


def choose(listings: dict[str, list[dict]], rid: str, root: Path) -> int | None:
    """The step to resume from (None: start fresh), or CheckpointError. Same answer on every party."""
    if not any(listings.values()):
        return None
    for party, infos in listings.items():
        other = sorted({i["run_id"] for i in infos if i["run_id"] != rid})
        if other:
            bad = next(i for i in infos if i["run_id"] != rid)
            raise CheckpointError(
                f"checkpoint {bad['dir']} of party {party!r} belongs to run {other[0]!r}, but this "
                f"config defines run {rid!r} (model, data, job or approximations differ). Resume "
                f"with the config that wrote it, or move {root} aside / set job.train.checkpoint_dir "
                "to start a new run"
            )
        wrong = [i for i in infos if i.get("party") != party or i.get("format") != FORMAT]
        if wrong:
            raise CheckpointError(f"checkpoint {wrong[0]['dir']} does not belong to party {party!r} "
                                  f"(it names {wrong[0].get('party')!r}, format {wrong[0].get('format')})")
    steps = {party: sorted(i["step"] for i in infos) for party, infos in listings.items()}
    common = set.intersection(*(set(s) for s in steps.values()))
    if not common:
        shown = ", ".join(f"{p!r} has steps {s or 'none'}" for p, s in steps.items())
        raise CheckpointError(
            f"the parties' checkpoints in {root} do not belong together: {shown}. A resume needs "
            "the same step complete at every party; restore the missing party's directory or "
            "start a new run (job.train.resume: false, or another checkpoint_dir)"
        )
    return max(common)


def load(root: Path, party: str, step: int, names: list[str], opt_names: list[str], device) -> tuple:
    """This party's shares at ``step`` as MPCTensors: (params, opt_state, meta)."""
    d = party_dir(root, party) / f"step-{step:08d}"
    meta = json.loads((d / "meta.json").read_text())
    if meta["step"] != step:
        raise CheckpointError(f"checkpoint {d} says step {meta['step']}, its directory step {step}")
    state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    missing = sorted(set(names) - set(state["params"])) + sorted(set(opt_names) - set(state["opt"]))
    if missing:
        raise CheckpointError(f"checkpoint {d} lacks {missing[:5]}: it was written for other trainable parameters")
    prec = state["precision"]

    def mk(share):
        return crypten.mpc.MPCTensor.from_shares(share.to(device), precision=prec)

    return ({n: mk(state["params"][n]) for n in names}, {n: mk(state["opt"][n]) for n in opt_names}, meta)
