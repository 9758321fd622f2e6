"""Encrypted fine-tuning: the ``job.kind: train`` job of every computing party.

Data flow (docs/training.md): the model owner shares its weights (as for
inference); each data owner announces how many labelled examples it has
(public) and keeps its text. Per epoch a public permutation (from the
config's seed and the public counts) orders all examples of all owners; a
micro-batch takes the next ``job.batch_size`` and every owner shares its
rows (one-hot ids, padding mask, one-hot label), concatenated in owner
order. Forward and backward run on shares (mpc_lm/grads.py), gradients
accumulate over ``grad_accumulation`` micro-batches, the optimizer updates
the shares (mpc_lm/optim.py). Loss/accuracy are revealed only to the
parties in ``reveal_metrics_to``; at the end the trained tensors are
revealed to the model owner alone, who writes a Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import approx, checkpoint, convert, export, grads, inputs, offline, optim
from ._compat import import_crypten
from .config import Role, Training
from .errors import InputError, ModelError
from .infer import Phase, _agree, load_model
from .models import encoders
from .reveal import open_to
from .runtime import PartyContext

crypten = import_crypten()
log = logging.getLogger(__name__)

STOP_ENV = "MPC_LM_TRAIN_STOP_AFTER"  # test hook: stop (as if killed) after this step's checkpoint


# ------------------------------------------------------------------ what is trained


def make_plan(cfg: Training, arch) -> grads.Plan:
    if not arch.num_labels:
        raise ModelError("job.kind train needs a classification head (a checkpoint with labels)")
    shapes = encoders.param_shapes(arch)
    head = {n for n in shapes if n.startswith("head.")}
    lora = None
    if cfg.trainable == "head":
        train, first = head, arch.layers
    elif cfg.trainable == "last_k":
        k = min(cfg.last_k, arch.layers)
        first = arch.layers - k
        train = head | {n for n in shapes if n[0] == "l" and n[1:].split(".")[0].isdigit()
                        and int(n[1:].split(".")[0]) >= first}
    elif cfg.trainable == "all":
        train, first = set(shapes), -1
    else:
        lora = grads.Lora.build(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, arch.hidden, arch.heads)
        train = head | {f"l{n}.attn.lora_{ab}" for n in range(arch.layers) for ab in "AB"}
        first = 0
    return grads.Plan(train, first, lora)


def lora_shapes(cfg: Training, arch) -> dict:
    r = cfg.lora_rank * len(set(cfg.lora_targets))
    return {**{f"l{n}.attn.lora_A": (arch.hidden, r) for n in range(arch.layers)},
            **{f"l{n}.attn.lora_B": (r, 3 * arch.hidden) for n in range(arch.layers)}}


def hf_scales(arch, names) -> dict:
    """canonical = HF * scale: 1/sqrt(d_head) on the query columns of the fused QKV."""
    s = 1.0 / math.sqrt(arch.hidden // arch.heads)
    vec = torch.ones(3 * arch.hidden)
    vec[: arch.hidden] = s
    return {n: vec for n in names if n.endswith("attn.qkv.weight") or n.endswith("attn.qkv.bias")}


# ------------------------------------------------------------------ data


def read_labelled(path: Path, num_labels: int) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise InputError(f"training data {path} does not exist (data owner's train_data/eval_data)")
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text, label = str(rec["text"]), int(rec["label"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InputError(f"{path} line {i}: expected {{\"text\": str, \"label\": int}}") from None
        if not 0 <= label < num_labels:
            raise InputError(f"{path} line {i}: label {label} is outside 0..{num_labels - 1} (the model's head)")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise InputError(f"{path} has no examples")
    return texts, labels


@dataclass
class Owner:
    name: str
    rank: int
    n: dict  # split -> public count
    local: dict  # split -> (Batch, labels tensor); only at the owner


def load_data(ctx: PartyContext, arch) -> list[Owner]:
    from transformers import AutoTokenizer

    owners = []
    job = ctx.config.job
    for party in ctx.config.data_owners:
        rank, local = ctx.rank_of(party.name), {}

        def prepare(party=party, local=local):
            tok = AutoTokenizer.from_pretrained(str(convert.resolve_tokenizer_path(ctx.config.model)))
            counts = {}
            for split, path in (("train", party.train_data), ("eval", party.eval_data)):
                if path is None:
                    counts[split] = 0
                    continue
                texts, labels = read_labelled(path, arch.num_labels)
                batch = inputs.tokenize(tok, texts, job.seq_len, job.truncate, source=str(path))
                local[split] = (batch, torch.tensor(labels))
                counts[split] = len(texts)
            return counts

        owners.append(Owner(party.name, rank, _agree(ctx, rank, prepare), local))
    return owners


def share_examples(ctx, owners: list[Owner], split: str, index: list[int], arch):
    """Share the examples with global ``index`` (owners' examples numbered in owner order):
    one-hot ids, padding mask, the mean pooling's weights mask / count (embedding task, else None;
    the owner knows both; grads.head_fwd) and one-hot labels."""
    parts, start = [], 0
    t = ctx.config.job.seq_len
    for o in owners:
        rows = [i - start for i in index if start <= i < start + o.n[split]]
        start += o.n[split]
        if not rows:
            continue
        batch = labels = None
        if ctx.rank == o.rank:
            full, lab = o.local[split]
            batch = inputs.Batch(full.ids[rows], full.mask[rows])
            labels = torch.nn.functional.one_hot(lab[rows], arch.num_labels).float()
        one_hot, mask = inputs.share_batch(batch, (len(rows), t), arch.vocab_size, o.rank, ctx.device)
        pool = None
        if arch.task == "embedding":
            m = batch.mask.float() if batch is not None else torch.zeros(len(rows), t)
            pool = crypten.cryptensor((m / m.sum(-1, keepdim=True).clamp(min=1)).to(ctx.device),
                                      src=o.rank, device=ctx.device)
        y = crypten.cryptensor((labels if labels is not None else torch.zeros(len(rows), arch.num_labels))
                               .to(ctx.device), src=o.rank, device=ctx.device)
        parts.append((one_hot, mask, pool, y))
    if len(parts) == 1:
        return parts[0]
    return tuple(None if parts[0][i] is None else crypten.cat([p[i] for p in parts], dim=0) for i in range(4))


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """Public order of the global example indices in ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def schedule(cfg: Training, batch: int, n: int) -> list[list[list[int]]]:
    """All optimizer steps: each a list of micro-batches of global indices."""
    per_step = batch * cfg.grad_accumulation
    steps = []
    for epoch in range(cfg.epochs):
        order = epoch_order(cfg.seed, epoch, n)
        for s in range(0, n, per_step):
            chunk = order[s : s + per_step]
            steps.append([chunk[i : i + batch] for i in range(0, len(chunk), batch)])
    return steps[: cfg.max_steps] if cfg.max_steps else steps


