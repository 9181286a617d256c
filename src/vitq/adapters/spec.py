"""What :func:`vitq.adapters.prepare` builds: :class:`QuantSpec` and the quantizer factories.

Every family file makes its quant modules through the factories below, so one spec means the same
quantizers on a ViT, a Swin or an EVA-02.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.nn as nn

from ..errors import VitqError
from ..qmodules import QuantLinear, QuantMatMul
from ..quantizers import (SOFTMAX_QUANTIZERS, Quantizer, UniformQuantizer, bits_enabled, softmax_quantizer_names,
                          validate_bits)


@dataclass
class QuantSpec:
    """Bit widths and granularities for :func:`prepare`.

    Bits: 2..8, or None/16/32 for "off". ``head_*_bits``/``patch_embed_w_bits`` of None mean
    "same as w_bits/a_bits". ``quant_image_input`` adds an 8-bit per-tensor quantizer on the
    image (FIMA-Q's nominal value; FIMA-Q itself leaves the image FP).

    ``softmax_quantizer`` names the post-softmax operand quantizer (first operand of attn @ v) in
    :data:`vitq.quantizers.SOFTMAX_QUANTIZERS` ("uniform", "log2", "logsqrt2", "log": base sqrt2 from
    4 bits and base 2 below, and whatever a method registers, e.g. AIQViT's "dfq");
    ``softmax_options`` are handed to that factory as is.
    """

    w_bits: Optional[int] = 4
    a_bits: Optional[int] = 4
    head_w_bits: Optional[int] = None
    head_a_bits: Optional[int] = None
    patch_embed_w_bits: Optional[int] = None
    quant_image_input: bool = False
    softmax_quantizer: str = "uniform"   # a name in vitq.quantizers.SOFTMAX_QUANTIZERS
    softmax_options: dict[str, Any] = field(default_factory=dict)  # passed to that factory
    matmul_granularity: str = "head"     # "head" | "tensor"
    act_granularity: str = "tensor"      # "tensor" | "token" | "channel" (linear inputs)
    weight_granularity: str = "channel"  # "channel" | "tensor"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "head_w_bits", "head_a_bits", "patch_embed_w_bits"):
            validate_bits(getattr(self, name), name)
        _check_choice("softmax_quantizer", self.softmax_quantizer, tuple(softmax_quantizer_names()))
        if not isinstance(self.softmax_options, dict):
            raise VitqError(f"softmax_options must be a dict, got {type(self.softmax_options).__name__}")
        _check_choice("matmul_granularity", self.matmul_granularity, ("head", "tensor"))
        _check_choice("act_granularity", self.act_granularity, ("tensor", "token", "channel"))
        _check_choice("weight_granularity", self.weight_granularity, ("channel", "tensor"))

    # Resolved bit widths (None overrides fall back to the global ones).
    @property
    def head_w(self) -> Optional[int]:
        return self.w_bits if self.head_w_bits is None else self.head_w_bits

    @property
    def head_a(self) -> Optional[int]:
        return self.a_bits if self.head_a_bits is None else self.head_a_bits

    @property
    def patch_embed_w(self) -> Optional[int]:
        return self.w_bits if self.patch_embed_w_bits is None else self.patch_embed_w_bits


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise VitqError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


# --------------------------------------------------------------------------- quantizer factories
# A quantizer whose bits are "off" is not created at all (slot None), so calibration code
# never has to skip identity quantizers.

def weight_quantizer(bits: Optional[int], spec: QuantSpec) -> Optional[UniformQuantizer]:
    """Weight quantizer of a Linear / Conv2d (axis 0: output rows / output channels)."""
    if not bits_enabled(bits):
        return None
    return UniformQuantizer(bits, symmetric=False, granularity=spec.weight_granularity, axis=0)


def linear_act_quantizer(bits: Optional[int], spec: QuantSpec, force_tensor: bool = False
                         ) -> Optional[UniformQuantizer]:
    """Input quantizer of a Linear; ``force_tensor`` for inputs that are not (B, N, C) tokens."""
    if not bits_enabled(bits):
        return None
    gran = "tensor" if force_tensor else spec.act_granularity
    # token: dim 1 of (B, N, C); channel: the last (feature) dim.
    axis = {"tensor": None, "token": 1, "channel": -1}[gran]
    return UniformQuantizer(bits, symmetric=False, granularity=gran, axis=axis)


def matmul_operand_quantizer(bits: Optional[int], spec: QuantSpec) -> Optional[UniformQuantizer]:
    """Uniform quantizer of an attention matmul operand (B, H, *, *): the head is dim 1."""
    if not bits_enabled(bits):
        return None
    axis = 1 if spec.matmul_granularity == "head" else None
    return UniformQuantizer(bits, symmetric=False, granularity=spec.matmul_granularity, axis=axis)


def softmax_output_quantizer(bits: Optional[int], spec: QuantSpec, num_heads: int) -> Optional[Quantizer]:
    """The post-softmax operand quantizer (first operand of attn @ v), from the registry."""
    if not bits_enabled(bits):
        return None
    factory = SOFTMAX_QUANTIZERS[spec.softmax_quantizer]
    return factory(bits, spec.matmul_granularity, num_heads, spec.softmax_options)


def attention_matmuls(spec: QuantSpec, num_heads: int) -> tuple[QuantMatMul, QuantMatMul]:
    """(matmul1 for q @ kᵀ, matmul2 for attn @ v), at the activation bit width."""
    matmul1 = QuantMatMul(matmul_operand_quantizer(spec.a_bits, spec), matmul_operand_quantizer(spec.a_bits, spec))
    matmul2 = QuantMatMul(softmax_output_quantizer(spec.a_bits, spec, num_heads),
                          matmul_operand_quantizer(spec.a_bits, spec))
    return matmul1, matmul2


def quant_linear(linear: nn.Module, name: str, w_bits: Optional[int], a_bits: Optional[int], spec: QuantSpec,
                 force_tensor_act: bool = False) -> QuantLinear:
    """``linear`` (an exact nn.Linear) as a QuantLinear sharing its Parameters."""
    if type(linear) is not nn.Linear:
        raise VitqError(f"{name} is a {type(linear).__name__}, not an nn.Linear; vitq cannot quantize it")
    return QuantLinear.from_float(linear, weight_quantizer(w_bits, spec),
                                  linear_act_quantizer(a_bits, spec, force_tensor_act))


def block_linear(linear: nn.Module, name: str, spec: QuantSpec) -> QuantLinear:
    """A Linear inside a transformer block: global bits, token-sequence input."""
    return quant_linear(linear, name, spec.w_bits, spec.a_bits, spec)
