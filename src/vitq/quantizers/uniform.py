"""Fake quantizers: uniform (asymmetric / symmetric) and logarithmic.

The uniform quantizer follows FIMA-Q's ``quantizers/uniform.py`` (research note fimaq.md §2.1):

* asymmetric: ``q = clamp(round(x/s) + round(z), 0, 2^b-1)``, ``x_hat = (q - round(z)) * s``;
* symmetric:  ``x_hat = clamp(round(x/s), -2^(b-1), 2^(b-1)-1) * s``.

Rounding is straight-through (:func:`round_ste`), so ``scale`` gets the LSQ-like gradient
``round(x/s) - x/s`` inside the range and the clip level (``qmax - z`` / ``qmin - z``) at the clip.

Scales and zero points are stored with an explicit broadcastable shape: the quantized tensor's
number of dims with size 1 everywhere except the kept axis (per-channel weight of a Linear:
``(out, 1)``; per-head on ``(B, H, N, D)``: ``(1, H, 1, 1)``; per-token on ``(B, N, C)``:
``(1, N, 1)``); per-tensor quantizers use shape ``(1,)``. The shape is fixed by the first
:meth:`observe` call or by :meth:`set_params`, and may change later (token-wise expansion);
loading a state dict resizes the tensors to the incoming shape.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import VitqError
from .base import IntegerView, Quantizer, round_ste
from .kernels import fake_quant_ste, fake_quant_values, reference_active

GRANULARITIES = ("tensor", "channel", "head", "token")


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) mapping ``[lo, hi]`` onto codes ``0..qmax``.

    The zero point is not clamped to [0, qmax]: a range that excludes 0 (e.g. near-uniform
    attention probabilities) needs an offset outside the code range, as in the official code.
    """
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    return scale, -torch.round(lo / scale)
# Default kept axis per granularity: channel -> output rows of a weight, head -> dim 1 of
# (B, H, N, D), token -> dim 1 of (B, N, C).
_DEFAULT_AXIS = {"tensor": None, "channel": 0, "head": 1, "token": 1}


class AffineQuantizer(Quantizer):
    """Scale / zero-point state and the granularity-aware min/max observer of the uniform and log quantizers.

    The scale is a Parameter, so reconstruction may learn it (``trainable_parameters``).
    """

    _RESIZABLE = ("scale", "zero_point", "min_val", "max_val")

    def __init__(self, bits: int | None, granularity: str, axis: int | None) -> None:
        super().__init__(bits)
        if granularity not in GRANULARITIES:
            raise VitqError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        self.granularity = granularity
        self.axis = _DEFAULT_AXIS[granularity] if axis is None else axis
        # Scale is a Parameter so reconstruction can learn it; frozen until asked for.
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1))

    def set_params(self, scale: torch.Tensor | float, zero_point: torch.Tensor | float | None = None) -> None:
        """Replace scale and zero point (any shape broadcastable against the input).

        The ``scale`` Parameter object is kept (only its data changes), so an optimizer that
        already holds it stays valid.
        """
        dev = self.scale.device
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=dev).detach().clone()
        if scale_t.dim() == 0:
            scale_t = scale_t.reshape(1)
        if zero_point is None:
            zp_t = torch.zeros(1, device=dev)
        else:
            zp_t = torch.as_tensor(zero_point, dtype=torch.float32, device=dev).detach().clone()
            if zp_t.dim() == 0:
                zp_t = zp_t.reshape(1)
        self.scale.data = scale_t
        self.zero_point = zp_t
        self.initialized.fill_(True)

    def _reduce_dims(self, x: torch.Tensor) -> tuple[list[int], int | None]:
        if self.granularity == "tensor":
            return list(range(x.dim())), None
        axis = self.axis if self.axis >= 0 else x.dim() + self.axis
        if not 0 <= axis < x.dim():
            raise RuntimeError(f"{self.granularity}-wise quantizer axis {self.axis} is out of range for a {x.dim()}-D input")
        return [d for d in range(x.dim()) if d != axis], axis

    def _stat_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        dims, axis = self._reduce_dims(x)
        if axis is None:
            return (1,)
        return tuple(x.shape[d] if d == axis else 1 for d in range(x.dim()))

    @torch.no_grad()
    def _update_minmax(self, x: torch.Tensor) -> None:
        dims, axis = self._reduce_dims(x)
        x = x.detach().float()
        shape = self._stat_shape(x)
        if axis is None:
            lo, hi = x.amin().reshape(1), x.amax().reshape(1)
        else:
            lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo.reshape(shape), hi.reshape(shape)
            return
        if tuple(self.min_val.shape) != shape:
            raise RuntimeError(
                f"observed shape {shape} differs from earlier observations {tuple(self.min_val.shape)}; "
                "call reset_observer() between differently shaped inputs")
        self.min_val = torch.minimum(self.min_val, lo.reshape(shape))
        self.max_val = torch.maximum(self.max_val, hi.reshape(shape))

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate running min/max at this quantizer's granularity (no-op when bits are off)."""
        if self.enabled:
            self._update_minmax(x)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The scale (group ``scale``): LSQ-style learning through the straight-through rounding."""
        return {"scale": [self.scale]} if self.enabled else {}

    @torch.no_grad()
    def project_(self) -> None:
        self.scale.clamp_(min=1e-8)  # a scale pushed through zero would flip the grid

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the grid so that ``[lo, hi]`` (broadcastable tensors) is the representable range."""
        raise NotImplementedError

    def _kept_axis(self) -> int | None:
        """The axis along which the scale varies (None: one scale for the tensor)."""
        if self.scale.numel() <= 1:
            return None
        dims = [d for d, n in enumerate(self.scale.shape) if n > 1]
        return dims[0] if len(dims) == 1 else self.axis


