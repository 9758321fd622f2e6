"""The MPC modes: ``mpc`` (mpc_lm's protocols) and ``crypten-naive`` (CrypTen's stock functions).

Each mode writes a consortium config and runs it with :func:`mpc_lm.launch.launch`,
exactly as ``mpc-lm launch`` would: every party is its own OS process, the
weights are secret-shared by the model owner, the texts by the data owner, and
a dealer process serves Beaver triples. Generated consortium: ``model_owner``,
``data_owner`` and ``dealer`` on 127.0.0.1, a free rendezvous port in
29800-29899. With ``--mpc-config`` the user's consortium is used instead: its
parties, security and timeouts are kept; the model is replaced by the
benchmark's checkpoint and the evaluation texts are split among its data owners.

Phase. By default the MPC rows measure encrypted *inference* of the model the
``plaintext`` mode trained (``"mpc_phase": "inference"``), with its accuracy
and its agreement with the plaintext model on the same texts. ``--mpc-phase
train`` runs encrypted fine-tuning (``job.kind: train``, :mod:`mpc_lm.train`)
through the launcher with the job section of :func:`train_job` (the one place
to adapt if that job's schema changes); see docs/bench.md for its status.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import yaml

from ..errors import MpcLmError

PORT_RANGE = range(29800, 29900)


def mpc_train_available() -> bool:
    if importlib.util.find_spec("mpc_lm.train") is None:
        return False
    from .. import jobs

    return "train" in jobs.JOBS


def free_port(host: str = "127.0.0.1") -> int:
    import os

    from ..launch import _port_free

    start = os.getpid() % len(PORT_RANGE)
    for i in range(len(PORT_RANGE)):
        port = PORT_RANGE[(start + i) % len(PORT_RANGE)]
        if _port_free(host, port):
            return port
    raise MpcLmError("no free rendezvous port in 29800-29899 (other runs hold them all)")


def approx_section(mode: str, naive_gelu: str) -> dict:
    if mode == "crypten-naive":
        return {"mode": "crypten", "gelu": naive_gelu}
    return {}


def train_job(spec: dict, owners: list[str], work: Path) -> dict:
    """The ``job`` section of an encrypted fine-tuning run (``job.kind: train``, docs/training.md).

    Same recipe as the plaintext mode: the last encoder layer + the head, AdamW
    at ``--lr``, from the same initial head (``WORK/model-initial``); one epoch
    over the data owners' ``train_data``, at most ``--mpc-train-steps`` steps;
    accuracy on ``eval_data`` revealed to the data owners only.
    """
    sizes = spec["sizes"]
    return {"kind": "train", "seq_len": sizes["seq_len"], "batch_size": sizes["mpc_batch_size"], "truncate": True,
            "train": {"trainable": "last_k", "last_k": 1, "optimizer": "adamw", "lr": spec["lr"], "epochs": 1,
                      "max_steps": spec.get("mpc_train_steps") or None, "reveal_metrics_to": owners,
                      "resume": False, "output_dir": str(work / "trained"), "seed": spec["seed"]}}


def build_config(spec: dict, mode: str, texts: list[str], model_dir: Path, work: Path,
                 user_config: Path | None, phase: str, labels: list[int] | None = None,
                 train_set: tuple[list[str], list[int]] | None = None) -> tuple[Path, dict]:
    """Write the consortium YAML of one MPC run; returns (its path, data owner -> text indices)."""
    sizes = spec["sizes"]
    work.mkdir(parents=True, exist_ok=True)
    model = {"path": str(model_dir), "task": "embedding", "tokenizer": spec["tokenizer_dir"]}
    job = {"kind": "classify", "seq_len": sizes["seq_len"], "batch_size": sizes["mpc_batch_size"],
           "truncate": True}
    if user_config is not None:
        data = yaml.safe_load(Path(user_config).read_text())
        parties = data["parties"]
    else:
        device = spec["device"]
        parties = [{"name": "model_owner", "role": "model_owner", "device": device},
                   {"name": "data_owner", "role": "data_owner", "device": device},
                   {"name": "dealer", "role": "dealer"}]
        data = {"name": f"bench-{mode}", "parties": parties,
                "rendezvous": {"host": "127.0.0.1", "port": free_port()},
                "timeouts": {"run_s": spec["mpc_timeout_s"], "op_s": 600}}
    owners = [p for p in parties if p["role"] == "data_owner"]
    assignment: dict[str, list[int]] = {}
    for k, owner in enumerate(owners):
        idx = list(range(k, len(texts), len(owners)))
        assignment[owner["name"]] = idx
        path = work / f"{owner['name']}.txt"
        path.write_text("".join(texts[i] + "\n" for i in idx), encoding="utf-8")
        owner["input"], owner["output"] = str(path), str(work / f"{owner['name']}.out.jsonl")
    if phase == "train":
        for k, owner in enumerate(owners):
            for split, (tx, ys) in (("train", train_set), ("eval", (texts, labels))):
                f = work / f"{owner['name']}.{split}.jsonl"
                f.write_text("".join(json.dumps({"text": tx[i], "label": ys[i]}) + "\n"
                                     for i in range(k, len(tx), len(owners))), encoding="utf-8")
                owner[f"{split}_data"] = str(f)
            owner.pop("input"), owner.pop("output")
        job = train_job(spec, [o["name"] for o in owners], work)
    approx = {**data.get("approx", {}), **approx_section(mode, spec["naive_gelu"])}
    data.update(name=data.get("name", "bench") + f"-{mode}", model=model, job=job, run_dir=str(work / "runs"),
                approx=approx)
    if mode == "crypten-naive":  # stock CrypTen: a dealer request/response per multiplication, its own streams
        data["preprocessing"] = {**data.get("preprocessing", {}), "mode": "on_demand", "weight_masks": False}
        data["security"] = {**data.get("security", {}), "prg": "torch"}
        data["rendezvous"] = {**data.get("rendezvous", {}), "exchange_openings": False}  # gloo's all-reduce
    path = work / "consortium.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, assignment


def run_mode(spec: dict, mode: str, texts: list[str], labels: list[int], model_dir: Path,
             user_config: Path | None = None, phase: str = "inference", on_tick=None,
             train_set: tuple[list[str], list[int]] | None = None) -> dict:
    """Run one MPC mode; returns its row (without the network model)."""
    from .. import report
    from ..launch import launch

    if phase == "train" and not mpc_train_available():
        raise MpcLmError("--mpc-phase train needs encrypted training (mpc_lm/train.py, job.kind 'train'), "
                         "which is not in this checkout yet; use --mpc-phase inference")
    work = Path(spec["work_dir"]) / mode
    config_path, assignment = build_config(spec, mode, texts, model_dir, work, user_config, phase,
                                           labels, train_set)
    started = time.perf_counter()
    run = launch(config_path, on_tick=on_tick)
    launch_wall = time.perf_counter() - started
    if phase == "train":
        return _train_row(spec, mode, run, launch_wall, config_path)
    cost = report.cost_summary(run)
    fid = report.fidelity(run)
    correct = n = 0
    max_err, agree_sum = 0.0, 0.0
    for owner, idx in assignment.items():
        rows = [json.loads(x) for x in report.output_path(run, owner).read_text().splitlines() if x.strip()]
        correct += sum(int(r["label"] == labels[i]) for r, i in zip(rows, idx))
        n += len(rows)
        max_err = max(max_err, fid[owner]["max_abs_logit_error"])
        agree_sum += (fid[owner]["top1_agreement"] or 0.0) * fid[owner]["n"]
    parties: dict[str, dict] = {}
    wall = rounds = online_s = offline_s = plan_s = 0
    for owner, c in cost.items():
        wall += c["wall_s"]
        plan_s += c["plan_s"]
        online_s += c["online_s"]
        offline_s += c["offline_s"]
        rounds += c["rounds"]
        for name, pc in c["per_party"].items():
            acc = parties.setdefault(name, {"online_bytes": 0, "offline_bytes": 0, "rounds": 0,
                                            "offline_rounds": 0})
            acc["online_bytes"] += pc["online_bytes_sent"]
            acc["offline_bytes"] += pc["dealer_bytes_received"]
            acc["rounds"] += pc["online_rounds"]
            acc["offline_rounds"] += pc["dealer_rounds"]
    for name, acc in parties.items():
        acc["bytes"] = acc["online_bytes"] + acc["offline_bytes"]
        acc["peak_host_mb"] = run.results.get(name, {}).get("peak_host_mb")
        acc["peak_gpu_mb"] = run.results.get(name, {}).get("peak_gpu_mb")
        acc["torch_threads"] = run.results.get(name, {}).get("torch_threads")
        acc["ring_products"] = run.results.get(name, {}).get("ring_products")
        acc["dealer_streams"] = run.results.get(name, {}).get("dealer_streams")
    dealer = run.config.dealer
    if dealer is not None:
        parties[dealer.name] = {key: run.results.get(dealer.name, {}).get(key)
                                for key in ("peak_host_mb", "peak_gpu_mb", "torch_threads", "ring_products",
                                            "dealer_streams")}
    computing = [p for n_, p in parties.items() if dealer is None or n_ != dealer.name]
    busiest = max(computing, key=lambda p: p["bytes"])
    setup = max((r.get("share_weights", {}).get("wall_s", 0.0) for r in run.results.values()), default=0.0)
    # once per model, before any text: sharing the weights and opening their masks (mpc_lm/premask.py)
    setup_bytes = max((r.get("share_weights", {}).get("traffic", {}).get("online", {}).get("bytes_sent", 0)
                       for n_, r in run.results.items() if dealer is None or n_ != dealer.name), default=0)
    masks = next((r["weight_masks"] for r in run.results.values() if r.get("weight_masks")), None)
    peaks = [p["peak_host_mb"] for p in parties.values() if p.get("peak_host_mb") is not None]
    gpu = [p["peak_gpu_mb"] for p in parties.values() if p.get("peak_gpu_mb") is not None]
    return {
        "mode": mode, "phase": "inference", "mpc_phase": phase,
        "model_evaluated": "the plaintext mode's fine-tuned model" if phase == "inference" else "trained under MPC",
        "wall_s": round(wall, 3), "online_s": round(online_s, 3), "offline_s": round(offline_s, 3),
        "plan_s": round(plan_s, 3), "examples_per_s": round(n / wall, 4) if wall else None,
        "tokens_per_s": round(n * spec["sizes"]["seq_len"] / wall, 2) if wall else None,
        "eval_examples": n, "accuracy": round(correct / n, 4) if n else None,
        "agreement": round(agree_sum / n, 4) if n else None, "max_abs_logit_error": round(max_err, 5),
        "bytes_per_party": busiest["bytes"], "online_bytes": max(p["online_bytes"] for p in computing),
        "offline_bytes": max(p["offline_bytes"] for p in computing), "rounds": rounds,
        "offline_rounds": max(p["offline_rounds"] for p in computing),
        "setup_s": round(setup, 3), "setup_bytes": setup_bytes, "weight_masks": masks,
        "launch_wall_s": round(launch_wall, 3),
        "peak_host_mb": max(peaks) if peaks else None, "peak_gpu_mb": max(gpu) if gpu else None,
        "parties": parties, "approx": run.config.approx.model_dump(mode="json"),
        "provider": run.config.security.provider, "run_dir": str(run.run_dir), "config": str(config_path),
    }


def _memory(run) -> tuple[dict, float | None, float | None]:
    parties = {name: {"peak_host_mb": r.get("peak_host_mb"), "peak_gpu_mb": r.get("peak_gpu_mb")}
               for name, r in run.results.items()}
    host = [p["peak_host_mb"] for p in parties.values() if p["peak_host_mb"] is not None]
    gpu = [p["peak_gpu_mb"] for p in parties.values() if p["peak_gpu_mb"] is not None]
    return parties, (max(host) if host else None), (max(gpu) if gpu else None)


def _train_row(spec: dict, mode: str, run, launch_wall: float, config_path: Path) -> dict:
    """Row of an encrypted fine-tuning run, from the parties' own step measurements (mpc_lm/train.py)."""
    parties, peak_host, peak_gpu = _memory(run)
    dealer = run.config.dealer.name if run.config.dealer else None
    per = {}
    for name, res in run.results.items():
        if name == dealer:
            continue
        steps = res.get("steps", [])
        per[name] = {
            "online_bytes": sum(s["traffic"]["online"]["bytes_sent"] for s in steps),
            "offline_bytes": sum(s["traffic"]["dealer"]["bytes_received"] for s in steps),
            "rounds": sum(s["traffic"]["online"]["rounds"] for s in steps),
            "offline_rounds": sum(s["traffic"]["dealer"]["rounds"] for s in steps),
            "wall_s": sum(s["wall_s"] for s in steps), "examples": sum(s["examples"] for s in steps)}
        per[name]["bytes"] = per[name]["online_bytes"] + per[name]["offline_bytes"]
        parties[name].update(per[name])
    busiest = max(per.values(), key=lambda p: p["bytes"])
    wall = max(p["wall_s"] for p in per.values())
    seen = max(p["examples"] for p in per.values())
    evals = [res["eval"][-1] for res in run.results.values() if res.get("eval")]
    return {
        "mode": mode, "phase": "train", "mpc_phase": "train", "model_evaluated": "trained under MPC",
        "wall_s": round(wall, 3), "examples_per_s": round(seen / wall, 4) if wall else None,
        "tokens_per_s": round(seen * spec["sizes"]["seq_len"] / wall, 2) if wall else None,
        "train_examples": seen, "steps": max(len(r.get("steps", [])) for r in run.results.values()),
        "eval_examples": evals[0]["examples"] if evals else None,
        "accuracy": evals[0]["accuracy"] if evals else None, "agreement": None,
        "bytes_per_party": busiest["bytes"], "online_bytes": max(p["online_bytes"] for p in per.values()),
        "offline_bytes": max(p["offline_bytes"] for p in per.values()),
        "rounds": max(p["rounds"] for p in per.values()),
        "offline_rounds": max(p["offline_rounds"] for p in per.values()),
        "setup_s": max((r.get("setup", {}).get("wall_s", 0.0) for r in run.results.values()), default=0.0),
        "launch_wall_s": round(launch_wall, 3), "peak_host_mb": peak_host, "peak_gpu_mb": peak_gpu,
        "parties": parties, "approx": run.config.approx.model_dump(mode="json"),
        "provider": run.config.security.provider, "run_dir": str(run.run_dir), "config": str(config_path),
    }