# ------------------------------------------------------------------ metrics


def reveal_exact(value, dst: int | None = None):
    """Plaintext of a share at ``dst`` (all ranks if None), decoded exactly (mpc_lm.reveal)."""
    return open_to(value, dst)


def _reveal(ctx, value, who: list[int]):
    """Reveal a share to each rank in ``who``; returns the plaintext here (or None)."""
    mine = None
    for r in who:
        got = reveal_exact(value, r)
        if r == ctx.rank:
            mine = got
    return mine


def evaluate(ctx, owners, params, arch, plan, who) -> dict | None:
    n = sum(o.n["eval"] for o in owners)
    if not n or not who:  # nobody may see the result: do not compute it
        return None
    ap, b = ctx.config.approx, ctx.config.job.batch_size
    total = None
    with crypten.no_grad():
        for s in range(0, n, b):
            rows = list(range(s, min(n, s + b)))
            one_hot, mask, pool, y = share_examples(ctx, owners, "eval", rows, arch)
            (logits, _), _ = offline.run(ctx.config, ("eval", len(rows), ctx.config.job.seq_len), grads.forward,
                                         params, one_hot, mask, arch, ap, grads.Plan(set(), arch.layers, plan.lora),
                                         pool)
            s_true = (logits * y).sum(-1) - approx.row_max(logits).squeeze(-1)
            correct = approx.as_fixed(approx.ge0(s_true)).sum()
            total = correct if total is None else total + correct
    got = _reveal(ctx, total, who)
    return None if got is None else {"examples": n, "accuracy": round(got.item() / n, 4)}


