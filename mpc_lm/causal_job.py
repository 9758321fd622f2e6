"""Encrypted causal LM jobs: ``score`` (per-token log-likelihood) and ``generate``.

Data flow (docs/causal-lm.md):

1. the model owner loads its ``*ForCausalLM`` checkpoint, sends the public
   :class:`~mpc_lm.models.causal.CausalArch`, and every party receives the
   weights as shares (:func:`mpc_lm.convert.share_parameters`);
2. each data owner in turn tokenises its texts locally, announces how many
   it has (public), and for each batch shares the LEFT-padded token one-hots
   (precision 0), the padding mask and, for GPT-2, the position one-hots;
3. ``score``: the log-probability of every next token is computed inside
   MPC (:func:`mpc_lm.approx_causal.target_log_prob`) and revealed to that
   data owner alone, who also forms the perplexity;
   ``generate``: the prompt is run once (prefill, filling a secret KV
   cache), then for each new token the choice (argmax, or Gumbel-max
   sampling) is made INSIDE MPC as a secret one-hot that is fed straight
   back as the next input: no party sees a token. After the last step the
   ids are revealed to the data owner alone.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import torch

from . import approx_causal, convert, inputs, offline, premask
from .reveal import open_to
from ._compat import import_crypten
from .config import ModelSpec
from .errors import InputError, ModelError
from .infer import Phase, _agree
from .models import causal
from .models.causal import CausalArch
from .runtime import PartyContext

crypten = import_crypten()
log = logging.getLogger(__name__)


# ------------------------------------------------------------------ model owner


@dataclass
class OwnedCausal:
    arch: CausalArch
    state: dict[str, torch.Tensor]
    hf_model: torch.nn.Module


def load_hf_causal(spec: ModelSpec):
    """The plaintext ``*ForCausalLM`` (model owner, and plaintext references)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = convert.resolve_model_path(spec)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True,
                                                           dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelError(f"could not load the causal LM checkpoint at {path}: {err}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("lm_head")
               or not getattr(model.config, "tie_word_embeddings", True)]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ModelError(
            f"the checkpoint at {path} does not match its config.json: missing weights "
            f"{sorted(missing)[:5]}, wrong shapes {list(mismatched)[:5]}"
        )
    return model.eval()


def load_owned_causal(spec: ModelSpec) -> OwnedCausal:
    model = load_hf_causal(spec)
    family = model.config.model_type
    if family == "gpt2":
        from .models import gpt2 as fam
    elif family == "llama":
        from .models import llama as fam
    else:
        raise ModelError(f"model_type {family!r} is not a causal family mpc_lm supports (gpt2, llama)")
    arch = fam.arch_from_hf(model)
    return OwnedCausal(arch, fam.canonical_state(dict(model.state_dict()), arch, model.config), model)


def load_model(ctx: PartyContext):
    """Share the model owner's causal LM; returns (arch, shares, the weight masks' stats or None)."""
    mo = ctx.model_owner_rank
    owned: list[OwnedCausal] = []

    def describe():
        if ctx.config.model.task != "causal-lm":
            raise ModelError(f"job.kind {ctx.config.job.kind} needs model.task: causal-lm "
                             f"(got {ctx.config.model.task!r})")
        owned.append(load_owned_causal(ctx.config.model))
        return owned[0].arch.to_dict()

    arch = CausalArch.from_dict(_agree(ctx, mo, describe))
    shapes = causal.param_shapes(arch)
    params = convert.share_parameters(shapes, owned[0].state if owned else None, mo, ctx.device)
    # Products with a weight open the weight's mask once, here, not for every token. A generation of one
    # text at a time multiplies each layer's weights by one row per step: kept by output column, that is
    # twice as fast on the CPU (premask.row_layout_pays; the embedding and the tied head keep theirs).
    job = ctx.config.job
    names = premask.matmul_names(shapes, ("emb.word", "emb.pos"))
    by_rows = ()
    if (job.kind == "generate" and job.generate.kv_cache
            and premask.row_layout_pays(ctx.device, job.batch_size, job.batch_size * job.seq_len)):
        by_rows = tuple(n for n in names if not n.startswith("emb."))
    params, masks = premask.prepare(ctx.config, params, names, by_rows)
    return arch, params, masks


