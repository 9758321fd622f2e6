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

In the same way every secret tensor CrypTen makes without an explicit precision reads
``cfg.encoder.precision_bits`` (``FixedPointEncoder()``: ~20 us), and every Beaver product
``cfg.mpc.provider``, and the truncation ``cfg.debug.validation_mode``: together ~13 % of the samples of a
GPT-2 generation step's forward pass (docs/performance.md, lever 27).
:func:`fix_party_settings` (called by a party process once its settings are in place) answers them
from the values read at that moment while CrypTen's config object is the one it was then; a
``temp_override`` (a new config object) goes back to the lookups.

CrypTen makes the result of every operator on a secret tensor (``x + y``, ``x[i]``, ``x.view``,
``clone``, ``from_shares``) by constructing ``MPCTensor([])``: that encodes an empty plaintext and draws
an empty pseudo-random zero sharing, eight tensor operations, all thrown away when the real share is
put in. A BERT-base forward made 4,257 of them per party (docs/performance.md, lever 32).
:func:`_light_copies` makes the same objects directly: the same attributes, the same share tensor
objects, no draws (an empty draw consumes no randomness, so the parties' generators stay where
they were). :func:`_results_without_copies` likewise drops the copy of the share CrypTen makes and throws
away for every ``x + y``, ``x - y`` and ``x * public`` (docs/performance.md, lever 34).
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
    _light_copies(crypten)
    _results_without_copies(crypten)
    return crypten


def _results_without_copies(crypten) -> None:
    """CrypTen's ``x + y``, ``x - y`` and ``x * public`` on arithmetic shares without the copy it throws away.

    ``ArithmeticSharedTensor._arithmetic_function`` starts a result that is not in place with
    ``self.clone()`` (a copy of the share) and then, for these operators, replaces the share with a new
    tensor (``share.add(y)``, ``torch.mul(share, y)``): the copy is never used. Here the result starts as a
    shallow copy and gets the same new tensor, so it never shares storage with ``self``. Every other case
    (in place, a secret product, operands of different scales, party 1's share of ``x + public``, which
    is the copy itself) is CrypTen's own code (docs/performance.md, lever 34)."""
    import torch
    from crypten.common.tensor_types import is_tensor
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

    original = ArithmeticSharedTensor.__dict__["_arithmetic_function"]
    if getattr(original, "_mpc_lm", False):
        return

    def _arithmetic_function(self, y, op, inplace=False, *args, **kwargs):
        if not inplace and not args and not kwargs and op in ("add", "sub", "mul"):
            if isinstance(y, (int, float)) or is_tensor(y):  # a public operand
                if op != "mul" and self.rank != 0:
                    return original(self, y, op, inplace)
                result = self.shallow_copy()
                y = result.encoder.encode(y, device=self.device)
                if op == "mul":
                    result.share = torch.mul(self.share, y)
                    if self.encoder.scale > 1:
                        return result.div_(result.encoder.scale)
                    return result
                result.share = getattr(self.share, op)(y)
                return result
            if op != "mul" and isinstance(y, ArithmeticSharedTensor) and self.encoder.scale == y.encoder.scale:
                result = self.shallow_copy()
                result.share = getattr(self.share, op)(y.share)
                return result
        return original(self, y, op, inplace, *args, **kwargs)

    _arithmetic_function._mpc_lm = True
    ArithmeticSharedTensor._arithmetic_function = _arithmetic_function


def _light_copies(crypten) -> None:
    """``MPCTensor.shallow_copy``, ``clone`` and ``from_shares`` without CrypTen's throw-away
    ``MPCTensor([])`` (see above): a fresh object with ``CrypTensor``'s own initial state, then the
    same assignments CrypTen's methods make."""
    mpc_tensor, base = crypten.mpc.MPCTensor, crypten.CrypTensor
    ptypes = crypten.mpc.ptype

    def blank(ptype):
        result = object.__new__(mpc_tensor)
        base.__init__(result, requires_grad=False)
        result.ptype = ptype
        return result

    def shallow_copy(self):
        result = blank(self.ptype)
        result._tensor = self._tensor
        return result

    def clone(self):
        result = blank(self.ptype)
        result._tensor = self._tensor.clone()
        return result

    def from_shares(share, precision=None, ptype=ptypes.arithmetic):
        result = blank(ptype)
        result._tensor = ptype.to_tensor().from_shares(share, precision=precision)
        return result

    mpc_tensor.shallow_copy, mpc_tensor.clone = shallow_copy, clone
    mpc_tensor.from_shares = staticmethod(from_shares)


def _direct_attributes(crypten) -> None:
    """``CrypTensor.__getattribute__`` without CrypTen's validation-mode wrapper (see above)."""
    cls = crypten.CrypTensor
    wrapped = getattr(cls.__dict__["__getattribute__"], "__wrapped__", None)
    if wrapped is not None and not crypten.cfg.debug.validation_mode:
        cls.__getattribute__ = wrapped


_ORIGINAL: dict = {}
_FIXED: dict = {}  # what fix_party_settings read, and the config object it read it from


def fix_party_settings(crypten) -> None:
    """Answer CrypTen's default precision and provider lookups, and :func:`validation_mode`, from the
    current config (see above). For party processes, whose settings are fixed at start-up
    (``runtime._configure_crypten``); they must not be changed in place afterwards (mpc_lm never does)."""
    from crypten import encoder as encoder_module
    from crypten.config import cfg

    lookup = _ORIGINAL.setdefault("get_default_provider", crypten.mpc.get_default_provider)
    _FIXED.update(cfg=cfg, config=cfg.config, bits=cfg.encoder.precision_bits, provider=lookup(),
                  validation=cfg.debug.validation_mode)

    def __init__(self, precision_bits=None):
        if precision_bits is None:
            precision_bits = _FIXED["bits"] if cfg.config is _FIXED["config"] else cfg.encoder.precision_bits
        self._precision_bits = precision_bits
        self._scale = int(2**precision_bits)

    def get_default_provider():
        return _FIXED["provider"] if cfg.config is _FIXED["config"] else lookup()

    encoder_module.FixedPointEncoder.__init__ = __init__
    crypten.mpc.get_default_provider = get_default_provider


def validation_mode() -> bool:
    """CrypTen's ``cfg.debug.validation_mode``, without the lookup in a party process (:func:`fix_party_settings`)."""
    if _FIXED and _FIXED["cfg"].config is _FIXED["config"]:
        return _FIXED["validation"]
    from crypten.config import cfg

    return cfg.debug.validation_mode


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


def plain_rings(items: list) -> tuple[list, list]:
    """(the items as plain tensors, which of them were CrypTen's ``CUDALongTensor``), for a transport."""
    import torch

    wrapped = [not torch.is_tensor(t) and hasattr(t, "tensor") for t in items]
    return [t.tensor() if w else t for t, w in zip(items, wrapped)], wrapped


def wrap_rings(results: list, wrapped: list) -> list:
    """``results`` wrapped back as CrypTen's ``CUDALongTensor`` where :func:`plain_rings` unwrapped them."""
    if not any(wrapped):
        return results
    from crypten.cuda import CUDALongTensor

    return [CUDALongTensor(r) if w else r for r, w in zip(results, wrapped)]
