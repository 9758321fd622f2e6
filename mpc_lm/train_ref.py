"""Plaintext twin of the encrypted training job, for tests and fidelity reports.

Runs the same consortium config in one process with plain ``transformers``
and torch autograd: the same data files, tokenisation, example order
(:func:`mpc_lm.train.schedule`), trainable parameters, learning-rate
schedule, gradient accumulation and optimizer (torch.optim), with dropout
off (the MPC job has no dropout). LoRA adapters are added with a small
wrapper (no peft needed) from the same public initialisation and merged at
the end. SGD is torch.optim.SGD; Adam/AdamW are :class:`EpsInsideAdam`, the
variant the MPC job computes (1/sqrt(v + eps^2) instead of 1/(sqrt(v) + eps)).
"""

from __future__ import annotations

import torch

from . import convert, export, inputs, optim
from .config import ConsortiumConfig, Training
from .models import encoders
from .train import make_plan, read_labelled, schedule


class EpsInsideAdam(torch.optim.Optimizer):
    """Adam/AdamW with eps inside the square root: w -= lr * m_hat / sqrt(v_hat + eps^2)."""

    def __init__(self, params, lr, betas, eps, weight_decay, decoupled):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.decoupled = decoupled

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if wd and not self.decoupled:
                    g = g + wd * p
                st["t"] += 1
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                mhat = st["m"] / (1 - b1 ** st["t"])
                vhat = st["v"] / (1 - b2 ** st["t"])
                update = mhat / (vhat + eps**2).sqrt()
                if wd and self.decoupled:
                    update = update + wd * p
                p.sub_(lr * update)


class LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = torch.nn.Parameter(a.clone())  # (r, in)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, a.shape[0]))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def _data(cfg: ConsortiumConfig, num_labels: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(convert.resolve_tokenizer_path(cfg.model)))
    out = {}
    for split in ("train", "eval"):
        ids, mask, labels = [], [], []
        for party in cfg.data_owners:
            path = party.train_data if split == "train" else party.eval_data
            if path is None:
                continue
            texts, lab = read_labelled(path, num_labels)
            b = inputs.tokenize(tok, texts, cfg.job.seq_len, cfg.job.truncate)
            ids.append(b.ids), mask.append(b.mask), labels.append(torch.tensor(lab))
        out[split] = tuple(torch.cat(t) for t in (ids, mask, labels)) if ids else None
    return out


def reference_train(cfg: ConsortiumConfig) -> dict:
    """Train in plaintext; returns {"hf_state", "head" (embedding task), "arch", "eval_accuracy"}."""
    tc = cfg.job.train or Training()
    owned = convert.load_owned_model(cfg.model)
    arch, model = owned.arch, owned.hf_model.eval()
    plan = make_plan(tc, arch)
    for p in model.parameters():
        p.requires_grad_(False)
    head = None
    if arch.task == "embedding":
        head = torch.nn.Linear(arch.hidden, arch.num_labels)
        head.weight.data = owned.state["head.out.weight"].t().clone()
        head.bias.data = owned.state["head.out.bias"].clone()
    dense = {n: owned.state[n] for n in plan.train if "lora" not in n}
    hf_names = list(export.canonical_to_hf(dense, arch))
    params = []
    for name in hf_names:
        if name.startswith("head."):
            params.append(getattr(head, name.split(".")[1]))
        else:
            params.append(model.get_parameter(name))
    for p in params:
        p.requires_grad_(True)
    wrappers = {}
    if plan.lora is not None:
        base, stack = encoders._prefixes(arch)
        names = encoders._LAYER[arch.family]
        init = export.lora_init(arch, tc.lora_rank, tc.lora_targets, tc.seed)
        r = tc.lora_rank
        for n in range(arch.layers):
            for j, t in enumerate(plan.lora.targets):
                path = f"{base}{stack}.{n}.{names[t]}"
                parent, attr = path.rsplit(".", 1)
                a = init[f"l{n}.attn.lora_A"][:, j * r : (j + 1) * r].t()
                w = LoraLinear(model.get_submodule(path), a, tc.lora_alpha / r)
                setattr(model.get_submodule(parent), attr, w)
                wrappers[path] = w
                params += [w.lora_A, w.lora_B]

    def logits_of(ids, mask):
        if arch.task == "embedding":
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).float()
            return head((hidden * m).sum(1) / m.sum(1))
        return model(input_ids=ids, attention_mask=mask).logits

    kw = dict(lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.optimizer == "sgd":
        opt = torch.optim.SGD(params, momentum=tc.momentum, **kw)
    else:
        opt = EpsInsideAdam(params, betas=tc.betas, eps=tc.eps, decoupled=tc.optimizer == "adamw", **kw)
    data = _data(cfg, arch.num_labels)
    ids, mask, labels = data["train"]
    steps = schedule(tc, cfg.job.batch_size, len(labels))
    for step, micro in enumerate(steps):
        for group in opt.param_groups:
            group["lr"] = optim.lr_at(tc, step, len(steps))
        opt.zero_grad()
        n_step = sum(len(m) for m in micro)
        for idx in micro:
            loss = torch.nn.functional.cross_entropy(logits_of(ids[idx], mask[idx]), labels[idx], reduction="sum")
            (loss / n_step).backward()
        opt.step()
    for path, w in wrappers.items():  # merge: W += alpha / r * B A
        w.base.weight.data += w.scale * (w.lora_B @ w.lora_A).detach()
        parent, attr = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, w.base)
    accuracy = None
    if data["eval"] is not None:
        with torch.no_grad():
            e_ids, e_mask, e_lab = data["eval"]
            accuracy = (logits_of(e_ids, e_mask).argmax(-1) == e_lab).float().mean().item()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"hf_state": state, "arch": arch, "eval_accuracy": accuracy,
            "head": None if head is None else {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}}