# ------------------------------------------------------------------ the job


def run(ctx: PartyContext, progress=None) -> dict:
    cfg = ctx.config
    tc = cfg.job.train or Training()
    if cfg.approx.mode != "mpc_lm":
        raise ModelError("job.kind train needs approx.mode: mpc_lm (the backward reuses its pieces)")
    setup = Phase().begin(ctx)
    arch, _labels, params = load_model(ctx)
    plan = make_plan(tc, arch)
    mo = ctx.model_owner_rank
    if plan.lora is not None:
        init = export.lora_init(arch, tc.lora_rank, tc.lora_targets, tc.seed)
        for name, shape in lora_shapes(tc, arch).items():
            value = init.get(name, torch.zeros(shape))
            params[name] = crypten.cryptensor(value.to(ctx.device), src=mo, device=ctx.device)
    owners = load_data(ctx, arch)
    n_train = sum(o.n["train"] for o in owners)
    steps = schedule(tc, cfg.job.batch_size, n_train)
    names = sorted(plan.train)
    shapes = {n: params[n].size() for n in names}
    opt = optim.SharedOptimizer(tc, names, shapes, hf_scales(arch, names), params[names[0]])
    who = [ctx.rank_of(p) for p in tc.reveal_metrics_to if ctx.config.party(p).role != Role.DEALER]
    sees = ctx.rank in who
    summary = {"model": {"family": arch.family, "layers": arch.layers, "hidden": arch.hidden},
               "trainable": tc.trainable, "trainable_params": sum(math.prod(s) for s in shapes.values()),
               "examples": {o.name: o.n for o in owners}, "steps_total": len(steps),
               "setup": setup.end(ctx)}

    root = tc.checkpoint_dir or cfg.run_dir / "checkpoints" / cfg.name
    rid = checkpoint.run_id(cfg)
    start = 0
    if tc.resume:
        mine = checkpoint.list_complete(root, ctx.party.name)
        listings = {p.name: ctx.comm.broadcast_obj(mine if ctx.rank == r else None, r)
                    for r, p in enumerate(cfg.computing_parties)}
        step = checkpoint.choose(listings, rid, root)
        if step is not None:
            loaded, opt_state, meta = checkpoint.load(root, ctx.party.name, step, names, list(opt.state), ctx.device)
            params.update(loaded)
            opt.load_state_shares(opt_state, meta["opt_t"])
            start = step
            summary["resumed_from_step"] = step
            log.info("resumed from the checkpoint of step %d", step)

    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    step_phases, history = [], []
    per_epoch = math.ceil(n_train / (cfg.job.batch_size * tc.grad_accumulation))
    bar = None
    for step in range(start, len(steps)):
        epoch = step // per_epoch
        if bar is None or step % per_epoch == 0:
            if bar is not None:
                bar.close()
            bar = _bar(sees, epoch, tc.epochs, per_epoch, step % per_epoch)
        phase = Phase().begin(ctx)
        micro = steps[step]
        n_step = sum(len(m) for m in micro)
        acc_grads, stats, pre_step = None, None, []

        def micro_step(params, one_hot, mask, pool, y):
            logits, caches = grads.forward(params, one_hot, mask, arch, cfg.approx, plan, pool=pool)
            dlogits, p_true, correct = grads.cross_entropy(logits, y, cfg.approx, tc.loss_scale / n_step,
                                                           metrics=bool(who))
            st = crypten.stack([-(p_true + 1e-4).log().sum(), correct.sum()]) if who else None
            return grads.backward(caches, dlogits, params, arch, plan), st

        for idx in micro:
            one_hot, mask, pool, y = share_examples(ctx, owners, "train", idx, arch)
            # the dealer's randomness for this micro-batch's shape is fetched before it runs (docs/performance.md)
            (g, st), pre = offline.run(cfg, ("train", len(idx), cfg.job.seq_len, bool(who)),
                                       micro_step, params, one_hot, mask, pool, y)
            pre_step.append(pre)
            acc_grads = g if acc_grads is None else {k: acc_grads[k] + g[k] for k in g}
            if who:
                stats = st if stats is None else stats + st
        opt.step(params, acc_grads, optim.lr_at(tc, step, len(steps)))
        rec = {"step": step + 1, "examples": n_step, **phase.end(ctx),
               "offline_s": round(sum(p["offline_s"] for p in pre_step if p), 4)}
        if who:
            got = _reveal(ctx, stats, who)
            if got is not None:
                rec.update(loss=round(got[0].item() / n_step, 4), accuracy=round(got[1].item() / n_step, 4))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=rec.get("loss"), ex_s=round(n_step / rec["wall_s"], 2))
        step_phases.append(rec)
        done = step + 1
        if tc.checkpoint_every and (done % tc.checkpoint_every == 0 or done == len(steps)):
            checkpoint.save(root, ctx.party.name, ctx.rank, done, rid, {n: params[n] for n in names},
                            opt.state_shares(), opt.t, {"epoch": epoch})
        if tc.eval_every and done % tc.eval_every == 0 and done < len(steps):
            ev = evaluate(ctx, owners, params, arch, plan, who)
            if ev is not None:
                history.append({"step": done, **ev})
        if stop_after and done >= stop_after:
            summary.update(stopped_after_step=done, steps=step_phases, eval=history)
            return summary
    if bar is not None:
        bar.close()
    summary["steps"] = step_phases
    final = evaluate(ctx, owners, params, arch, plan, who)
    if final is not None:
        history.append({"step": len(steps), **final})
    summary["eval"] = history
    summary["step_mean"] = _mean_step(step_phases)
    summary["output_dir"] = _finish(ctx, tc, arch, params, names, mo)
    return summary


