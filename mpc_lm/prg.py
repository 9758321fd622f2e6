"""The randomness a computing party shares with the dealer: AES-128 in counter mode.

Every Beaver triple, comparison table, bit triple and premasked product's mask is drawn by a
party from a stream it shares with the dealer (the dealer replays it to deal party 0's share of
the correlation; mpc_lm/offline.py, mpc_lm/dealer.py). CrypTen keys those streams with a 64-bit
seed and draws them from torch's generators (the Mersenne Twister on the CPU, whose state follows
from 624 of its outputs). With ``security.prg: aes`` (the default) each stream is the AES-128-CTR
keystream (OpenSSL, AES-NI where the CPU has it) under a 128-bit key drawn from ``os.urandom`` by
the dealer, sent to that party alone (over TLS where the transport is TLS), and derived per device
type: a standard cryptographic PRG, and about four times faster than torch's CPU generator. The
values are made on the CPU and moved to the device that asked for them, so a party and the dealer
draw the same values whatever their devices. ``security.prg: torch`` keeps CrypTen's generators.

Draw semantics (both sides use these functions, so only their agreement matters): a ring element
is 8 keystream bytes read as a little-endian int64; a k-bit value (k < 64) is a ring element's low
k bits, one bit is one keystream byte's low bit.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ._compat import import_crypten

import_crypten()
from crypten.common.rng import generate_kbit_random_tensor as _crypten_kbit  # noqa: E402
from crypten.common.rng import generate_random_ring_element as _crypten_ring  # noqa: E402

#: "aes" (the default) or "torch" (CrypTen's generators), set from ``security.prg`` in every process.
MODE = {"prg": "aes"}

KEY_BYTES = 16
#: Keystream is made this many bytes at a time from a zero block that stays in cache, straight into the tensor.
CHUNK_BYTES = 1 << 18
_ZEROS = memoryview(bytes(CHUNK_BYTES))


class AesStream:
    """One party's stream with the dealer on one device type: AES-128-CTR from counter 0 under ``key``."""

    def __init__(self, key: bytes, device: str | torch.device = "cpu"):
        if len(key) != KEY_BYTES:
            raise ValueError(f"an AES-128 key has {KEY_BYTES} bytes, got {len(key)}")
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self.device = torch.device(device)

    def _fill(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """n values of ``dtype`` (int64 or uint8) read from the next keystream bytes."""
        total = n * dtype.itemsize
        if total <= CHUNK_BYTES:  # one call into a fresh buffer (update_into wants 15 spare bytes at the end)
            buf = bytearray(total + 15)
            self._cipher.update_into(_ZEROS[:total], buf)
            return torch.frombuffer(buf, dtype=dtype, count=n) if n else torch.empty(0, dtype=dtype)
        out = torch.empty(n + 16 // dtype.itemsize, dtype=dtype)
        view = memoryview(out.numpy()).cast("B")
        for start in range(0, total, CHUNK_BYTES):
            size = min(CHUNK_BYTES, total - start)
            self._cipher.update_into(_ZEROS[:size], view[start:start + size + 15])
        return out[:n]

    def ring(self, size, device=None) -> torch.Tensor:
        out = self._fill(math.prod(size), torch.int64).reshape(size)
        return out if device is None or torch.device(device).type == "cpu" else out.to(device)

    def kbit(self, size, bitlength: int, device=None) -> torch.Tensor:
        if bitlength >= 64:
            return self.ring(size, device)
        if bitlength == 1:
            out = (self._fill(math.prod(size), torch.uint8) & 1).long().reshape(size)
        else:
            out = self.ring(size) & ((1 << bitlength) - 1)
        return out if device is None or torch.device(device).type == "cpu" else out.to(device)


def new_seed() -> torch.Tensor:
    """A fresh seed for one party's streams, from the operating system (what the dealer sends that party):
    128 bits as two int64 (AES), or one int64 (torch's generators)."""
    size = KEY_BYTES if MODE["prg"] == "aes" else 8
    return torch.frombuffer(bytearray(os.urandom(size)), dtype=torch.int64).clone().reshape(seed_size())


def seed_size() -> tuple[int, ...]:
    """The shape of a dealer seed on the wire: two int64 (AES) or one (torch's generators)."""
    return (2,) if MODE["prg"] == "aes" else ()


def generators(seed: torch.Tensor) -> tuple:
    """(cpu stream, cuda stream or None) of one party from its seed, alike at the party and the dealer:
    AES-128-CTR keyed per device type, or torch generators seeded with it (``security.prg: torch``)."""
    if MODE["prg"] == "aes":
        return streams(seed)
    value = int(seed.reshape(-1)[0].item())
    cpu = torch.Generator(device="cpu")
    cpu.manual_seed(value)
    cuda = None
    if torch.cuda.is_available():
        cuda = torch.Generator(device="cuda")
        cuda.manual_seed(value)
    return cpu, cuda


def streams(seed: torch.Tensor) -> tuple[AesStream, AesStream | None]:
    """(cpu stream, cuda stream or None) of one party from its 128-bit seed: one key per device type."""
    raw = seed.to(torch.int64).cpu().contiguous().numpy().tobytes()
    if len(raw) != KEY_BYTES:
        raise ValueError(f"a dealer seed has {KEY_BYTES} bytes, got {len(raw)}")

    def key(kind: str) -> bytes:
        return hashlib.sha256(raw + kind.encode()).digest()[:KEY_BYTES]

    cuda = AesStream(key("cuda"), "cuda") if torch.cuda.is_available() else None
    return AesStream(key("cpu"), "cpu"), cuda


# ---------------------------------------------------------------- draws, for either kind of generator


def ring(size, generator=None, device=None) -> torch.Tensor:
    """Uniform ring elements from ``generator``: an :class:`AesStream` or a torch generator (CrypTen's draw)."""
    if isinstance(generator, AesStream):
        return generator.ring(torch.Size(size), device)
    return _crypten_ring(size, generator=generator, device=device)


def kbit(size, bitlength=None, generator=None, device=None) -> torch.Tensor:
    """Uniform ``bitlength``-bit values (64 when None) from ``generator``, as :func:`ring`."""
    if isinstance(generator, AesStream):
        return generator.kbit(torch.Size(size), 64 if bitlength is None else bitlength, device)
    return _crypten_kbit(size, bitlength=bitlength, generator=generator, device=device)


def _as_crypten(t: torch.Tensor):
    """A draw as CrypTen's own generators return it: GPU values wrapped in ``CUDALongTensor``, which CrypTen's
    TTP code multiplies (torch has no int64 matrix product on CUDA)."""
    if not t.is_cuda:
        return t
    from crypten.cuda import CUDALongTensor

    return CUDALongTensor(t)


def _ttp_ring(size, generator=None, device=None):
    return _as_crypten(ring(size, generator=generator, device=device))


def _ttp_kbit(size, bitlength=None, generator=None, device=None):
    return _as_crypten(kbit(size, bitlength=bitlength, generator=generator, device=device))


def install() -> None:
    """Make CrypTen's TTP provider and server draw through :func:`ring` / :func:`kbit` (idempotent), with
    CrypTen's types on the GPU (:func:`_as_crypten`)."""
    from crypten.mpc.provider import ttp_provider

    ttp_provider.generate_random_ring_element = _ttp_ring
    ttp_provider.generate_kbit_random_tensor = _ttp_kbit


def describe(generator) -> str:
    """What a dealer stream is, for the party's report: ``aes-128-ctr`` or ``torch-<device type>``."""
    if isinstance(generator, AesStream):
        return "aes-128-ctr"
    return f"torch-{generator.device.type}" if isinstance(generator, torch.Generator) else "none"


def stream_from(elements: torch.Tensor, device) -> "AesStream | torch.Generator":
    """A second stream seeded from ``elements`` (two ring elements drawn from a dealer stream, which the
    dealer draws alike): an :class:`AesStream` keyed by them, or a torch generator seeded by the first."""
    flat = elements.reshape(-1).to(torch.int64).cpu()
    kind = torch.device(device if device is not None else "cpu").type
    if MODE["prg"] == "aes":
        return AesStream(hashlib.sha256(flat.numpy().tobytes() + b"mask").digest()[:KEY_BYTES], kind)
    gen = torch.Generator(device=kind)
    gen.manual_seed(int(flat[0].item()))
    return gen
