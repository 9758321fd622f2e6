"""One party of a REPLAYABLE run: every random draw comes from MPC_LM_REPLAY_SEED (insecure; diagnostics only).

CrypTen's PRNG seeds (``os.urandom`` in ``crypten._setup_prng``), the dealer's per-party keys (``os.urandom``
in ``mpc_lm.prg``) and torch's default generator are derived from the seed and the party's name, so the same seed gives the same shares,
masks and answers: a rare failure found by ``benchmarks/outlier_hunt.py`` can be run again under
instrumentation. With ``MPC_LM_REPLAY_DUMP=DIR`` each party also saves its shares of every secret value
returned by the functions of ``mpc_lm.approx`` and ``mpc_lm.layers`` (``DIR/NAME.pt``, in call order), which
the hunt script adds up and compares between runs; with ``MPC_LM_REPLAY_AUDIT=DIR`` the parties check every
2-party truncation (:func:`_install_audit`, ``DIR/NAME.json``). Never use this for real data: anyone who knows the
seed can reconstruct everything.

    python benchmarks/replay_party.py party CONFIG --name NAME --result PATH   (launched by outlier_hunt.py)
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import types


def _install_seed(seed: int, name: str) -> None:
    import torch

    from mpc_lm._compat import import_crypten

    crypten = import_crypten()

    counter = itertools.count()

    def urandom(n: int) -> bytes:
        return hashlib.sha256(f"{seed}/{name}/{next(counter)}".encode()).digest()[:n]

    shim = types.ModuleType("os")
    shim.__dict__.update(os.__dict__)
    shim.urandom = urandom
    crypten.os = shim  # crypten._setup_prng reads os.urandom from its module globals
    from mpc_lm import prg

    prg.os = shim  # the dealer's AES keys (mpc_lm/prg.py new_seed)
    torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{name}/torch".encode()).digest()[:7], "big"))


def _install_dump(directory: str, name: str):
    import functools
    import inspect
    from pathlib import Path

    import torch

    from crypten.mpc import MPCTensor
    from mpc_lm import approx, layers

    records: list[tuple[str, torch.Tensor]] = []
    depth = [0]

    def shares(value):
        if isinstance(value, MPCTensor):  # not the offline phase's shape-only dry run
            share = value._tensor.share
            return [] if share.device.type == "meta" else [share.detach().cpu().clone()]
        if isinstance(value, (tuple, list)):
            return [s for v in value for s in shares(v)]
        return []

    def wrap(module, fname, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth[0] += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                depth[0] -= 1
            for i, s in enumerate(shares(out)):
                records.append((f"{'  ' * depth[0]}{module.__name__.split('.')[-1]}.{fname}#{i}", s))
            return out
        return wrapper

    for module in (approx, layers):
        for fname, fn in list(vars(module).items()):
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not inspect.isgeneratorfunction(fn):
                setattr(module, fname, wrap(module, fname, fn))

    def save():
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(records, Path(directory) / f"{name}.pt")

    return save


def _install_audit(directory: str, name: str):
    """Every 2-party truncation (``ArithmeticSharedTensor.div_`` by a public integer, as ``ring.install`` sets it): the parties add up
    their shares before and after it (extra openings, no randomness drawn, so the replay is unchanged), and
    per call site count the elements, the expected failures sum |v| / 2^64 and the actual failures (results
    off by more than 2 units). Selections' own truncations inside ``select_fma`` (exact 0 where not
    selected) are not seen."""
    import json
    from collections import defaultdict
    from pathlib import Path

    from crypten import communicator as comm
    from mpc_lm import offline

    from mpc_lm import ring

    original = ring._div_  # what ring.install() puts on ArithmeticSharedTensor (a shift, else CrypTen's)
    sites: dict = defaultdict(lambda: {"calls": 0, "elements": 0, "expected": 0.0, "failures": 0, "max_abs": 0.0})

    def site() -> str:
        frame, names = sys._getframe(2), []
        while frame is not None and len(names) < 4:
            if "/mpc_lm/" in frame.f_code.co_filename and frame.f_code.co_name not in ("finish_product", "<genexpr>"):
                names.append(frame.f_code.co_name)
            frame = frame.f_back
        return "<".join(names)

    def div_(self, y):
        whole = isinstance(y, int) or (isinstance(y, float) and int(y) == y)
        if not whole or comm.get().get_world_size() != 2 or self.share.device.type == "meta" or offline.planning():
            return original(self, y)
        before = comm.get().all_reduce(self.share.clone())
        out = original(self, y)
        after = comm.get().all_reduce(self.share.clone())
        want = before.div(int(y), rounding_mode="trunc")
        row = sites[site()]
        row["calls"] += 1
        row["elements"] += before.numel()
        row["expected"] += float((before.double().abs() / 2.0**64).sum())
        row["failures"] += int(((after - want).abs() > 2).sum())
        row["max_abs"] = max(row["max_abs"], float(before.double().abs().max()))
        return out

    ring._div_ = div_  # ring.install(), at the party's setup, puts this on ArithmeticSharedTensor

    def save():
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{name}.json").write_text(json.dumps(dict(sites), indent=1))

    return save


def main() -> int:
    name = sys.argv[sys.argv.index("--name") + 1]
    _install_seed(int(os.environ["MPC_LM_REPLAY_SEED"]), name)
    saves = []
    if os.environ.get("MPC_LM_REPLAY_DUMP"):
        saves.append(_install_dump(os.environ["MPC_LM_REPLAY_DUMP"], name))
    if os.environ.get("MPC_LM_REPLAY_AUDIT"):
        saves.append(_install_audit(os.environ["MPC_LM_REPLAY_AUDIT"], name))
    from mpc_lm.cli import main as cli_main

    code = cli_main(sys.argv[1:])
    for save in saves:
        save()
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as mpc_lm.cli's party processes: no native destructors after the results are written
