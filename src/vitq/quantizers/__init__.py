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


def _log_softmax_by_bits(bits: int, granularity: str, num_heads: int, options: dict) -> LogQuantizer:
    """Base sqrt2 from 4 bits, base 2 below. The 2^b - 1 nonzero codes of a base-sqrt2 grid reach
    down to 2^-(2^b - 2)/2 of its scale: 1/128 at 4 bits, but 1/8 at 3, where most attention
    probabilities fall below the grid and become 0 (benchmarks/error_sources.md)."""
    return _log_softmax("sqrt2" if bits is not None and bits >= 4 else "2")(bits, granularity, num_heads, options)


register_softmax_quantizer("uniform", _uniform_softmax)
register_softmax_quantizer("log2", _log_softmax("2"))
register_softmax_quantizer("logsqrt2", _log_softmax("sqrt2"))
register_softmax_quantizer("log", _log_softmax_by_bits)

__all__ = [
    "GRANULARITIES", "OFF_BITS", "SOFTMAX_QUANTIZERS", "AdaRoundQuantizer", "AffineQuantizer", "IntegerView",
    "LogQuantizer", "Quantizer", "UniformQuantizer", "bits_enabled", "register_softmax_quantizer", "round_ste",
    "softmax_quantizer_names", "validate_bits",
]
