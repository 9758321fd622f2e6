"""Worker entry: ``python -m mpc_lm.bench.plain_multi SPEC STEP[,STEP...] WORK`` (see :mod:`.plain`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import plain

    spec_path, steps, work = argv
    spec = json.loads(Path(spec_path).read_text())
    for step in steps.split(","):
        result = plain.STEPS[step](spec)
        (Path(work) / f"{step}.result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