# ------------------------------------------------------------------ data owner


@dataclass
class Prompts:
    texts: list[str]
    ids: torch.Tensor  # (n, T) left-padded
    mask: torch.Tensor  # (n, T)
    lengths: list[int]


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    path = convert.resolve_tokenizer_path(spec)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise InputError(f"could not load the public tokenizer from {path}: {err}") from None


def tokenize_left(tokenizer, texts: list[str], seq_len: int, truncate: bool, keep: str, source: str) -> Prompts:
    """Token ids left-padded to the public bucket ``seq_len`` (pad id 0, masked out).

    ``keep``: which end a too-long text keeps when ``truncate`` is set
    ("start" for scoring, "end" for prompts).
    """
    rows = tokenizer(texts, truncation=False)["input_ids"]
    bad = [(i + 1, len(r)) for i, r in enumerate(rows) if len(r) > seq_len]
    if bad and not truncate:
        shown = ", ".join(f"line {i}: {n} tokens" for i, n in bad[:5])
        raise InputError(f"{len(bad)} text(s) in {source} are longer than job.seq_len={seq_len} ({shown}); "
                         "raise job.seq_len or set job.truncate: true")
    empty = [i + 1 for i, r in enumerate(rows) if not r]
    if empty:
        raise InputError(f"texts {empty[:5]} of {source} have no tokens")
    ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_len)
    lengths = []
    for i, r in enumerate(rows):
        r = (r[:seq_len] if keep == "start" else r[-seq_len:]) if len(r) > seq_len else r
        ids[i, seq_len - len(r):] = torch.tensor(r)
        mask[i, seq_len - len(r):] = 1
        lengths.append(len(r))
    return Prompts(texts, ids, mask, lengths)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 for pads, 0.. for real tokens (== HF on the unpadded text)."""
    return (mask.cumsum(-1) - 1).clamp(min=0).long()


def share_inputs(batch: Prompts | None, size: int, seq_len: int, extra: int, arch: CausalArch, src: int, device):
    """Share token one-hots (B, T, V), the key mask (B, T + extra) and, for GPT-2,
    position one-hots (B, T + extra, P) from the data owner (others pass None)."""
    total = seq_len + extra
    if batch is not None:
        full_mask = torch.cat([batch.mask, torch.ones(size, extra)], dim=1)
        tok = torch.nn.functional.one_hot(batch.ids, arch.vocab_size)
        pos = positions(full_mask)
    else:
        full_mask = torch.zeros(size, total)
        tok = torch.zeros(size, seq_len, arch.vocab_size, dtype=torch.long)
        pos = None
    one_hot = crypten.cryptensor(tok.to(device), src=src, precision=0, device=device)
    key_mask = crypten.cryptensor(full_mask.to(device), src=src, device=device)
    pos_one_hot = None
    if arch.positions_secret:
        poh = (torch.nn.functional.one_hot(pos, arch.max_positions) if pos is not None
               else torch.zeros(size, total, arch.max_positions, dtype=torch.long))
        pos_one_hot = crypten.cryptensor(poh.to(device), src=src, precision=0, device=device)
    return one_hot, key_mask, pos_one_hot


# ------------------------------------------------------------------ secure steps


def score_batch(params, one_hot, key_mask, pos_one_hot, arch: CausalArch, ap, reveal_logits: bool):
    """Secret log p(token t+1 | tokens <= t) for t = 0..T-2, and (optionally) the logits."""
    lg = causal.logits(params, one_hot, key_mask, arch, ap, 0, None, pos_one_hot)
    logp = approx_causal.target_log_prob(lg[:, :-1], one_hot[:, 1:])
    return logp, (lg if reveal_logits else None)


def generate_batch(params, one_hot, key_mask, pos_one_hot, arch: CausalArch, ap, gen, rank: int,
                   world_size: int, device, step_offset: int = 0, on_step=None):
    """Secret one-hots (B, N, V) of N new tokens, chosen inside MPC.

    With ``gen.kv_cache`` the prompt runs once and each step processes one
    slot against the cached secret keys/values; without, each step re-runs
    the whole sequence (same result, for checking the cache).
    """
    seq_len = one_hot.size(1)
    cache = causal.KVCache(arch.layers) if gen.kv_cache else None

    def pos(lo, hi):
        return pos_one_hot[:, lo:hi] if pos_one_hot is not None else None

    lg = causal.logits(params, one_hot, key_mask, arch, ap, 0, cache, pos(0, seq_len), last_only=True)
    if on_step:
        on_step("prefill")
    chosen = []
    for s in range(gen.max_new_tokens):
        noise = None
        if gen.strategy == "sample":
            noise = approx_causal.gumbel_noise(tuple(lg.size()), world_size, rank, gen.seed,
                                               step_offset + s, device)
        nxt = approx_causal.choose_next(lg, gen.strategy, gen.top_k, gen.temperature, noise)
        chosen.append(nxt)
        if s + 1 < gen.max_new_tokens:
            slot = seq_len + s
            if cache is not None:
                lg = causal.logits(params, nxt.unsqueeze(1), key_mask, arch, ap, slot, cache,
                                   pos(slot, slot + 1), last_only=True)
            else:
                seq = crypten.cat([one_hot] + [c.unsqueeze(1) for c in chosen], dim=1)
                lg = causal.logits(params, seq, key_mask, arch, ap, 0, None, pos(0, slot + 1), last_only=True)
        if on_step:
            on_step(f"token{s}")
    return crypten.stack(chosen, dim=1)


# ------------------------------------------------------------------ the job


def _check_fits(ctx: PartyContext, arch: CausalArch) -> None:
    job = ctx.config.job
    need = job.seq_len + (job.generate.max_new_tokens if job.kind == "generate" else 0)
    if need > arch.max_positions:
        raise InputError(f"job.seq_len ({job.seq_len}) + new tokens needs {need} positions but the model "
                         f"has {arch.max_positions}; lower job.seq_len or job.generate.max_new_tokens")
    if job.generate.strategy == "sample" and job.generate.top_k > arch.vocab_size:
        raise InputError(f"job.generate.top_k={job.generate.top_k} exceeds the vocabulary ({arch.vocab_size})")


def serve_data_owner(ctx: PartyContext, owner: str, arch: CausalArch, params) -> dict:
    job, ap, gen = ctx.config.job, ctx.config.approx, ctx.config.job.generate
    src = ctx.rank_of(owner)
    mine = ctx.rank == src
    local: dict = {}

    def count():
        party = ctx.party
        texts = inputs.read_texts(party.input)
        tok = load_tokenizer(ctx.config.model)
        keep = "start" if job.kind == "score" else "end"
        local["prompts"] = tokenize_left(tok, texts, job.seq_len, job.truncate, keep, str(party.input))
        local["tokenizer"] = tok
        return len(texts)

    n = _agree(ctx, src, count)
    extra = gen.max_new_tokens if job.kind == "generate" else 0
    results, steps, offline_stats = [], [], {}
    for b, start in enumerate(range(0, n, job.batch_size)):
        size = min(job.batch_size, n - start)
        batch = None
        if mine:
            p = local["prompts"]
            batch = Prompts(p.texts[start:start + size], p.ids[start:start + size],
                            p.mask[start:start + size], p.lengths[start:start + size])
        one_hot, key_mask, pos_one_hot = share_inputs(batch, size, job.seq_len, extra, arch, src, ctx.device)
        with crypten.no_grad():
            if job.kind == "score":
                (logp, lg), pre = offline.run(
                    ctx.config, ("score", size, job.seq_len, job.reveal_logits),
                    lambda p, o, m, q: score_batch(p, o, m, q, arch, ap, job.reveal_logits),
                    params, one_hot, key_mask, pos_one_hot)
                out = {"logp": open_to(logp, dst=src)}
                if lg is not None:
                    out["logits"] = open_to(lg, dst=src)
            else:
                phase = [None]

                def on_step(label):
                    if offline.planning():
                        return
                    steps.append({"batch": b, "step": label, **phase[0].end(ctx)})
                    phase[0] = Phase().begin(ctx)

                def generate(p, o, m, q):
                    if not offline.planning():  # the online phase starts here, after the dealer's transfer
                        phase[0] = Phase().begin(ctx)
                    return generate_batch(p, o, m, q, arch, ap, gen, ctx.rank, ctx.config.world_size,
                                          ctx.device, b * gen.max_new_tokens, on_step)

                # The whole generation (prefill and every step) is one planned computation: its
                # shapes are public (bucket, batch, max_new_tokens), so one dealer transfer serves it.
                chosen, pre = offline.run(ctx.config, ("generate", size, job.seq_len, gen.max_new_tokens,
                                                       gen.strategy, gen.top_k, gen.kv_cache),
                                          generate, params, one_hot, key_mask, pos_one_hot)
                out = {"ids": open_to(approx_causal.one_hot_to_ids(chosen), dst=src)}
            if pre is not None:
                for k in ("offline_s", "plan_s", "requests"):
                    offline_stats[k] = offline_stats.get(k, 0) + pre[k]
        if mine:  # kept until the job ends: on the CPU, not in the device's memory
            results.append((batch, {k: v.cpu() for k, v in out.items()}))
    if ctx.comm.audit is not None:  # test instrument (docs/security.md): job state is live here
        ctx.comm.audit.snapshot_held()
    if mine:
        path = ctx.party.output or ctx.config.run_dir / f"{owner}.jsonl"
        write_outputs(path, job.kind, results, local["tokenizer"], arch)
    return {"texts": n, "steps": steps, "offline": offline_stats or None}


def write_outputs(path, kind: str, results, tokenizer, arch: CausalArch) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    index = 0
    with path.open("w", encoding="utf-8") as f:
        for batch, out in results:
            for i, text in enumerate(batch.texts):
                length = batch.lengths[i]
                seq_len = batch.ids.size(1)
                ids = batch.ids[i, seq_len - length:].tolist()
                record = {"index": index, "text": text, "tokens": ids}
                if kind == "score":
                    lp = out["logp"][i, seq_len - length:].tolist()  # predicts tokens 1..length-1
                    nll = -sum(lp) / max(1, len(lp))
                    record.update(token_logprobs=lp, nll=nll, perplexity=math.exp(nll))
                    if "logits" in out:
                        record["logits"] = out["logits"][i, seq_len - length:].tolist()
                else:
                    gen = [int(round(v)) for v in out["ids"][i].tolist()]
                    record.update(generated_ids=gen, generated_text=tokenizer.decode(gen),
                                  eos_at=gen.index(arch.eos_token_id) if arch.eos_token_id in gen else None)
                f.write(json.dumps(record) + "\n")
                index += 1


def run(ctx: PartyContext) -> dict:
    """The causal LM job of one computing party; returns its own measurements."""
    setup = Phase().begin(ctx)
    arch, params, masks = load_model(ctx)
    _check_fits(ctx, arch)
    summary = {"model": {"family": arch.family, "task": "causal-lm", "layers": arch.layers,
                         "hidden": arch.hidden, "vocab": arch.vocab_size},
               "share_weights": setup.end(ctx), "weight_masks": masks, "data_owners": {}}
    for owner in ctx.config.data_owners:
        phase = Phase().begin(ctx)
        info = serve_data_owner(ctx, owner.name, arch, params)
        summary["data_owners"][owner.name] = {"texts": info["texts"], **phase.end(ctx), "steps": info["steps"],
                                              "offline": info["offline"]}
    return summary
