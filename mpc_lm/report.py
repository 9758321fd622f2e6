"""Turn a finished local run into a summary (JSON) and tables (rich) for people."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Role
from .launch import RunResult


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"


def _read_outputs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def output_path(run: RunResult, name: str) -> Path:
    party = run.config.party(name)
    return party.output or run.config.run_dir / f"{name}.jsonl"


def cost_summary(run: RunResult) -> dict:
    """Inference cost per data owner: wall time, bytes sent per party, rounds."""
    out = {}
    for owner in run.config.data_owners:
        per_party, rounds, wall, offline, plan = {}, 0, 0.0, 0.0, 0.0
        for name, res in run.results.items():
            if res.get("role") == Role.DEALER.value:
                continue
            phase = res["data_owners"][owner.name]
            t = phase["traffic"]
            per_party[name] = {
                "online_bytes_sent": t["online"]["bytes_sent"],
                "dealer_bytes_received": t["dealer"]["bytes_received"],
                "online_rounds": t["online"]["rounds"],
                "dealer_rounds": t["dealer"]["rounds"],
            }
            rounds = max(rounds, t["online"]["rounds"])
            wall = max(wall, phase["wall_s"])
            pre = (phase.get("offline") or {}).get("offline_s", 0.0)  # docs/performance.md
            plan = max(plan, (phase.get("offline") or {}).get("plan_s", 0.0))
            offline = max(offline, pre)
        # The online phase starts once every party has its randomness: party 0 fetches it
        # from the dealer while the others (done planning) wait at their first opening.
        online = max(0.0, wall - offline)
        texts = run.results[owner.name]["data_owners"][owner.name]["texts"]
        out[owner.name] = {"texts": texts, "wall_s": wall, "offline_s": round(offline, 4), "plan_s": round(plan, 4),
                           "online_s": round(online, 4), "rounds": rounds, "per_party": per_party}
    return out


def fidelity(run: RunResult) -> dict:
    """Compare each data owner's secure outputs with the plaintext model on the same input."""
    from .reference import compare, plaintext_outputs

    cfg = run.config
    key = "logits" if cfg.job.kind == "classify" else "embedding"
    rows = {o.name: _read_outputs(output_path(run, o.name)) for o in cfg.data_owners}
    texts = [r["text"] for owner_rows in rows.values() for r in owner_rows]
    plain = plaintext_outputs(cfg.model, texts, cfg.job.seq_len, cfg.job.truncate)  # one model load
    result, start = {}, 0
    for name, owner_rows in rows.items():
        secure = torch.tensor([r[key] for r in owner_rows])
        mine = plain[start : start + len(owner_rows)]
        start += len(owner_rows)
        result[name] = compare(secure, mine, cfg.job.kind == "classify").as_dict()
    return result


def build(run: RunResult, check: bool) -> dict:
    summary = {
        "config": run.config.name,
        "run_dir": str(run.run_dir),
        "wall_s": run.wall_s,
        "provider": run.config.security.provider,
        "parties": {p.name: p.role.value for p in run.config.parties},
        "inference": cost_summary(run),
        "share_weights": {n: r["share_weights"] for n, r in run.results.items() if "share_weights" in r},
        "outputs": {o.name: str(output_path(run, o.name)) for o in run.config.data_owners},
    }
    if check:
        summary["fidelity"] = fidelity(run)
    return summary


def print_tables(run: RunResult, summary: dict, console) -> None:
    from rich.table import Table

    cfg = run.config
    if cfg.job.kind == "classify":
        for owner in cfg.data_owners:
            rows = _read_outputs(output_path(run, owner.name))
            table = Table(title=f"Predictions received by {owner.name} only")
            table.add_column("#", justify="right")
            table.add_column("text")
            table.add_column("prediction")
            for r in rows:
                table.add_row(str(r["index"]), r["text"][:70], r["label_name"])
            console.print(table)
    for owner, cost in summary["inference"].items():
        table = Table(title=f"Cost of encrypted inference of {owner}'s {cost['texts']} texts "
                            f"(wall {cost['wall_s']:.2f} s, of which offline phase {cost['offline_s']:.2f} s; online "
                            f"{cost['online_s']:.2f} s; {cost['rounds']} online rounds)")
        for col in ("party", "online bytes sent", "online rounds", "bytes from dealer", "dealer round trips"):
            table.add_column(col, justify="right" if col != "party" else "left")
        for name, c in cost["per_party"].items():
            table.add_row(name, _fmt_bytes(c["online_bytes_sent"]), str(c["online_rounds"]),
                          _fmt_bytes(c["dealer_bytes_received"]), str(c["dealer_rounds"]))
        console.print(table)
    for owner, fid in summary.get("fidelity", {}).items():
        agree = fid["top1_agreement"]
        agree_txt = f", top-1 agreement {agree * 100:.1f} %" if agree is not None else ""
        console.print(f"[bold]Fidelity vs plaintext ({owner}, {fid['n']} texts):[/bold] max |logit error| "
                      f"{fid['max_abs_logit_error']:.4f}{agree_txt}")
