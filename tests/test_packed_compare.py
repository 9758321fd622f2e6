"""The packed 32-bit comparison (approx.comparison: packed32) in a real 2-party world.

Two processes over loopback (CrypTen's multiprocess launcher, TFP triples: the
circuit's arithmetic is what is tested here; the dealer path is tested by the
encoder runs in test_inference.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mpc_lm import approx
from mpc_lm._compat import import_crypten

crypten = import_crypten()


def _values():
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(997, generator=g) * 50, torch.tensor([0.0, -0.0, 2**-16, -(2**-16), 32767.0,
                                                                      -32767.0, 1e-3, -1e-3, 4.0, -4.0])])
    return x.reshape(-1, 7) if x.numel() % 7 == 0 else x


@crypten.mpc.run_multiprocess(world_size=2)
def _packed_world():
    approx.COMPARISON["method"] = "packed32"
    x = _values()
    enc = crypten.cryptensor(x)
    got = approx.ge0(enc).get_plain_text()
    want = (x >= 0).float()
    bad = int((got != want).sum())
    relu = approx.relu(enc).get_plain_text()
    relu_err = float((relu - torch.relu(x)).abs().max())
    m = approx.row_max(crypten.cryptensor(x[:1000].reshape(10, 100)), 4).get_plain_text()
    max_err = float((m - x[:1000].reshape(10, 100).max(-1, keepdim=True).values).abs().max())
    return bad, relu_err, max_err


def test_packed_comparison_is_exact_in_range():
    # a fresh interpreter: CrypTen's launcher forks, which must not inherit another module's world
    code = "import json, test_packed_compare as t; print(json.dumps(t._packed_world()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr[-3000:]
    for bad, relu_err, max_err in json.loads(out.stdout.strip().splitlines()[-1]):
        assert bad == 0
        assert relu_err < 2**-15
        assert max_err < 1e-3
