"""Will the job fit? Device checks and a memory estimate made before any work starts.

The estimate is deliberately simple and errs high: every secret value is an
int64 share (8 bytes); a Beaver multiplication holds its operands, the triple
(a, b, c) and the masked openings at once (x5 the larger operand); the peak
is the weights plus the largest of the one-hot embedding product, the
attention score tensor and the feed-forward activations.
"""

from __future__ import annotations

import torch

from .errors import ResourceError

SHARE_BYTES = 8
BEAVER_FACTOR = 5


def check_device(device: torch.device, party: str) -> None:
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ResourceError(
            f"party {party!r} is configured with device {str(device)!r} but this host has no usable "
            "CUDA device (torch.cuda.is_available() is False); set its device to cpu or run it on a GPU host"
        )
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ResourceError(
            f"party {party!r} asks for {str(device)!r} but this host has {torch.cuda.device_count()} "
            f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:  # MemAvailable counts reclaimable page cache; "free" pages would not
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # not Linux: no check


def encoder_inference_bytes(n_params: int, batch: int, seq: int, vocab: int, heads: int,
                            hidden: int, intermediate: int) -> int:
    weights = n_params * SHARE_BYTES
    one_hot = batch * seq * vocab + vocab * hidden
    scores = batch * heads * seq * seq * 4  # scores, shifted, exp, probabilities
    ffn = batch * seq * intermediate * 3
    return weights + max(one_hot, scores, ffn) * SHARE_BYTES * BEAVER_FACTOR


def check_fits(need: int, device: torch.device, party: str, what: str) -> None:
    have = available_bytes(device)
    if need > have:
        raise ResourceError(
            f"{what} needs about {need / 2**30:.1f} GiB on {party!r}'s device {str(device)!r} but only "
            f"{have / 2**30:.1f} GiB is free: lower job.batch_size or job.seq_len, or give the "
            "party a device with more memory"
        )
