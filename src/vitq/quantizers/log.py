"""Logarithmic quantizer for post-softmax attention (RepQ-ViT's log2 / log-sqrt2 baseline)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import VitqError
from .base import IntegerView, round_ste
from .uniform import AffineQuantizer


class LogQuantizer(AffineQuantizer):
    """Logarithmic quantizer for post-softmax values in [0, 1] (RepQ-ViT baseline).

    ``q = clamp(round(-log2(x/s) * k), 0, 2^b - 1)`` with k = 1 (base 2) or 2 (base sqrt2),
    ``x_hat = s * 2^(-q/k)``; the largest code ``2^b - 1`` dequantizes to 0 (tiny probabilities).
    ``x <= 0`` is treated as the smallest probability (code ``2^b - 1``, i.e. 0).

    Args:
        bits: 2..8 or None/16/32 (off).
        base: "2" or "sqrt2".
        granularity: "tensor" (scalar scale) or "head" (scale ``(1, H, 1, 1)`` on ``(B, H, N, N)``).
    """

    def __init__(self, bits: int | None, base: str = "2", granularity: str = "tensor",
                 axis: int | None = None) -> None:
        if base not in ("2", "sqrt2"):
            raise VitqError(f"log quantizer base must be '2' or 'sqrt2', got {base!r}")
        if granularity not in ("tensor", "head"):
            raise VitqError(f"log quantizer granularity must be 'tensor' or 'head', got {granularity!r}")
        super().__init__(bits, granularity, axis)
        self.base = base
        self.k = 1.0 if base == "2" else 2.0

    def quant_range(self) -> tuple[int, int]:
        """Integer code range (0, 2^b - 1); the top code means 0."""
        if not self.enabled:
            raise RuntimeError("quant_range() of a disabled quantizer (bits off)")
        return 0, 2 ** self.bits - 1

    @torch.no_grad()
    def init_from_minmax(self) -> None:
        """scale = observed max (so the largest probability gets code 0)."""
        if self.enabled:
            self.set_params(self._observed()[1].clamp(min=1e-8))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """scale = ``hi`` (the largest value gets code 0); ``lo`` plays no part on a log grid."""
        self.set_params(hi.clamp(min=1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._check_ready()
        _, qmax = self.quant_range()
        s = self.scale
        # Guard log(0): the tiniest positive float gives a code far above qmax, i.e. 0.
        ratio = torch.clamp(x / s, min=torch.finfo(x.dtype).tiny)
        q = torch.clamp(round_ste(-torch.log2(ratio) * self.k), 0, qmax)
        x_hat = s * torch.pow(2.0, -q / self.k)
        x_hat = torch.where(q >= qmax, torch.zeros_like(x_hat), x_hat)
        return self._qdrop(x, x_hat)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}, {self.granularity}, scale_shape={tuple(self.scale.shape)}"

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Nothing: the scale of a log grid gets no useful straight-through gradient.

        ``x_hat = s * 2^(-round(-k log2(x/s))/k)`` is, through the straight-through rounding,
        ``x_hat = x`` inside the range, so d x_hat / d s = 0 there; only the clipped top code gets
        a gradient. Reconstruction therefore keeps log scales fixed (QDrop still applies).
        """
        return {}

    def integer_view(self) -> IntegerView:
        self._check_ready()
        _, qmax = self.quant_range()
        return IntegerView(kind="log2" if self.base == "2" else "logsqrt2", bits=self.bits,
                           scale=self.scale.detach().clone(), zero_point=torch.zeros_like(self.scale.detach()),
                           qmin=0, qmax=qmax, axis=self._kept_axis(), extra={"k": self.k})

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        _, qmax = self.quant_range()
        ratio = torch.clamp(x / self.scale, min=torch.finfo(x.dtype).tiny)
        return torch.clamp(torch.round(-torch.log2(ratio) * self.k), 0, qmax).to(torch.int32)
