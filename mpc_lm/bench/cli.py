"""Arguments of ``mpc-lm bench`` (registered by :func:`add_parser` in mpc_lm/cli.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import MODES

DESCRIPTION = """\
Run one task (a model, a labelled text set, a split, hyper-parameters) in several
modes and print one table; optionally write one JSON file (--json) and one PNG
chart of cost against protection (--plot). Details: docs/bench.md.

modes (--modes, default all four):
  plaintext      ordinary PyTorch fine-tuning of the last encoder layer + a mean-pooled
                 linear head (the rest frozen), then inference. A trusted curator sees
                 the text, the labels and the weights. Reports accuracy, training and
                 inference throughput, peak memory.
  dp             the same fine-tuning with Opacus DP-SGD, noise calibrated to a target
                 epsilon (--epsilon; delta defaults to 1/n), per-example clipping
                 (--max-grad-norm; ghost clipping where the model allows it, else
                 hooks), accountant --accountant. The curator still sees everything;
                 the trained model is (epsilon, delta)-DP. Reports the accountant's epsilon.
  mpc            mpc_lm: every party is its own process (model owner, data owner, dealer
                 serving Beaver triples; or the parties of --mpc-config); weights and
                 text are secret-shared. By default it runs encrypted INFERENCE of the
                 plaintext-trained model (--mpc-phase inference; --mpc-phase train runs
                 encrypted fine-tuning, mpc_lm/train.py): accuracy, agreement with the
                 plaintext model, bytes and rounds per party (online / dealer), and
                 modelled LAN and WAN times.
  crypten-naive  the same MPC run with CrypTen's stock functions (approx.mode: crypten:
                 its softmax, erf GELU, inv_sqrt LayerNorm, tanh, reciprocal, default
                 max) instead of mpc_lm's: the ratio shows what our choices buy.

network model: T = wall(loopback) + rounds * RTT + bytes * 8 / bandwidth, with
LAN = 10 Gbit/s, 0.2 ms RTT and WAN = 400 Mbit/s, 40 ms RTT.
"""

EPILOG = """\
examples:
  mpc-lm bench --quick                                   CI-sized, all four modes
  mpc-lm bench --json benchmarks/results/minilm-rotten-tomatoes-cpu.json \\
               --plot benchmarks/results/minilm-rotten-tomatoes-cpu.png
  mpc-lm bench --model bert-base-random --modes plaintext mpc crypten-naive
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="compare encrypted, plaintext and DP-SGD runs of one task",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), metavar="MODE",
                   help=f"which modes to run, of {', '.join(MODES)} (default: all)")
    p.add_argument("--task", default="rotten-tomatoes", choices=["rotten-tomatoes", "demo-sentiment"],
                   help="labelled text set (mpc_lm.datasets); train split for fine-tuning, test for evaluation")
    p.add_argument("--model", default="minilm",
                   help="minilm (real all-MiniLM-L6-v2), bert-base-random, gpt2-small-random (cost only), "
                        "or a local BERT-family HF directory")
    p.add_argument("--quick", action="store_true",
                   help="CI size: 64 train / 32 eval examples, 2 MPC texts, seq 16, 1 epoch")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (training and every MPC party)")
    p.add_argument("--json", metavar="PATH", help="write the results (docs/bench.md schema) here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart of cost against protection here")
    g = p.add_argument_group("sizes (defaults depend on --model and --quick; see docs/bench.md)")
    g.add_argument("--train-limit", type=int, help="training examples (default: whole split for minilm)")
    g.add_argument("--eval-limit", type=int, help="evaluation examples for plaintext/dp")
    g.add_argument("--mpc-limit", type=int, help="test texts run under MPC")
    g.add_argument("--seq-len", type=int, help="padded length (public bucket), same in every mode")
    g.add_argument("--epochs", type=int, help="plaintext epochs")
    g.add_argument("--dp-epochs", type=int, help="DP-SGD epochs")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=3e-4, help="plaintext AdamW learning rate")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("dp")
    g.add_argument("--epsilon", type=float, default=8.0, help="target epsilon")
    g.add_argument("--delta", type=float, default=None, help="delta (default 1/n)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm")
    g.add_argument("--accountant", default="rdp", choices=["rdp", "prv", "gdp"])
    g.add_argument("--clipping", default="auto", choices=["auto", "ghost", "hooks"],
                   help="auto: ghost clipping, falling back to per-sample hooks if the model refuses")
    g.add_argument("--dp-lr", type=float, default=1e-3, help="DP AdamW learning rate")
    g = p.add_argument_group("mpc")
    g.add_argument("--mpc-config", metavar="YAML",
                   help="use this consortium's parties (model, job and inputs are replaced)")
    g.add_argument("--mpc-phase", default="inference", choices=["inference", "train", "auto"],
                   help="inference (default): encrypted inference of the plaintext-trained model; train: "
                        "encrypted fine-tuning (job.kind train, mpc_lm/train.py) of the last layer + head "
                        "on --mpc-limit train texts, evaluated on --mpc-limit test texts (crypten-naive "
                        "stays inference); auto: train when mpc_lm.train is available")
    g.add_argument("--mpc-train-steps", type=int, default=None,
                   help="--mpc-phase train: stop after this many optimizer steps (default: one epoch)")
    g.add_argument("--naive-gelu", default="erf", choices=["erf", "sigmoid"],
                   help="crypten-naive GELU: CrypTen erf, or x*sigmoid(1.702x)")
    g.add_argument("--mpc-timeout-s", type=float, default=3600.0, help="bound on one MPC run")
    g = p.add_argument_group("run")
    g.add_argument("--work-dir", help="where checkpoints, configs and party logs go (default runs/bench-...)")
    g.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per plaintext/dp step, so peak memory is per mode "
                        "(default: on, off with --quick)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=command)
    _PARSER[:] = [p]
    return p


_PARSER: list[argparse.ArgumentParser] = []


def _canonical_argv(args) -> list[str]:
    """The options that differ from their defaults, as they would be typed (for the JSON's ``command``)."""
    out = []
    for action in _PARSER[0]._actions:
        if not action.option_strings or action.dest in ("help", "func"):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def command(args) -> int:
    from rich.console import Console

    from . import output, runner

    console = Console()
    if not console.is_terminal:  # a log or a pipe: do not squeeze the table into 80 columns
        console = Console(width=150)
    opts = vars(args).copy()
    if opts["isolate"] is None:
        opts["isolate"] = not opts["quick"]
    doc = runner.run(opts, console, _canonical_argv(args))
    output.print_table(doc, console)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
        console.print(f"JSON results: {args.json}")
    if args.plot and doc["modes"]:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        output.plot(doc, args.plot)
        console.print(f"chart: {args.plot}")
    return 0
