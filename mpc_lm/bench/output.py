"""The human side of a benchmark: a rich table and a matplotlib chart of cost against protection."""

from __future__ import annotations

from pathlib import Path

LEVELS = {0: "none\n(trusted curator)", 1: "output DP\n(curator sees data)",
          2: "text + weights hidden\n(MPC, no DP)"}


def _num(x, fmt: str = "{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


SHORT = {0: "none", 1: "output DP", 2: "text+weights"}


def print_table(doc: dict, console) -> None:
    from rich import box
    from rich.table import Table

    b = doc["benchmark"]
    table = Table(title=f"mpc-lm bench: {b['model']} on {b['task']} (seq {b['sizes']['seq_len']}, "
                        f"{b['device']}{', quick' if b['quick'] else ''})", box=box.SIMPLE_HEAD, pad_edge=False)
    cols = ["mode", "acc (n)", "agree", "ε (δ)", "wall s", "ex/s", "peak MB", "MB/party\non+dealer",
            "rounds\non+dealer", "LAN s", "WAN s", "protects"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("mode", "protects") else "right")
    for r in doc["modes"]:
        if r["mode"] in ("mpc", "crypten-naive"):
            phase = "infer, plain-trained" if r.get("mpc_phase") == "inference" else "train"
        else:
            phase = r["phase"]
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}\n({r['delta']:.0e})"
        exs = _num(r["examples_per_s"])
        if r.get("infer_examples_per_s"):
            exs += f"\ninfer {r['infer_examples_per_s']:.3g}"
        mb = "-" if r["bytes_per_party"] is None else \
            f"{r['bytes_per_party'] / 1e6:.0f}\n{r['online_bytes'] / 1e6:.0f}+{r['offline_bytes'] / 1e6:.0f}"
        rounds = "-" if r["rounds"] is None else \
            f"{r['rounds'] + (r.get('offline_rounds') or 0)}\n{r['rounds']}+{r.get('offline_rounds') or 0}"
        acc = _num(r["accuracy"], "{:.3f}") + (f"\n({r['eval_examples']})" if r.get("eval_examples") else "")
        table.add_row(f"{r['mode']}\n[dim]{phase}[/dim]", acc, _num(r["agreement"], "{:.3f}"), eps,
                      _num(r["wall_s"], "{:.2f}") + (f"\noff {r['offline_s']:.2f}" if r.get("offline_s") else ""),
                      exs, _num(r["peak_host_mb"], "{:.0f}"), mb, rounds,
                      _num(r["lan_s"], "{:.1f}"), _num(r["wan_s"], "{:.1f}"), SHORT[r["protects"]["level"]])
    console.print(table)
    for r in doc["modes"]:
        console.print(f"[bold]{r['mode']}[/bold] protects: {r['protects']['summary']}")
    console.print("[dim]wall s / ex/s: training for plaintext and dp (plus plaintext inference); for MPC rows "
                  "encrypted inference or fine-tuning, as the row's phase says; LAN/WAN: wall + rounds*RTT + "
                  "bytes*8/bandwidth (docs/bench.md)[/dim]")
    cmp = doc.get("comparison")
    if cmp:
        r = cmp["crypten-naive/mpc"]
        fid = ", ".join(f"{k} agreement {v['agreement']}, max |logit err| {v['max_abs_logit_error']}"
                        for k, v in cmp["fidelity"].items())
        console.print(f"[bold]crypten-naive / mpc[/bold]: online phase: time {r['online']['time']}x, bytes "
                      f"{r['online']['bytes']}x, rounds {r['online']['rounds']}x; whole runs (offline phase and "
                      f"dealer included): time {r['total']['time']}x, bytes {r['total']['bytes']}x, rounds "
                      f"{r['total']['rounds']}x ({fid})")
    for s in doc["skipped"]:
        console.print(f"[yellow]skipped {s['mode']}:[/yellow] {s['reason']}")
    for n in doc["benchmark"].get("notes") or []:
        console.print(f"[dim]note: {n}[/dim]")


