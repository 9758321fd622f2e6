"""Plaintext references for the causal LM jobs (tests, ``mpc-lm generate/score`` reports).

The same texts, tokenised and truncated the same way, through the HF model
WITHOUT padding (the secure run's left padding and positions reproduce the
unpadded computation exactly, apart from the approximations).
"""

from __future__ import annotations

import math

import torch

from . import approx_causal
from .causal_job import load_hf_causal, load_tokenizer, tokenize_left
from .config import Generation, ModelSpec


def _unpadded(spec: ModelSpec, texts: list[str], seq_len: int, truncate: bool, keep: str) -> list[list[int]]:
    batch = tokenize_left(load_tokenizer(spec), texts, seq_len, truncate, keep, "texts")
    return [batch.ids[i, seq_len - n:].tolist() for i, n in enumerate(batch.lengths)]


def score(spec: ModelSpec, texts: list[str], seq_len: int, truncate: bool = False, model=None) -> list[dict]:
    """Per text: token log-probs (tokens 1..L-1), logits (L, V), nll, perplexity."""
    model = model or load_hf_causal(spec)
    out = []
    with torch.no_grad():
        for ids in _unpadded(spec, texts, seq_len, truncate, "start"):
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0].float()
            lp = torch.log_softmax(logits, -1)[:-1].gather(-1, x[0, 1:, None])[:, 0]
            nll = -lp.mean().item() if lp.numel() else 0.0
            out.append({"tokens": ids, "token_logprobs": lp.tolist(), "logits": logits,
                        "nll": nll, "perplexity": math.exp(nll)})
    return out


def generate(spec: ModelSpec, texts: list[str], seq_len: int, gen: Generation, world_size: int,
             truncate: bool = False, batch_size: int = 1, model=None) -> list[list[int]]:
    """The plaintext twin of the secure decoding: greedy, or Gumbel-max sampling with the SAME
    noise when ``gen.seed`` is set (each party's draw regenerated from the public seed)."""
    if gen.strategy == "sample" and gen.seed is None:
        raise ValueError("a plaintext twin of sampling needs job.generate.seed")
    model = model or load_hf_causal(spec)
    results = []
    with torch.no_grad():
        for i, ids in enumerate(_unpadded(spec, texts, seq_len, truncate, "end")):
            step0 = (i // batch_size) * gen.max_new_tokens
            row = i % batch_size
            x = torch.tensor([ids])
            out = model(input_ids=x, use_cache=True)
            past, chosen = out.past_key_values, []
            logits = out.logits[0, -1].float()
            for s in range(gen.max_new_tokens):
                if gen.strategy == "greedy":
                    nxt = int(logits.argmax())
                else:
                    noise = None
                    for rank in range(world_size):
                        g = approx_causal.local_gumbel((batch_size, logits.numel()),
                                                       approx_causal.party_generator(gen.seed, rank, step0 + s),
                                                       world_size)[row]
                        noise = g if noise is None else torch.maximum(noise, g)
                    scores = logits / gen.temperature + noise
                    if gen.top_k and gen.top_k < logits.numel():
                        keep = torch.zeros_like(logits, dtype=torch.bool)
                        keep[logits.topk(gen.top_k).indices] = True
                        scores = torch.where(keep, scores, scores - approx_causal.TOPK_DROP)
                    nxt = int(scores.argmax())
                chosen.append(nxt)
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1].float()
            results.append(chosen)
    return results
