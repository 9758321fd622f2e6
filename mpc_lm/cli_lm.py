"""``mpc-lm generate CONFIG`` and ``mpc-lm score CONFIG``: causal LMs under MPC.

Thin wrappers around the launcher: run every party of CONFIG locally with
``job.kind`` set to the verb, then print what the data owner alone received,
the plaintext comparison (a local launch holds every role, so it may look
at everything) and the cost (time, bytes, rounds; per generated token).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import yaml


def _config_for(path: Path, kind: str) -> tuple[Path, bool]:
    """CONFIG itself if its job.kind is ``kind``, else a sibling temporary copy with it set."""
    data = yaml.safe_load(path.read_text())
    if (data.get("job") or {}).get("kind") == kind:
        return path, False
    data.setdefault("job", {})["kind"] = kind
    tmp = path.with_name(f".{path.stem}.{kind}.{os.getpid()}.yaml")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp, True


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_costs(run) -> dict:
    """Prefill and per-token cost (max over computing parties of wall time; online bytes
    sent and rounds of the data owner's peer with the most traffic)."""
    out = {}
    for owner in run.config.data_owners:
        per_step: dict[str, dict] = {}
        for name, res in run.results.items():
            if "data_owners" not in res:
                continue
            for st in res["data_owners"][owner.name].get("steps", []):
                key = f"{st['batch']}:{st['step']}"
                cur = per_step.setdefault(key, {"step": st["step"], "wall_s": 0.0, "bytes": 0, "rounds": 0,
                                                "dealer_bytes": 0, "dealer_rounds": 0})
                t = st["traffic"]
                cur["wall_s"] = max(cur["wall_s"], st["wall_s"])
                cur["bytes"] = max(cur["bytes"], t["online"]["bytes_sent"])
                cur["rounds"] = max(cur["rounds"], t["online"]["rounds"])
                cur["dealer_bytes"] = max(cur["dealer_bytes"], t["dealer"]["bytes_received"])
                cur["dealer_rounds"] = max(cur["dealer_rounds"], t["dealer"]["rounds"])
        pre = [v for v in per_step.values() if v["step"] == "prefill"]
        tok = [v for v in per_step.values() if v["step"] != "prefill"]
        # step "token{s}" chooses token s and runs the forward pass of its slot, except the last
        # one, which only chooses: "full_step" is the mean over the steps with both
        batches: dict[str, list] = {}
        for key, v in per_step.items():
            if v["step"] != "prefill":
                batches.setdefault(key.split(":")[0], []).append(v)
        full = [v for rows in batches.values()
                for v in sorted(rows, key=lambda r: int(r["step"][len("token"):]))[:-1]]

        def mean(rows, k):
            return statistics.mean(r[k] for r in rows) if rows else 0.0

        keys = ("wall_s", "bytes", "rounds", "dealer_bytes", "dealer_rounds")
        # the offline phase (docs/performance.md) runs before the prefill: its time and the
        # dealer's transfer for the whole generation, max over computing parties
        phases = [res["data_owners"][owner.name] for res in run.results.values() if "data_owners" in res]
        offline = [p.get("offline") or {} for p in phases]
        out[owner.name] = {
            "prefill": {k: mean(pre, k) for k in keys},
            "per_token": {k: mean(tok, k) for k in keys},
            "tokens": len(tok),
            "full_step": {k: mean(full, k) for k in keys},
            "full_steps": len(full),
            "offline": {"offline_s": max((o.get("offline_s", 0.0) for o in offline), default=0.0),
                        "plan_s": max((o.get("plan_s", 0.0) for o in offline), default=0.0),
                        "dealer_bytes": max((p["traffic"]["dealer"]["bytes_received"] for p in phases), default=0)
                        - sum(v["dealer_bytes"] for v in per_step.values())},
        }
    return out


def _cmd(args, kind: str) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import causal_reference, report
    from .launch import launch

    console = Console()
    path, temporary = _config_for(Path(args.config), kind)
    try:
        with console.status(f"running the parties of {args.config} (job.kind {kind})..."):
            run = launch(path)
    finally:
        if temporary:
            path.unlink(missing_ok=True)
    cfg = run.config
    summary = {"config": cfg.name, "kind": kind, "wall_s": run.wall_s, "run_dir": str(run.run_dir),
               "cost": report.cost_summary(run), "owners": {}}
    if kind == "generate":
        summary["per_step"] = step_costs(run)
    for owner in cfg.data_owners:
        rows = _read(report.output_path(run, owner.name))
        texts = [r["text"] for r in rows]
        owner_summary: dict = {"output": str(report.output_path(run, owner.name))}
        if kind == "generate":
            plain = None
            if not args.no_check and (cfg.job.generate.strategy == "greedy" or cfg.job.generate.seed is not None):
                with console.status("plaintext decoding of the same prompts..."):
                    plain = causal_reference.generate(cfg.model, texts, cfg.job.seq_len, cfg.job.generate,
                                                      cfg.world_size, cfg.job.truncate, cfg.job.batch_size)
            table = Table(title=f"Text generated for {owner.name} only ({cfg.job.generate.strategy})")
            for col in ("#", "prompt", "generated (MPC)", "= plaintext"):
                table.add_column(col)
            same = []
            for i, r in enumerate(rows):
                ok = None if plain is None else plain[i] == r["generated_ids"]
                same.append(ok)
                table.add_row(str(i), r["text"][:50], r["generated_text"][:90],
                              "-" if ok is None else ("yes" if ok else "NO"))
            console.print(table)
            owner_summary["identical_to_plaintext"] = None if plain is None else all(same)
            owner_summary["generated"] = [r["generated_text"] for r in rows]
        else:
            plain = None if args.no_check else causal_reference.score(cfg.model, texts, cfg.job.seq_len,
                                                                      cfg.job.truncate)
            table = Table(title=f"Log-likelihood of {owner.name}'s texts (received by {owner.name} only)")
            for col in ("#", "text", "tokens", "perplexity (MPC)", "plaintext", "rel. error"):
                table.add_column(col)
            tot_mpc = tot_plain = count = 0.0
            max_lp = 0.0
            for i, r in enumerate(rows):
                n = len(r["token_logprobs"])
                tot_mpc += -sum(r["token_logprobs"])
                count += n
                pp = "-"
                rel = "-"
                if plain is not None:
                    tot_plain += -sum(plain[i]["token_logprobs"])
                    pp = f"{plain[i]['perplexity']:.3f}"
                    rel = f"{abs(r['perplexity'] / plain[i]['perplexity'] - 1) * 100:.2f} %"
                    if n:
                        max_lp = max(max_lp, max(abs(a - b) for a, b in zip(r["token_logprobs"],
                                                                            plain[i]["token_logprobs"])))
                table.add_row(str(i), r["text"][:50], str(n + 1), f"{r['perplexity']:.3f}", pp, rel)
            console.print(table)
            import math

            owner_summary["perplexity_mpc"] = math.exp(tot_mpc / max(count, 1))
            if plain is not None:
                owner_summary["perplexity_plain"] = math.exp(tot_plain / max(count, 1))
                owner_summary["perplexity_rel_error"] = abs(owner_summary["perplexity_mpc"]
                                                            / owner_summary["perplexity_plain"] - 1)
                owner_summary["max_abs_logprob_error"] = max_lp
                console.print(f"[bold]{owner.name}: perplexity over {int(count)} predicted tokens: MPC "
                              f"{owner_summary['perplexity_mpc']:.4f}, plaintext "
                              f"{owner_summary['perplexity_plain']:.4f} (relative error "
                              f"{owner_summary['perplexity_rel_error'] * 100:.3f} %), max |log-prob error| "
                              f"{max_lp:.4f}[/bold]")
        summary["owners"][owner.name] = owner_summary
    for owner, cost in summary["cost"].items():
        console.print(f"{owner}: {cost['texts']} text(s), wall {cost['wall_s']:.2f} s, "
                      f"{cost['rounds']} online rounds")
    for owner, st in summary.get("per_step", {}).items():
        t = Table(title=f"Cost per step for {owner} (max over parties; bytes = online bytes sent by one party)")
        for col in ("step", "wall s", "online bytes", "online rounds", "bytes from dealer"):
            t.add_column(col)
        rows = [("prefill", st["prefill"]), (f"per token (mean of {st['tokens']})", st["per_token"])]
        if st["full_steps"]:
            rows.append((f"choice + forward (mean of {st['full_steps']})", st["full_step"]))
        for label, c in rows:
            t.add_row(label, f"{c['wall_s']:.2f}", report._fmt_bytes(c["bytes"]), f"{c['rounds']:.0f}",
                      report._fmt_bytes(c["dealer_bytes"]))
        console.print(t)
    console.print(f"run directory: {run.run_dir}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        console.print(f"JSON results: {args.json}")
    return 0


def add_parsers(sub) -> None:
    for kind, verb in (("generate", "generate text"), ("score", "score texts (log-likelihood, perplexity)")):
        p = sub.add_parser(kind, help=f"{verb} with a causal LM under MPC (docs/causal-lm.md)",
                           description=f"Run every party of CONFIG on this machine with job.kind {kind}, "
                           "print what the data owner received, the plaintext comparison and the cost.")
        p.add_argument("config", help="consortium YAML with model.task: causal-lm")
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
        p.add_argument("--no-check", action="store_true", help="skip the plaintext comparison")
        p.set_defaults(func=lambda args, kind=kind: _cmd(args, kind))
