"""``mpc-lm``: the command line. One subcommand per verb.

  mpc-lm launch CONFIG       run every party of CONFIG on this machine (the demo)
  mpc-lm party CONFIG --name N   run one party (one per host in a real consortium)
  mpc-lm check CONFIG        validate a consortium config and show ranks and roles
  mpc-lm env                 versions, for bug reports
  mpc-lm certs DIR --parties a,b   consortium CA + party certificates (docs/transport.md)
  mpc-lm generate CONFIG     generate text with a causal LM under MPC (docs/causal-lm.md)
  mpc-lm score CONFIG        per-token log-likelihood / perplexity of private texts
  mpc-lm bench               encrypted vs plaintext vs DP-SGD on one task (docs/bench.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "launch" / "demo-2party.yaml"


def _cmd_launch(args) -> int:
    from rich.console import Console

    from . import report
    from .launch import launch

    console = Console(stderr=False)
    config = args.config or DEMO_CONFIG
    console.print(f"starting the parties of {config} (logs under the run directory)")
    with live_progress(console) as tick:
        run = launch(config, on_tick=tick)
    with console.status("comparing with the plaintext model on the same input..."):
        summary = report.build(run, check=not args.no_check)
    report.print_tables(run, summary, console)
    console.print(f"run directory: {run.run_dir}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        console.print(f"JSON results: {args.json}")
    return 0


@contextmanager
def live_progress(console):
    """A rich progress bar per party that reports progress (mpc_lm.progress)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .progress import read_all

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)
    tasks: dict[str, int] = {}

    def tick(run_dir: Path) -> None:
        for party, state in read_all(run_dir / "progress").items():
            if party not in tasks:
                tasks[party] = bars.add_task(state["desc"], total=state["total"])
            bars.update(tasks[party], completed=state["done"])

    with bars:
        yield tick


def _cmd_party(args) -> int:
    from .party import run_party

    return run_party(args.config, args.name, args.result, args.log_level)


def _cmd_check(args) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    print(f"config {cfg.name!r} is valid (hash {cfg.digest()[:16]})")
    for p in cfg.parties:
        print(f"  rank {cfg.rank_of(p.name)}: {p.name:<16} {p.role.value:<12} {p.device}")
    print(f"  rendezvous {cfg.rendezvous.host}:{cfg.rendezvous.port}, provider {cfg.security.provider}")
    return 0


def _cmd_env(args) -> int:
    import torch

    from . import __version__
    from ._compat import import_crypten

    crypten = import_crypten()
    import transformers

    info = {"mpc_lm": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "crypten": crypten.__version__,
            "transformers": transformers.__version__}
    try:
        import opacus

        info["opacus"] = opacus.__version__
    except ImportError:
        info["opacus"] = None
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpc-lm",
        description="Run Hugging Face transformers on secret-shared weights and text (CrypTen MPC).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("launch", help="run every party of a config on this machine",
                       description="Start each party of CONFIG as its own process on this machine, "
                       "supervise them, and print the predictions the data owners received, the "
                       "cost (time, bytes, rounds) and the agreement with the plaintext model. "
                       "Without CONFIG, runs the embedded demo (launch/demo-2party.yaml).")
    p.add_argument("config", nargs="?", help="consortium YAML (default: the embedded demo)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--no-check", action="store_true",
                   help="skip the plaintext comparison (it needs the model owner's checkpoint)")
    p.set_defaults(func=_cmd_launch)
    p = sub.add_parser("party", help="run one party (on its own host)",
                       description="Run the party NAME of CONFIG. Every party of the consortium runs "
                       "this with the same CONFIG; they meet at CONFIG's rendezvous address.")
    p.add_argument("config")
    p.add_argument("--name", required=True, help="this party's name in CONFIG")
    p.add_argument("--result", metavar="PATH", help="write this party's own measurements (JSON) here")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_party)
    p = sub.add_parser("check", help="validate a consortium config")
    p.add_argument("config")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("env", help="print versions for bug reports")
    p.set_defaults(func=_cmd_env)
    from .cli_certs import add_parser as _add_certs_parser  # certs (docs/transport.md)

    _add_certs_parser(sub)
    from .cli_lm import add_parsers as _add_lm_parsers  # generate, score (docs/causal-lm.md)

    _add_lm_parsers(sub)
    from .bench.cli import add_parser as _add_bench_parser  # mpc_lm/bench/

    _add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import MpcLmError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MpcLmError as err:
        print(f"mpc-lm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpc-lm: interrupted; all parties were stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["party"]:
        # A party process (as the launcher and the tests start it) ends here, its results
        # written: flush its output and leave without running native destructors, which can
        # abort the process after a successful run when a torch.distributed thread is torn
        # down at interpreter exit ("terminate called without an active exception").
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
