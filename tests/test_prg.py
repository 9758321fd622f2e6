"""The streams a computing party shares with the dealer (mpc_lm/prg.py): AES-128-CTR, drawn alike by both."""

from __future__ import annotations

import torch

from mpc_lm import prg


def test_same_key_same_draws_in_any_split():
    a, b = prg.AesStream(bytes(range(16))), prg.AesStream(bytes(range(16)))
    whole = prg.ring((1000,), a)
    parts = torch.cat([prg.ring((1,), b), prg.ring((2, 3), b).reshape(-1), prg.ring((993,), b)])
    assert torch.equal(whole, parts)
    assert not torch.equal(prg.ring((8,), prg.AesStream(bytes(16))), prg.ring((8,), prg.AesStream(bytes(15) + b"\1")))


def test_draws_match_the_aes_ctr_keystream():
    """A ring element is 8 keystream bytes, little-endian: the first is AES_k(counter 0)'s first half."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(16))
    block = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(bytes(16))
    first = prg.ring((2,), prg.AesStream(key))
    assert first.tolist() == [int.from_bytes(block[:8], "little", signed=True),
                              int.from_bytes(block[8:], "little", signed=True)]


def test_uniform_ring_elements_bits_and_k_bit_values():
    s = prg.AesStream(bytes(16))
    x = prg.ring((200_000,), s)
    assert x.dtype == torch.long and abs((x < 0).float().mean().item() - 0.5) < 0.01
    for bit in range(64):  # every bit position a fair coin
        assert abs(((x >> bit) & 1).float().mean().item() - 0.5) < 0.01
    b = prg.kbit((100_000,), 1, s)
    assert set(b.unique().tolist()) == {0, 1} and abs(b.float().mean().item() - 0.5) < 0.01
    k = prg.kbit((100_000,), 20, s)
    assert k.min() >= 0 and k.max() < 2**20 and k.max() > 2**19
    assert prg.kbit((4,), None, s).dtype == torch.long and prg.ring((0,), s).numel() == 0


def test_a_party_and_the_dealer_derive_the_same_streams_per_device_type():
    seed = prg.new_seed()
    assert seed.shape == (2,) and seed.dtype == torch.long
    (party_cpu, _), (dealer_cpu, _) = prg.streams(seed), prg.streams(seed.clone())
    assert torch.equal(prg.ring((64,), party_cpu), prg.ring((64,), dealer_cpu))
    other, _ = prg.streams(prg.new_seed())
    assert not torch.equal(prg.ring((4,), prg.streams(seed)[0]), prg.ring((4,), other))
    # the mask stream seeded from two drawn elements, alike on both sides
    elements = prg.ring((2,), prg.streams(seed)[0])
    assert torch.equal(prg.ring((16,), prg.stream_from(elements, "cpu")), prg.ring((16,), prg.stream_from(elements, None)))


def test_torch_generators_keep_crypten_draws():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    from crypten.common.rng import generate_random_ring_element

    assert torch.equal(prg.ring((10,), g1), generate_random_ring_element((10,), generator=g2))
    assert prg.describe(g1) == "torch-cpu" and prg.describe(prg.AesStream(bytes(16))) == "aes-128-ctr"