def plot(doc: dict, path: str | Path) -> None:
    """Seconds per example (log x) against protection level (y), one marker per mode and network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = {"plaintext": "tab:blue", "dp": "tab:green", "mpc": "tab:red", "crypten-naive": "tab:purple"}
    offsets = {"plaintext": 0.0, "dp": 0.0, "mpc": 0.08, "crypten-naive": -0.08}
    for r in doc["modes"]:
        y = r["protects"]["level"] + offsets[r["mode"]]
        c = colours[r["mode"]]
        n = r.get("eval_examples") if r["phase"] == "inference" else None
        if r["examples_per_s"]:
            ax.scatter([1.0 / r["examples_per_s"]], [y], color=c, marker="o", s=60, zorder=3,
                       label=f"{r['mode']} ({r['phase']}, this machine)")
        if r.get("infer_examples_per_s"):
            ax.scatter([1.0 / r["infer_examples_per_s"]], [y], color=c, marker="^", s=60, zorder=3,
                       label=f"{r['mode']} (inference, this machine)")
        if r.get("lan_s") is not None and n:
            xs = [r["wall_s"] / n, r["lan_s"] / n, r["wan_s"] / n]
            ax.plot(xs, [y] * 3, color=c, lw=1, zorder=2)
            ax.scatter(xs[1:], [y] * 2, color=c, marker="s", facecolors="none", s=60, zorder=3)
            for x, t in zip(xs[1:], ("LAN", "WAN")):
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_yticks(list(LEVELS), [LEVELS[k] for k in LEVELS])
    ax.set_ylim(-0.5, max(LEVELS) + 0.5)
    ax.set_xlabel("seconds per example (log; squares: modelled LAN / WAN)")
    b = doc["benchmark"]
    ax.set_title(f"cost vs protection: {b['model']} on {b['task']}, seq {b['sizes']['seq_len']}"
                 f"{' (quick)' if b['quick'] else ''}", fontsize=10)
    ax.grid(True, which="both", axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def markdown(doc: dict) -> str:
    """The table as GitHub markdown (for benchmarks/results/README.md and docs/bench.md)."""
    head = ["mode", "phase", "accuracy (n)", "agreement", "ε (δ)", "wall s", "ex/s", "peak MB",
            "MB/party (online+dealer)", "rounds (online+dealer)", "LAN s", "WAN s", "protects"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["modes"]:
        phase = r["phase"] + (" (plaintext-trained model)" if r.get("mpc_phase") == "inference" else "")
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f} ({r['delta']:.0e})"
        exs = _num(r["examples_per_s"]) + (f"; inference {r['infer_examples_per_s']:.3g}"
                                           if r.get("infer_examples_per_s") else "")
        mb = "-" if r["bytes_per_party"] is None else (f"{r['bytes_per_party'] / 1e6:.0f} "
                                                       f"({r['online_bytes'] / 1e6:.0f}+{r['offline_bytes'] / 1e6:.0f})")
        rounds = "-" if r["rounds"] is None else (f"{r['rounds'] + (r.get('offline_rounds') or 0)} "
                                                  f"({r['rounds']}+{r.get('offline_rounds') or 0})")
        acc = _num(r["accuracy"], "{:.3f}") + (f" ({r['eval_examples']})" if r.get("eval_examples") else "")
        lines.append("| " + " | ".join([r["mode"], phase, acc, _num(r["agreement"], "{:.3f}"), eps,
                                         _num(r["wall_s"], "{:.1f}"), exs, _num(r["peak_host_mb"], "{:.0f}"), mb,
                                         rounds, _num(r["lan_s"], "{:.1f}"), _num(r["wan_s"], "{:.1f}"),
                                         SHORT[r["protects"]["level"]]]) + " |")
    return "\n".join(lines)
