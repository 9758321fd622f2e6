"""Encrypted inference: the job every computing party runs.

Data flow (docs/design.md): the model owner loads its checkpoint and sends
the public architecture; every party receives the weights as shares; each
data owner in turn announces how many texts it has (public), shares their
one-hot ids and padding masks batch by batch, and alone receives the
logits (or embeddings). A failure in a party's local preparation (a bad
checkpoint, a text too long) is broadcast as an error so every party stops
at once with the same message instead of waiting for a timeout.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from . import convert, inputs, offline, premask, resources
from . import progress as _progress
from .reveal import open_to
from ._compat import import_crypten
from .errors import InputError, ModelError, MpcLmError
from .models import encoders
from .runtime import PartyContext
from .transport import TrafficStats

crypten = import_crypten()
log = logging.getLogger(__name__)


@dataclass
class Phase:
    """Wall time and traffic of one phase, measured by one party."""

    started: float = field(default_factory=time.perf_counter)
    traffic_before: dict | None = None
    result: dict = field(default_factory=dict)

    def begin(self, ctx: PartyContext) -> "Phase":
        self.started = time.perf_counter()
        self.traffic_before = ctx.comm.traffic.snapshot()
        return self

    def end(self, ctx: PartyContext) -> dict:
        self.result = {
            "wall_s": round(time.perf_counter() - self.started, 4),
            "traffic": TrafficStats.diff(ctx.comm.traffic.snapshot(), self.traffic_before),
        }
        return self.result


def _agree(ctx: PartyContext, src: int, produce):
    """Run ``produce`` on rank ``src`` and broadcast its result (or its error) to all."""
    payload = None
    if ctx.rank == src:
        try:
            payload = {"ok": produce()}
        except MpcLmError as err:
            payload = {"error": type(err).__name__, "message": str(err)}
    payload = ctx.comm.broadcast_obj(payload, src)
    if "error" in payload:
        cls = {"ModelError": ModelError, "InputError": InputError}.get(payload["error"], MpcLmError)
        who = ctx.config.party_at(src).name
        raise cls(payload["message"] if ctx.rank == src else f"party {who!r} reported: {payload['message']}")
    return payload["ok"]


def load_model(ctx: PartyContext):
    """Share the model owner's weights; returns (arch, labels, shares)."""
    mo = ctx.model_owner_rank
    owned: list[convert.OwnedModel] = []

    def describe():
        owned.append(convert.load_owned_model(ctx.config.model))
        return {"arch": owned[0].arch.to_dict(), "labels": owned[0].labels}

    meta = _agree(ctx, mo, describe)
    arch = encoders.EncoderArch.from_dict(meta["arch"])
    _check_job_fits(ctx, arch)
    shapes = encoders.param_shapes(arch)
    params = convert.share_parameters(shapes, owned[0].state if owned else None, mo, ctx.device)
    return arch, meta["labels"], params


def _check_job_fits(ctx: PartyContext, arch: encoders.EncoderArch) -> None:
    job = ctx.config.job
    if job.seq_len > arch.max_seq_len:
        raise InputError(
            f"job.seq_len={job.seq_len} is longer than the model allows ({arch.max_seq_len} positions "
            f"for this {arch.family} checkpoint); lower job.seq_len"
        )
    if job.kind == "classify" and not arch.num_labels:
        raise InputError(
            "job.kind is 'classify' but the model has no classification head; use job.kind: embed "
            "or a checkpoint with a head"
        )
    n_params = sum(math.prod(s) for s in encoders.param_shapes(arch).values())
    need = resources.encoder_inference_bytes(n_params, job.batch_size, job.seq_len, arch.vocab_size,
                                             arch.heads, arch.hidden, arch.intermediate)
    resources.check_fits(need, ctx.device, ctx.party.name, f"encrypted inference of this {arch.family} model")


def _prepare_data_owner(ctx: PartyContext):
    from transformers import AutoTokenizer

    party = ctx.party
    texts = inputs.read_texts(party.input)
    tok_path = convert.resolve_tokenizer_path(ctx.config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
    except (OSError, ValueError) as err:
        raise InputError(f"could not load the public tokenizer from {tok_path}: {err}") from None
    job = ctx.config.job
    return texts, inputs.tokenize(tokenizer, texts, job.seq_len, job.truncate, source=str(party.input))


def serve_data_owner(ctx: PartyContext, owner: str, arch, labels, params, progress=None,
                     stats: dict | None = None) -> int:
    """One data owner's texts through the model; returns how many texts were processed.

    ``stats`` (if given) receives the offline phase's share of the time (docs/performance.md).
    """
    job, ap = ctx.config.job, ctx.config.approx
    src = ctx.rank_of(owner)
    mine = ctx.rank == src
    local: list = []

    def count():
        local.extend(_prepare_data_owner(ctx))
        return len(local[0])

    n = _agree(ctx, src, count)
    if mine and progress is None:
        progress = _progress.reporter(owner, n, f"{owner}: encrypted {ctx.config.job.kind}")
    outputs = []
    offline_stats = stats if stats is not None else {}
    offline_stats.update(offline_s=0.0, plan_s=0.0, requests=0, products_ahead=0, draws_ahead=0)
    for start in range(0, n, job.batch_size):
        size = min(job.batch_size, n - start)
        batch = None
        if mine:
            full = local[1]
            batch = inputs.Batch(full.ids[start : start + size], full.mask[start : start + size])
        one_hot, mask = inputs.share_batch(batch, (size, job.seq_len), arch.vocab_size, src, ctx.device)
        with crypten.no_grad():
            result, pre = offline.run(ctx.config, ("encoder", size, job.seq_len),
                                      encoders.forward, params, one_hot, mask, arch, ap)
        if pre is not None:
            offline_stats["offline_s"] += pre["offline_s"]
            offline_stats["plan_s"] += pre["plan_s"]
            offline_stats["requests"] += pre["requests"]
            offline_stats["products_ahead"] += pre["products_ahead"]
            offline_stats["draws_ahead"] += pre["draws_ahead"]
        plain = open_to(result, dst=src)
        if mine:
            outputs.append(plain.cpu())
        if progress is not None:
            progress.update(size)
    if progress is not None:
        progress.close()
    if ctx.comm.audit is not None:  # test instrument (docs/security.md): job state is live here
        ctx.comm.audit.snapshot_held()
    if mine:
        inputs.write_outputs(ctx.party.output or ctx.config.run_dir / f"{owner}.jsonl",
                             local[0], torch.cat(outputs), labels, job.kind)
    return n


def run(ctx: PartyContext) -> dict:
    """The inference job of one computing party; returns its own measurements."""
    setup = Phase().begin(ctx)
    arch, labels, params = load_model(ctx)
    # Products with a weight open the weight's mask once, here, not in every forward.
    params, masks = premask.prepare(ctx.config, params, premask.matmul_names(encoders.param_shapes(arch)))
    summary = {"model": {"family": arch.family, "task": arch.task, "layers": arch.layers,
                         "hidden": arch.hidden, "vocab": arch.vocab_size},
               "share_weights": setup.end(ctx), "weight_masks": masks, "data_owners": {}}
    for owner in ctx.config.data_owners:
        phase = Phase().begin(ctx)
        pre: dict = {}
        n = serve_data_owner(ctx, owner.name, arch, labels, params, stats=pre)
        summary["data_owners"][owner.name] = {"texts": n, **phase.end(ctx), "offline": pre}
    return summary