class UniformQuantizer(AffineQuantizer):
    """Uniform fake quantizer (asymmetric by default), see module docstring.

    Args:
        bits: 2..8, or None/16/32 for "off" (identity).
        symmetric: signed symmetric grid instead of the asymmetric one.
        granularity: "tensor", "channel", "head" or "token"; all but "tensor" keep one
            scale per index along ``axis`` and reduce all other dims.
        axis: the kept dim (negative allowed). Defaults: channel 0 (Linear weight rows),
            head 1 (``(B, H, N, D)``), token 1 (``(B, N, C)``).
    """

    grid_searchable = True

    def learned_rounding(self, weight: torch.Tensor) -> Quantizer | None:
        """AdaRound on this grid (see :class:`~vitq.quantizers.adaround.AdaRoundQuantizer`)."""
        if not self.enabled:
            return None
        from .adaround import AdaRoundQuantizer

        return AdaRoundQuantizer(self, weight).to(weight.device)

    def integer_view(self) -> IntegerView:
        self._check_ready()
        qmin, qmax = self.quant_range()
        return IntegerView(kind="uniform", bits=self.bits, scale=self.scale.detach().clone(),
                           zero_point=torch.round(self.zero_point).detach().clone(), qmin=qmin, qmax=qmax,
                           axis=self._kept_axis(), signed=self.symmetric)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        qmin, qmax = self.quant_range()
        z = 0 if self.symmetric else torch.round(self.zero_point)
        return torch.clamp(torch.round(x / self.scale) + z, qmin, qmax).to(torch.int32)

    def __init__(self, bits: int | None, symmetric: bool = False, granularity: str = "tensor",
                 axis: int | None = None) -> None:
        super().__init__(bits, granularity, axis)
        self.symmetric = symmetric

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """``scale = (hi - lo) / qmax``, ``zero_point = -round(lo / scale)`` (FIMA-Q's rule)."""
        self.set_params(*params_from_range(lo, hi, self.quant_range()[1]))

    def quant_range(self) -> tuple[int, int]:
        """Integer code range (qmin, qmax)."""
        if not self.enabled:
            raise RuntimeError("quant_range() of a disabled quantizer (bits off)")
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    @torch.no_grad()
    def init_from_minmax(self) -> None:
        """Set scale/zero point so the observed [min, max] maps onto the integer grid."""
        if not self.enabled:
            return
        lo, hi = self._observed()
        qmin, qmax = self.quant_range()
        if self.symmetric:
            # Use both halves of the signed grid: the negative side has one extra level.
            neg, pos = (-lo).clamp(min=0), hi.clamp(min=0)
            scale = torch.maximum(neg / -qmin, pos / qmax)
            self.set_params(scale.clamp(min=1e-8), torch.zeros_like(scale))
        else:
            scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
            self.set_params(scale, -torch.round(lo / scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._check_ready()
        qmin, qmax = self.quant_range()
        s = self.scale
        if not reference_active():
            z = None if self.symmetric else torch.round(self.zero_point)
            if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
                # reconstruction: one autograd node instead of a dozen (kernels.py)
                keep = self.drop_prob if self.training and self.drop_prob < 1.0 else None
                return fake_quant_ste(x, s, z, qmin, qmax, keep)
            return self._qdrop(x, fake_quant_values(x, s, z, qmin, qmax))
        if self.symmetric:
            x_hat = torch.clamp(round_ste(x / s), qmin, qmax) * s
        else:
            z = round_ste(self.zero_point)
            q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
            x_hat = (q - z) * s
        return self._qdrop(x, x_hat)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        axis = "" if self.granularity == "tensor" else f", axis={self.axis}"
        return f"bits={self.bits}, {kind}, {self.granularity}{axis}, scale_shape={tuple(self.scale.shape)}"
