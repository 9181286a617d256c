"""Quantized building blocks: Linear, MatMul and Conv2d with a three-state mode.

* ``QuantMode.FLOAT``: exactly the float op (quantizers untouched);
* ``QuantMode.OBSERVE``: the float op, and every quantizer ``observe``s its input
  (weights and activations) for min-max calibration;
* ``QuantMode.QUANT``: fake-quantized op.

A quantizer slot may be ``None``: that operand is never quantized.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizers import Quantizer



class QuantMode(str, Enum):
    """What a quant module computes."""

    FLOAT = "float"
    OBSERVE = "observe"
    QUANT = "quant"


class QuantModule(nn.Module):
    """Base of every quant module: holds ``mode`` and lists its quantizers."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = QuantMode.FLOAT

    def quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        """(slot name, quantizer) for every non-None quantizer of this module."""
        for name, child in self.named_children():
            if isinstance(child, Quantizer):
                yield name, child

    @staticmethod
    def _apply_q(q: Quantizer | None, x: torch.Tensor, mode: QuantMode) -> torch.Tensor:
        if q is None or mode == QuantMode.FLOAT:
            return x
        if mode == QuantMode.OBSERVE:
            q.observe(x)
            return x
        return q(x)


class QuantLinear(QuantModule):
    """``F.linear(aq(x), wq(weight), bias) [+ side(aq(x))]``; ``weight``/``bias`` keep nn.Linear's names.

    ``side`` is an optional plain submodule fed the quantized input (the same QDrop draw) whose
    output is added in ``QuantMode.QUANT`` (e.g. AIQViT's low-rank side branch); None by default.
    ``input_rotation`` (None by default) maps the input before everything else, in every mode: an
    orthogonal rotation whose inverse the weight already carries (:mod:`vitq.rotation`).
    ``bias_correction`` (a buffer, None by default) is added to the output in ``QuantMode.QUANT`` only:
    the mean output error of the quantized layer that calibration measured (``CalibConfig.bias_correction``);
    the float model, and so every float reference, keeps its own bias.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None,
                 w_quantizer: Quantizer | None, a_quantizer: Quantizer | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.w_quantizer = w_quantizer
        self.a_quantizer = a_quantizer
        self.side: nn.Module | None = None
        self.input_rotation: nn.Module | None = None
        self.register_buffer("bias_correction", None)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_quantizer: Quantizer | None,
                   a_quantizer: Quantizer | None) -> "QuantLinear":
        """Wrap an nn.Linear, sharing (not copying) its weight and bias Parameters."""
        return cls(linear.weight, linear.bias, w_quantizer, a_quantizer)

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the quantizers and the weight see of an input ``x`` (``x`` rotated, if rotated)."""
        return x if self.input_rotation is None else self.input_rotation(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._apply_q(self.a_quantizer, self.layer_input(x), self.mode)
        w = self._apply_q(self.w_quantizer, self.weight, self.mode)
        y = F.linear(x, w, self.bias)
        if self.mode == QuantMode.QUANT:
            if self.side is not None:
                y = y + self.side(x)
            if self.bias_correction is not None:
                y = y + self.bias_correction
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, mode={self.mode.value}"


class QuantMatMul(QuantModule):
    """``aq(a) @ bq(b)`` (activation-activation product inside attention).

    ``operand_rotation`` (None by default) holds an orthogonal ``R`` that the operands are rotated by
    before quantization without changing the product (:mod:`vitq.rotation`): with ``rotates ==
    "contracted"`` (q @ kᵀ) ``(a R)(Rᵀ b)``, with ``"b_and_output"`` (attn @ v) ``(a (b R)) Rᵀ``.
    """

    def __init__(self, a_quantizer: Quantizer | None = None, b_quantizer: Quantizer | None = None) -> None:
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer
        self.operand_rotation: nn.Module | None = None
        self.rotates = "contracted"

    def layer_inputs(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the quantizers see of the operands (rotated, if rotated)."""
        rot = self.operand_rotation
        if rot is None:
            return a, b
        if self.rotates == "contracted":  # Rᵀ b = (bᵀ R)ᵀ
            return rot(a), rot(b.transpose(-2, -1)).transpose(-2, -1)
        return a, rot(b)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self.layer_inputs(a, b)
        a = self._apply_q(self.a_quantizer, a, self.mode)
        b = self._apply_q(self.b_quantizer, b, self.mode)
        out = a @ b
        if self.operand_rotation is not None and self.rotates == "b_and_output":
            out = self.operand_rotation.inverse(out)
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode.value}"


class QuantConv2d(QuantModule):
    """Conv2d with a per-output-channel weight quantizer and an optional input quantizer.

    The input quantizer defaults to None: FIMA-Q's "8-bit" image input is really
    unquantized (fimaq.md §7 item 13).
    """

    def __init__(self, conv: nn.Conv2d, w_quantizer: Quantizer | None,
                 a_quantizer: Quantizer | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.weight = conv.weight
        self.bias = conv.bias
        self.w_quantizer = w_quantizer
        self.a_quantizer = a_quantizer

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_quantizer: Quantizer | None,
                   a_quantizer: Quantizer | None = None) -> "QuantConv2d":
        """Wrap an nn.Conv2d, sharing its weight and bias Parameters."""
        return cls(conv, w_quantizer, a_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._apply_q(self.a_quantizer, x, self.mode)
        w = self._apply_q(self.w_quantizer, self.weight, self.mode)
        if self.padding_mode != "zeros":
            # Same as nn.Conv2d._conv_forward for non-zero padding modes.
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, " \
               f"stride={self.stride}, mode={self.mode.value}"


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    """(qualified name, module) of every quant module, in ``named_modules`` (= forward) order."""
    for name, m in model.named_modules():
        if isinstance(m, QuantModule):
            yield name, m


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(qualified name, quantizer) of every quantizer in the model, in forward order."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def set_mode(model: nn.Module, mode: QuantMode | str) -> None:
    """Set the mode of every quant module in ``model`` (the model itself included)."""
    mode = QuantMode(mode)
    for _, m in quant_modules(model):
        m.mode = mode


__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "QuantMode",
    "QuantModule",
    "iter_quantizers",
    "quant_modules",
    "set_mode",
]
