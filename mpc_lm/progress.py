"""Progress of long runs, shown by the parties allowed to see it.

A party reports progress with :func:`reporter`. Under ``mpc-lm launch`` the
launcher sets ``MPC_LM_PROGRESS_DIR`` and draws one bar per reporting party
from the small JSON files written there; a party started on its own
(``mpc-lm party``) draws a tqdm bar on its stderr instead. Only counts that
are public anyway (texts, batches, steps) are reported.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "MPC_LM_PROGRESS_DIR"


class _FileReporter:
    def __init__(self, path: Path, total: int, desc: str):
        self.path, self.total, self.desc, self.done, self.extra = path, total, desc, 0, {}
        self._write()

    def update(self, n: int = 1, **extra) -> None:
        self.done += n
        self.extra.update(extra)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"desc": self.desc, "done": self.done, "total": self.total,
                                   "time": time.time(), **self.extra}))
        tmp.replace(self.path)

    def close(self) -> None:
        pass


class _TqdmReporter:
    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="text", leave=True)

    def update(self, n: int = 1, **extra) -> None:
        if extra:
            self.bar.set_postfix(extra)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def reporter(party: str, total: int, desc: str):
    directory = os.environ.get(ENV)
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return _FileReporter(Path(directory) / f"{party}.json", total, desc)
    return _TqdmReporter(total, desc)


def read_all(directory: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out
