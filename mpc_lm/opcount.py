"""How many tensor operations a party dispatches in an online phase (a diagnostic, off by default).

With ``MPC_LM_OP_COUNT=DIR`` in a party's environment (party processes inherit it from ``mpc-lm launch``
or ``mpc-lm bench``), every computation run through :func:`mpc_lm.offline.run` counts the aten operations
of its online phase and writes them to ``DIR/ops-<rank>-<pid>-<n>.json`` (``{"total": ..., "ops": {name:
count}}``). On a GPU each is a kernel launch or a host-device step, a few microseconds even for an empty
tensor; on the CPU each costs torch's dispatch. docs/performance.md (lever 32) has the counts.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

ENV = "MPC_LM_OP_COUNT"
_RUNS = itertools.count(1)


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(rank: int):
    """Count the operations of the ``with`` block into ``$MPC_LM_OP_COUNT`` (nothing when it is unset)."""
    where = os.environ.get(ENV)
    if not where:
        yield None
        return
    counter = OpCounter()
    with counter:
        yield counter
    path = Path(where) / f"ops-{rank}-{os.getpid()}-{next(_RUNS)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"total": sum(counter.counts.values()),
                                "ops": dict(counter.counts.most_common())}, indent=1) + "\n")
