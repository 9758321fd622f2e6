"""Which function a computing party runs for each ``job.kind`` of the config.

A job is ``run(ctx: PartyContext) -> dict`` (the party's own measurements,
JSON-serialisable). The dealer never runs a job: it serves randomness.
"""

from __future__ import annotations

from typing import Callable


def _infer(ctx):
    from . import infer

    return infer.run(ctx)


def _train(ctx):
    from . import train

    return train.run(ctx)


def _causal(ctx):
    from . import causal_job

    return causal_job.run(ctx)


JOBS: dict[str, Callable] = {
    "score": _causal,
    "generate": _causal,
    "classify": _infer,
    "embed": _infer,
    "train": _train,
}


def job_for(kind: str) -> Callable:
    try:
        return JOBS[kind]
    except KeyError:
        raise ValueError(f"no job registered for job.kind {kind!r}; known: {sorted(JOBS)}") from None
