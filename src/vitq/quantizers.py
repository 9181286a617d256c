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

from typing import Any

import torch
import torch.nn as nn

from .errors import VitqError

GRANULARITIES = ("tensor", "channel", "head", "token")
# Bit widths that mean "do not quantize" (identity).
OFF_BITS = (None, 16, 32)
# Default kept axis per granularity: channel -> output rows of a weight, head -> dim 1 of
# (B, H, N, D), token -> dim 1 of (B, N, C).
_DEFAULT_AXIS = {"tensor": None, "channel": 0, "head": 1, "token": 1}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) in the forward pass, identity gradient backward."""
    return (torch.round(x) - x).detach() + x


def validate_bits(bits: int | None, what: str = "bits") -> int | None:
    """Return ``bits`` if it is 2..8 or an "off" value (None/16/32); raise VitqError otherwise."""
    if bits in OFF_BITS:
        return bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise VitqError(f"{what} must be between 2 and 8 (or 16/32 for off), got {bits}")
    return bits


def bits_enabled(bits: int | None) -> bool:
    """True when ``bits`` means actual quantization (not None/16/32)."""
    return bits not in OFF_BITS


class Quantizer(nn.Module):
    """Base of every fake quantizer (uniform, log, AIQViT's DFQ): what quant modules hold in their slots.

    It owns the bookkeeping they all share: ``bits`` (None/16/32 = identity), QDrop's
    ``drop_prob``, the min/max observer buffers, the persisted ``initialized`` flag and a
    state-dict load that adopts the incoming shape of the tensors named in ``_RESIZABLE``.
    Subclasses add their grid parameters (scale/zero point, or DFQ's bounds) and ``forward``.
    """

    # Tensors whose shape may change after construction; resized on state-dict load.
    _RESIZABLE: tuple[str, ...] = ("min_val", "max_val")

    def __init__(self, bits: int | None) -> None:
        super().__init__()
        self.bits = validate_bits(bits)
        # QDrop (fimaq.md §2.3): probability of KEEPING the quantized value, training mode only.
        self.drop_prob = 1.0
        # Empty observer buffers mean "nothing observed yet".
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        # Persisted so a loaded checkpoint knows it is calibrated.
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def enabled(self) -> bool:
        """False for bits None/16/32 (the quantizer is the identity)."""
        return bits_enabled(self.bits)

    @property
    def is_calibrated(self) -> bool:
        """True once the grid was set (identity quantizers are always ready)."""
        return (not self.enabled) or bool(self.initialized)

    def reset_observer(self) -> None:
        """Forget the observed min/max."""
        self.min_val = torch.empty(0, device=self.min_val.device)
        self.max_val = torch.empty(0, device=self.max_val.device)

    def _observed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observed (min, max); raises when nothing was observed yet."""
        if self.min_val.numel() == 0:
            raise RuntimeError("init_from_minmax() before any observe() call")
        return self.min_val, self.max_val

    _NOT_READY_HINT = "run observe() then init_from_minmax(), or set_params(), before quantizing"

    def _check_ready(self) -> None:
        if not bool(self.initialized):
            raise RuntimeError(f"{self.__class__.__name__}({self.extra_repr()}) is not calibrated: "
                               f"{self._NOT_READY_HINT}")

    def _qdrop(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_prob < 1.0:
            keep = torch.rand_like(x) < self.drop_prob
            return torch.where(keep, x_hat, x)
        return x_hat

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # The default loader refuses shape mismatches; our shapes legitimately change after
        # construction (first observation, token-wise expansion, per-head bounds), so adopt them.
        for name in self._RESIZABLE:
            key = prefix + name
            if key not in state_dict:
                continue
            incoming = state_dict[key]
            current = getattr(self, name)
            if tuple(current.shape) == tuple(incoming.shape):
                continue
            fresh = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                current.data = fresh
            else:
                setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _QuantizerBase(Quantizer):
    """Scale / zero-point state and the granularity-aware min/max observer of the uniform and log quantizers."""

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


class UniformQuantizer(_QuantizerBase):
    """Uniform fake quantizer (asymmetric by default), see module docstring.

    Args:
        bits: 2..8, or None/16/32 for "off" (identity).
        symmetric: signed symmetric grid instead of the asymmetric one.
        granularity: "tensor", "channel", "head" or "token"; all but "tensor" keep one
            scale per index along ``axis`` and reduce all other dims.
        axis: the kept dim (negative allowed). Defaults: channel 0 (Linear weight rows),
            head 1 (``(B, H, N, D)``), token 1 (``(B, N, C)``).
    """

    def __init__(self, bits: int | None, symmetric: bool = False, granularity: str = "tensor",
                 axis: int | None = None) -> None:
        super().__init__(bits, granularity, axis)
        self.symmetric = symmetric

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


class LogQuantizer(_QuantizerBase):
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


class AdaRoundQuantizer(nn.Module):
    """AdaRound weight rounding (Nagel et al., 2020) on a calibrated uniform quantizer's grid.

    ``w_hat = s * (clamp(floor(w/s) + h(alpha) + z, qmin, qmax) - z)`` with the rectified sigmoid
    ``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``; soft while learning,
    ``h = [alpha >= 0]`` once hard. ``alpha`` starts where ``h(alpha) = frac(w/s)``, so at step 0
    the soft weight equals the float weight inside the clip range. Scale and zero point are
    frozen copies of the base quantizer's. Unlike the official ``get_hard_value``, the hard
    weight is clamped to the grid (fimaq.md §7.15), and symmetric grids work too.
    """

    zeta, gamma = 1.1, -0.1

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        if not base.enabled or not bool(base.initialized):
            raise RuntimeError("AdaRound needs a calibrated, enabled uniform quantizer")
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
        q = torch.clamp(torch.floor(w / self.scale) + self.h() + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def round_loss(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2h - 1|^beta)``: pushes every offset to 0 or 1 as beta falls."""
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


__all__ = [
    "AdaRoundQuantizer",
    "Quantizer",
    "LogQuantizer",
    "UniformQuantizer",
    "bits_enabled",
    "round_ste",
    "validate_bits",
]