def _bar(enabled: bool, epoch: int, epochs: int, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=True)


def _mean_step(phases: list[dict]) -> dict:
    if not phases:
        return {}
    n = len(phases)
    online = [p["traffic"]["online"] for p in phases]
    return {"wall_s": round(sum(p["wall_s"] for p in phases) / n, 3),
            "online_rounds": round(sum(o["rounds"] for o in online) / n, 1),
            "online_bytes_sent": int(sum(o["bytes_sent"] for o in online) / n),
            "dealer_bytes": int(sum(p["traffic"]["dealer"]["bytes_received"] + p["traffic"]["dealer"]["bytes_sent"]
                                    for p in phases) / n)}


def _finish(ctx, tc: Training, arch, params, names, mo) -> str | None:
    """Reveal the trained tensors to the model owner only, who saves a HF checkpoint."""
    revealed = {n: reveal_exact(params[n], mo) for n in names}
    if ctx.rank != mo:
        return None
    cfg = ctx.config
    owned = convert.load_owned_model(cfg.model)
    state = {**owned.state, **{n: t.cpu() for n, t in revealed.items()}}
    if tc.trainable == "lora":
        state = export.merge_lora(state, arch, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
    changed = {n: state[n] for n in state if n in revealed or (tc.trainable == "lora" and n.endswith("qkv.weight"))}
    out = tc.output_dir or cfg.run_dir / f"{cfg.name}-trained"
    export.save_trained(cfg.model, arch, changed, out)
    log.info("trained model written to %s (model owner only)", out)
    return str(out)
