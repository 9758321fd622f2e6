"""The demo inference (launch/demo-2party.yaml) on gloo vs the mutual-TLS transport.

Runs the embedded demo alternately with ``rendezvous.backend: gloo`` and ``tls``
(fresh consortium certificates in a temporary directory), ``--repeats`` times
each, and records the launcher's wall time and each party's own time.

    PYTHONPATH=. python benchmarks/demo_tls_vs_gloo.py --repeats 2

Ports: 29950 (rendezvous) and 29951-29953 (TLS listeners).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def variant(tmp: Path, backend: str, port: int) -> Path:
    src = ROOT / "launch" / "demo-2party.yaml"
    data = yaml.safe_load(src.read_text())
    for p in data["parties"]:
        if p.get("input"):
            p["input"] = str((src.parent / p["input"]).resolve())
        if p.get("output"):
            p["output"] = str(tmp / f"{p['name']}-{backend}.jsonl")
    data["run_dir"] = str(tmp / "runs")
    data["rendezvous"] = {**data["rendezvous"], "port": port, "backend": backend}
    if backend == "tls":
        data["tls"] = {"ca": str(tmp / "certs" / "ca.pem"), "dir": str(tmp / "certs")}
    path = tmp / f"demo-{backend}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=29950)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/demo-tls-vs-gloo.json"))
    args = ap.parse_args()
    from mpc_lm.launch import launch
    from mpc_lm.pki import create_consortium

    runs = {"gloo": [], "tls": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        create_consortium(tmp / "certs", ["vendor", "hospital", "dealer"])
        configs = {b: variant(tmp, b, args.port) for b in runs}
        for i in range(args.repeats):
            for backend in ("gloo", "tls"):
                load = os.getloadavg()[0]
                cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = launch(configs[backend])
                cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2)
                parties = {n: {"wall_s": res.get("wall_s"), "traffic": res.get("traffic_total")}
                           for n, res in r.results.items()}
                runs[backend].append({"launcher_wall_s": r.wall_s, "load_avg_1min_before": round(load, 2),
                                      "cpu_s_all_parties": cpu, "parties": parties})
                print(backend, i, r.wall_s, {n: p["wall_s"] for n, p in parties.items()}, f"cpu {cpu}s",
                      f"load {load:.1f}", flush=True)
        same = (tmp / "hospital-gloo.jsonl").read_text().splitlines()
        same_tls = (tmp / "hospital-tls.jsonl").read_text().splitlines()
        labels = [json.loads(x)["label"] for x in same], [json.loads(x)["label"] for x in same_tls]
    med = {b: statistics.median(x["launcher_wall_s"] for x in v) for b, v in runs.items()}
    vendor = {b: statistics.median(x["parties"]["vendor"]["wall_s"] for x in v) for b, v in runs.items()}
    cpu = {b: statistics.median(x["cpu_s_all_parties"] for x in v) for b, v in runs.items()}
    record = {
        "what": "launch/demo-2party.yaml (vendor, hospital, dealer on one host), gloo vs mutual TLS",
        "cpus": os.cpu_count(),
        "runs": runs,
        "median_launcher_wall_s": med,
        "median_vendor_wall_s": vendor,
        "tls_over_gloo_launcher": round(med["tls"] / med["gloo"], 3),
        "tls_over_gloo_vendor": round(vendor["tls"] / vendor["gloo"], 3),
        "median_cpu_s_all_parties": cpu,
        "tls_over_gloo_cpu": round(cpu["tls"] / cpu["gloo"], 3),
        "same_labels": labels[0] == labels[1],
        "command": "PYTHONPATH=. python benchmarks/demo_tls_vs_gloo.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps({k: record[k] for k in ("median_launcher_wall_s", "tls_over_gloo_launcher",
                                             "tls_over_gloo_vendor", "tls_over_gloo_cpu", "same_labels")}))


if __name__ == "__main__":
    main()
