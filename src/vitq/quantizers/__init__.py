"""Fake quantizers behind one interface (:class:`~vitq.quantizers.base.Quantizer`).

* :mod:`.base`: the interface, :class:`IntegerView`, bit-width checks, the post-softmax registry;
* :mod:`.uniform`: :class:`UniformQuantizer` (asym/sym; per tensor, channel, head, token);
* :mod:`.log`: :class:`LogQuantizer` (log2 / log-sqrt2);
* :mod:`.adaround`: :class:`AdaRoundQuantizer` (learned weight rounding).
"""

from .adaround import AdaRoundQuantizer
from .base import (OFF_BITS, SOFTMAX_QUANTIZERS, IntegerView, Quantizer, bits_enabled, register_softmax_quantizer,
                   round_ste, softmax_quantizer_names, validate_bits)
from .log import LogQuantizer
from .uniform import GRANULARITIES, AffineQuantizer, UniformQuantizer


def _uniform_softmax(bits: int, granularity: str, num_heads: int, options: dict) -> UniformQuantizer:
    return UniformQuantizer(bits, symmetric=False, granularity=granularity, axis=1 if granularity == "head" else None)


def _log_softmax(base: str):
    def make(bits: int, granularity: str, num_heads: int, options: dict) -> LogQuantizer:
        return LogQuantizer(bits, base=base, granularity=granularity, axis=1 if granularity == "head" else None)
    return make


register_softmax_quantizer("uniform", _uniform_softmax)
register_softmax_quantizer("log2", _log_softmax("2"))
register_softmax_quantizer("logsqrt2", _log_softmax("sqrt2"))

__all__ = [
    "GRANULARITIES", "OFF_BITS", "SOFTMAX_QUANTIZERS", "AdaRoundQuantizer", "AffineQuantizer", "IntegerView",
    "LogQuantizer", "Quantizer", "UniformQuantizer", "bits_enabled", "register_softmax_quantizer", "round_ste",
    "softmax_quantizer_names", "validate_bits",
]
