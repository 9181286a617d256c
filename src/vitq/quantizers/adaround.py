"""AdaRound: learned weight rounding on a calibrated uniform grid (Nagel et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import IntegerView, Quantizer
from .kernels import adaround_round_loss, adaround_soft_weight, reference_active
from .uniform import UniformQuantizer


class AdaRoundQuantizer(Quantizer):
    """AdaRound weight rounding (Nagel et al., 2020) on a calibrated uniform quantizer's grid.

    ``w_hat = s * (clamp(floor(w/s) + h(alpha) + z, qmin, qmax) - z)`` with the rectified sigmoid
    ``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``; soft while learning,
    ``h = [alpha >= 0]`` once hard. ``alpha`` starts where ``h(alpha) = frac(w/s)``, so at step 0
    the soft weight equals the float weight inside the clip range. Scale and zero point are
    frozen copies of the base quantizer's. Unlike the official ``get_hard_value``, the hard
    weight is clamped to the grid (fimaq.md §7.15), and symmetric grids work too.

    The base quantizer is kept as the child ``base`` and handed back by :meth:`fold_into`. Inside
    the grid the input gets a straight-through gradient (the floor has none), so a weight that is
    itself a function of learned parameters (e.g. merged low-rank compensation) still learns; the
    value is unchanged.
    """

    zeta, gamma = 1.1, -0.1

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__(base.bits)
        if not base.enabled or not bool(base.initialized):
            raise RuntimeError("AdaRound needs a calibrated, enabled uniform quantizer")
        self.base = base
        self.initialized.fill_(True)
        self.qmin, self.qmax = base.quant_range()
        self.register_buffer("scale", base.scale.detach().clone())
        self.register_buffer("zero_point", torch.round(base.zero_point.detach().clone()))
        rest = weight.detach() / self.scale - torch.floor(weight.detach() / self.scale)
        rest = rest.clamp(1e-4, 1 - 1e-4)  # keeps alpha finite at exact grid points
        self.alpha = nn.Parameter(-torch.log((self.zeta - self.gamma) / (rest - self.gamma) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        """Rounding offsets in [0, 1]: soft (rectified sigmoid) or hard (0/1)."""
        if self.soft:
            return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0, 1)
        return (self.alpha >= 0).to(self.alpha.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.soft and torch.is_grad_enabled() and not reference_active():
            # reconstruction: one autograd node (kernels.py)
            return adaround_soft_weight(w, self.alpha, self.scale, self.zero_point, self.qmin, self.qmax,
                                        self.zeta, self.gamma)
        q = torch.clamp(torch.floor(w / self.scale) + self.h() + self.zero_point, self.qmin, self.qmax)
        out = (q - self.zero_point) * self.scale
        if w.requires_grad:
            # straight-through path for the input inside the grid; exactly 0 in value
            t = w.detach() / self.scale + self.zero_point
            inside = ((t >= self.qmin) & (t <= self.qmax)).to(w.dtype)
            out = out + (w - w.detach()) * inside
        return out

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The rounding variables (group ``rounding``)."""
        return {"rounding": [self.alpha]}

    def set_hard(self) -> None:
        """Use the hard rounding from now on."""
        self.soft = False

    def set_soft_rounding(self, soft: bool) -> None:
        self.soft = bool(soft)

    def freeze_(self) -> None:
        """End of reconstruction: the hard rounding from now on, nothing trainable."""
        super().freeze_()
        self.soft = False

    def fold_into(self, weight: torch.Tensor) -> tuple[torch.Tensor, Quantizer]:
        """(the hard-rounded weight, the base quantizer): nearest rounding of it reproduces it."""
        return self.hard_weight(weight), self.base

    def integer_view(self) -> IntegerView:
        return self.base.integer_view()

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return torch.round(self.hard_weight(w) / self.scale + self.zero_point).to(torch.int32)

    def round_loss(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2h - 1|^beta)``: pushes every offset to 0 or 1 as beta falls."""
        if not reference_active():
            return adaround_round_loss(self.alpha, beta, self.zeta, self.gamma)
        h = torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0, 1)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The hard-rounded weight, on the grid (nearest rounding reproduces it exactly)."""
        soft, self.soft = self.soft, False
        try:
            return self.forward(w)
        finally:
            self.soft = soft
