"""What each party receives and holds: nothing it is not entitled to.

A real 2-party + dealer run with the audit instrument on (MPC_LM_AUDIT_DIR):
every party records each tensor and object it receives over the wire, and a
snapshot of every tensor alive in its process right after the last forward
(docs/security.md). Then:

* every tensor a computing party received is uniformly random: either on the
  64-bit ring (a plaintext or fixed-point value is small, |v| < 2^48; a random
  ring element is that small with probability 2^-15), or, for the one-bit
  openings of CrypTen's binary-to-arithmetic conversion (x XOR r for a
  random bit r), a fair coin per entry;
* the objects received are the public metadata only (architecture, counts);
* the model owner's process never holds the token ids or the logits;
* the data owner's process never holds a weight of the model.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TEXTS, write_config
from mpc_lm.config import load_config
from mpc_lm.launch import launch
from mpc_lm.reference import plaintext_outputs

SMALL = 2 ** 48


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("audit")
    cfg_path = write_config(tmp, tiny_models["bert"])
    run = launch(cfg_path, extra_env={"MPC_LM_AUDIT_DIR": str(tmp / "audit")})
    audit = {name: torch.load(tmp / "audit" / f"{name}.pt", weights_only=False)
             for name in ("vendor", "hospital", "dealer")}
    return run, load_config(cfg_path), audit


def test_dealer_streams_are_aes_by_default(audited):
    """Every party's streams shared with the dealer are AES-128-CTR under a fresh 128-bit key per party
    (security.prg: aes; mpc_lm/prg.py), read from the stream objects each process drew from."""
    run, _, _ = audited
    assert {name: run.results[name]["dealer_streams"] for name in ("vendor", "hospital", "dealer")} == \
        {"vendor": "aes-128-ctr", "hospital": "aes-128-ctr", "dealer": "aes-128-ctr"}


def _is_bits(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


@pytest.mark.parametrize("party", ["vendor", "hospital"])
def test_everything_received_looks_random(audited, party):
    _, _, audit = audited
    received = [t for t in audit[party]["received"] if t.dtype == torch.int64 and t.numel() >= 64]
    assert received, "the audit recorded nothing"
    ring = [t for t in received if not _is_bits(t)]
    bits = [t for t in received if _is_bits(t)]
    assert sum(t.numel() for t in ring) > 10_000
    # A random ring element is small with probability 2^-15: allow 2 per tensor plus 1 per
    # thousand entries (a plaintext tensor of 3 or more entries fails), and pool them all.
    for t in ring:
        small = int((t.abs() < SMALL).sum())
        assert small <= 2 + t.numel() // 1000, f"{party} received {tuple(t.shape)} with {small} small entries"
    pooled = sum(int((t.abs() < SMALL).sum()) for t in ring) / sum(t.numel() for t in ring)
    assert pooled < 1e-4, f"{party}: {pooled:.2e} of received ring elements are small (random: 3e-5)"
    # masked bits mostly travel packed 64 per word (checked above with the ring elements: a word of
    # fair coins is a uniform 64-bit value); any opened one bit per element must be a fair coin
    for t in bits:  # each within 6 standard deviations of 1/2
        assert abs(t.float().mean().item() - 0.5) < 6 * 0.5 / t.numel() ** 0.5
    if bits:
        pooled = torch.cat([t.flatten() for t in bits]).float()
        assert abs(pooled.mean().item() - 0.5) < 6 * 0.5 / pooled.numel() ** 0.5


def test_objects_received_are_public_metadata(audited):
    _, _, audit = audited
    for party in ("vendor", "hospital"):
        for text in audit[party]["objects"]:
            for secret in TEXTS:
                assert secret[:20] not in text


def test_model_owner_never_holds_ids_or_outputs(audited, tiny_models):
    _, cfg, audit = audited
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))
    ids = tok(TEXTS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    logits = plaintext_outputs(cfg.model, TEXTS, 16)
    for t in audit["vendor"]["held"]:
        if t.shape == ids.shape:
            assert not torch.equal(t.long(), ids)
        if t.is_floating_point() and t.shape == logits.shape:
            assert not torch.allclose(t, logits, atol=0.05)
    # the data owner does hold them (sanity check of the instrument itself)
    assert any(t.shape == ids.shape and torch.equal(t.long(), ids) for t in audit["hospital"]["held"])
    assert any(t.is_floating_point() and t.shape == logits.shape and torch.allclose(t, logits, atol=0.05)
               for t in audit["hospital"]["held"])


def test_data_owner_never_holds_weights(audited, tiny_models):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]))
    weights = [w.detach() for w in model.state_dict().values() if w.numel() >= 32]
    _, _, audit = audited
    for t in audit["hospital"]["held"] + audit["dealer"]["held"]:
        if not t.is_floating_point():
            continue
        for w in weights:
            if t.shape == w.shape or (t.dim() == 2 and t.shape == w.t().shape):
                candidate = t if t.shape == w.shape else t.t()
                assert not torch.allclose(candidate, w, atol=1e-3), "a plaintext weight reached a non-owner"


def test_dealer_receives_only_requests(audited):
    _, _, audit = audited
    for text in audit["dealer"]["objects"]:
        assert text == "'terminate'" or "'function'" in text


def test_weight_masks_are_opened_among_computing_parties_only(audited):
    """Each weight's mask is opened once (mpc_lm/premask.py): both computing parties hold the
    same opened ``E = W - B``, random-looking; the dealer holds ``B`` but never ``E``.

    The instrument finds each ``E`` as a tensor both computing parties hold identically, and
    proves it is one by the identity ``E + B = w0 + w1`` with ``B`` from the dealer's memory
    and ``w0``, ``w1`` the parties' shares of the weight."""
    _, _, audit = audited

    def by_shape(tensors):
        out: dict = {}
        for t in tensors:
            if t.dtype == torch.int64 and t.dim() == 2 and t.numel() >= 64:
                out.setdefault(tuple(t.shape), []).append(t.contiguous())
        return out

    vendor, hospital, dealer = (by_shape(audit[p]["held"]) for p in ("vendor", "hospital", "dealer"))
    opened = []
    for shape, ts in vendor.items():
        for e in ts:
            if any(torch.equal(e, h) for h in hospital.get(shape, [])):
                opened.append(e)
    proven = 0
    for e in opened:
        shape = tuple(e.shape)
        assert int((e.abs() < SMALL).sum()) <= 2 + e.numel() // 1000, f"opened {shape} does not look random"
        assert not any(torch.equal(e, d) for d in dealer.get(shape, [])), "the dealer holds an opened W - B"
        hospital_keys = {h.numpy().tobytes() for h in hospital.get(shape, [])}
        if any((e + b - w0).numpy().tobytes() in hospital_keys
               for b in dealer.get(shape, []) for w0 in vendor.get(shape, [])):
            proven += 1
    # tiny BERT: fused QKV, attention output, FF1, FF2 per layer (2 layers), the embedding
    # table, the pooler and the classifier: 11 matrices
    assert proven >= 11, f"found {proven} opened weight masks, expected 11"
