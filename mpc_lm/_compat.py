"""Make CrypTen 0.4.1 importable on current torch (2.1 and later).

Import this module before ``crypten``; every mpc_lm module that needs CrypTen
does so through :func:`import_crypten`.

Why: ``crypten/nn/onnx_converter.py`` imports ``torch.onnx.symbolic_registry``
and, failing that, ``torch.onnx._internal.registration``. Neither exists in
torch 2.11-2.13, so ``import crypten`` raises ``ModuleNotFoundError``. Only the
ONNX converter (``crypten.nn.from_pytorch`` / ``from_onnx``) uses that registry;
mpc_lm builds its secure models directly and never calls the converter. A
stand-in module under the second name lets the import succeed; calling the
converter afterwards fails loudly instead of silently doing the wrong thing.

CrypTen also defines ``__torch_function__`` as a plain method, which torch
reports with a ``DeprecationWarning`` on every process; it is filtered here.

CrypTen's ``FixedPointEncoder.decode`` divides negative values by ``scale - 1``
(floor) and adds the remainder modulo ``scale``: a revealed value within
k * 2^-16 above a negative integer -k (e.g. -3.99997) decodes 1.0 too low.
:func:`_exact_decode` replaces it with :func:`decode_fixed` (the one decoder
mpc_lm uses, also for its own openings: ``mpc_lm.reveal``), so every revealed
output is the exact ring value.

CrypTen wraps ``CrypTensor.__getattribute__`` so that every attribute read of every
secret tensor (``x._tensor``, ``x.size``, each method) first reads
``cfg.debug.validation_mode`` from its OmegaConf config, a few microseconds each:
about a tenth of BERT-base's online phase went to that one lookup
(docs/performance.md, lever 17). mpc_lm never runs CrypTen's validation mode, so
:func:`_direct_attributes` puts back the function the wrapper wraps (unless the mode
is on when CrypTen is imported).
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

_STANDIN = "torch.onnx._internal.registration"


class _UnavailableRegistry:
    """Stand-in for torch's ONNX symbolic registry (gone in torch >= 2.1)."""

    def __getattr__(self, name):
        raise RuntimeError(
            "CrypTen's ONNX converter (crypten.nn.from_pytorch/from_onnx) does not "
            "work on this torch version; mpc_lm converts Hugging Face models itself "
            "(see mpc_lm.convert)."
        )


def _install_standin() -> None:
    try:
        importlib.import_module(_STANDIN)
        return
    except ImportError:
        pass
    module = types.ModuleType(_STANDIN)
    module.registry = _UnavailableRegistry()
    sys.modules[_STANDIN] = module


def import_crypten():
    """Return the ``crypten`` module, importable on torch 2.1+."""
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
    _install_standin()
    warnings.filterwarnings("ignore", message=".*__torch_function__.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="crypten")
    try:
        import crypten  # noqa: PLC0415  (deliberately late: the stand-in must exist first)
    except ImportError as err:
        if getattr(err, "name", None) != "crypten":
            raise
        raise ImportError(
            "CrypTen is not installed. Its PyPI metadata does not install on current torch; "
            "run 'bash install.sh' (it runs pip install --no-deps crypten==0.4.1)."
        ) from None

    crypten.encoder.FixedPointEncoder.decode = _exact_decode
    _direct_attributes(crypten)
    return crypten


def _direct_attributes(crypten) -> None:
    """``CrypTensor.__getattribute__`` without CrypTen's validation-mode wrapper (see above)."""
    cls = crypten.CrypTensor
    wrapped = getattr(cls.__dict__["__getattribute__"], "__wrapped__", None)
    if wrapped is not None and not crypten.cfg.debug.validation_mode:
        cls.__getattribute__ = wrapped


def decode_fixed(raw, scale: int):
    """Exact fixed-point decoding of a ring tensor (float32 result; scale 1: the integers).

    On a GPU CrypTen holds ring values as ``CUDALongTensor``, whose ``/`` is an
    integer division (it would drop the fraction): unwrap to a plain tensor first.
    """
    raw = plain_ring(raw)
    return (raw.double() / scale).float() if scale > 1 else raw


def _exact_decode(self, tensor):
    """``FixedPointEncoder.decode`` by :func:`decode_fixed` (CrypTen 0.4.1's is off by -1.0 just
    above negative integers)."""
    return None if tensor is None else decode_fixed(tensor, self._scale).data


def plain_ring(t):
    """A plain torch tensor of ring elements: CrypTen wraps GPU ring tensors in ``CUDALongTensor``
    (whose ``/`` is an integer division and which many torch functions do not accept)."""
    import torch

    return t if torch.is_tensor(t) else t.tensor()
