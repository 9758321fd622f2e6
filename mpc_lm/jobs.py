"""Which function a computing party runs for each ``job.kind`` of the config.

A job is ``run(ctx: PartyContext) -> dict`` (the party's own measurements,
JSON-serialisable). The dealer never runs a job: it serves randomness.
"""

from __future__ import annotations

from typing import Callable


def _infer(ctx):
    from . import infer

    return infer.run(ctx)


JOBS: dict[str, Callable] = {
    "classify": _infer,
    "embed": _infer,
}


def job_for(kind: str) -> Callable:
    try:
        return JOBS[kind]
    except KeyError:
        raise ValueError(f"no job registered for job.kind {kind!r}; known: {sorted(JOBS)}") from None
