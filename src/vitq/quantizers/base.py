"""The one quantizer interface every part of vitq talks to.

Calibration, the reconstruction engine and export never ask which concrete quantizer they hold
(uniform, log2 / log-sqrt2, AdaRound, AIQViT's DFQ, ...): they use the methods of
:class:`Quantizer` below.

=========================  ===========================================================================
what                       interface
=========================  ===========================================================================
fake quantization          ``forward(x)``; ``enabled`` (bits 2..8) and ``is_calibrated``
min/max observation        ``observe(x)``, ``reset_observer()``, ``init_from_minmax()``
calibration capabilities   ``grid_searchable`` (an affine (scale, zero-point) grid the MSE search may
                           set), ``calibrates_itself`` + ``calibrate_itself(x, partner)`` (a
                           quantizer with its own initial search, e.g. DFQ)
reconstruction             ``trainable_parameters()`` ({group: [Parameter]}, group names pick the
                           learning rate), ``project_()`` after an optimiser step, ``set_qdrop(p)``,
                           ``learned_rounding(weight)`` (AdaRound for weights), ``round_loss(beta)``,
                           ``fold_into(weight)`` once rounding is final, ``freeze_()``
export                     ``integer_view()`` (:class:`IntegerView`) and ``codes(x)``
=========================  ===========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import VitqError
from .kernels import qdrop_select

# Bit widths that mean "do not quantize" (identity).
OFF_BITS = (None, 16, 32)


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


@dataclass
class IntegerView:
    """What export needs of a calibrated quantizer: ``x_hat = dequant(codes)``.

    ``kind``: ``uniform`` (``x_hat = (q - zero_point) * scale``, codes in ``[qmin, qmax]``),
    ``log2`` / ``logsqrt2`` (``x_hat = scale * 2^(-q/k)``, the top code meaning 0) or a method's
    own kind (``dfq``). ``scale`` / ``zero_point`` broadcast against the quantized tensor; ``axis``
    names the kept axis (None: per tensor; per-token scales keep axis 1 of (B, N, C)).
    ``extra`` holds kind-specific values (the log base, DFQ's interval).
    """

    kind: str
    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None
    signed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Quantizer(nn.Module):
    """Base of every fake quantizer: what quant modules hold in their slots.

    Owns what all of them share: ``bits`` (None/16/32 = identity), QDrop's keep probability,
    the min/max observer buffers, the persisted ``initialized`` flag and a state-dict load that
    adopts the incoming shape of the tensors named in ``_RESIZABLE``. Subclasses add their
    parameters and ``forward``, and override the capability hooks they support.
    """

    # Tensors whose shape may change after construction; resized on state-dict load.
    _RESIZABLE: tuple[str, ...] = ("min_val", "max_val")
    # The MSE calibration search may set an affine (scale, zero point) grid on it (set_params).
    grid_searchable: bool = False
    # It runs its own initial search (calibrate_itself) instead of the statistics rules.
    calibrates_itself: bool = False

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
        # Python mirror of a True ``initialized``: reading the buffer on a GPU is a host sync, and
        # every forward checks it (reset by a state-dict load, the one way it can turn False again)
        self._ready = False

    # ------------------------------------------------------------------ state
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
        if self.min_val.numel() == 0:
            raise RuntimeError("init_from_minmax() before any observe() call")
        return self.min_val, self.max_val

    _NOT_READY_HINT = "run observe() then init_from_minmax(), or set_params(), before quantizing"

    def _check_ready(self) -> None:
        if self._ready:
            return
        self._ready = bool(self.initialized)
        if not self._ready:
            raise RuntimeError(f"{self.__class__.__name__}({self.extra_repr()}) is not calibrated: "
                               f"{self._NOT_READY_HINT}")

    # ------------------------------------------------------------------ calibration
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate what ``init_from_minmax`` needs (no-op when bits are off)."""
        raise NotImplementedError

    def init_from_minmax(self) -> None:
        raise NotImplementedError

    def calibrate_itself(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> None:
        """Own initial search on calibration input ``x`` (``partner``: the other matmul operand)."""
        raise NotImplementedError(f"{type(self).__name__} has no search of its own")

    # ------------------------------------------------------------------ reconstruction
    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters reconstruction may learn, by group (the group picks the learning rate)."""
        return {}

    @torch.no_grad()
    def project_(self) -> None:
        """Bring learned parameters back into their valid range after an optimiser step."""

    def set_qdrop(self, keep_prob: float) -> None:
        """QDrop: in training mode keep the quantized value with this probability (1 = off)."""
        self.drop_prob = float(keep_prob)

    def _qdrop(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_prob < 1.0:
            return qdrop_select(x, x_hat, self.drop_prob)
        return x_hat

    def learned_rounding(self, weight: torch.Tensor) -> "Quantizer | None":
        """A quantizer that learns the rounding of ``weight`` on this grid (AdaRound), or None."""
        return None

    def round_loss(self, beta: float) -> torch.Tensor | None:
        """The rounding regulariser of a learned-rounding quantizer (None for the others)."""
        return None

    def set_soft_rounding(self, soft: bool) -> None:
        """A learned-rounding quantizer: soft (rectified-sigmoid, learning) or hard rounding from now
        on, e.g. to learn a frozen rounding further; a no-op for the others."""

    def fold_into(self, weight: torch.Tensor) -> tuple[torch.Tensor, "Quantizer"] | None:
        """For a learned-rounding quantizer: (the final weight, the plain quantizer to keep)."""
        return None

    def freeze_(self) -> None:
        """End of reconstruction: eval mode, QDrop off, nothing trainable."""
        self.eval()
        self.drop_prob = 1.0
        for params in self.trainable_parameters().values():
            for p in params:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ export
    def integer_view(self) -> IntegerView:
        """The integer form of this quantizer's grid (see :class:`IntegerView`)."""
        raise NotImplementedError(f"{type(self).__name__} has no integer view")

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes (int32) that ``forward`` dequantizes, for a tensor ``x``."""
        raise NotImplementedError(f"{type(self).__name__} has no integer codes")

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        self._ready = False  # the incoming ``initialized`` may be False
        # Shapes legitimately change after construction (first observation, token-wise
        # expansion, per-head bounds), so adopt the incoming ones instead of refusing them.
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


# --------------------------------------------------------------------------- post-softmax registry
# Factories of the post-softmax (attn @ v, first operand) quantizer, by name. The core registers
# uniform / log2 / logsqrt2; a method package registers its own (AIQViT: "dfq") on import.
# factory(bits, granularity, num_heads, options) -> Quantizer
SoftmaxFactory = Callable[[int, str, int, dict[str, Any]], Quantizer]
SOFTMAX_QUANTIZERS: dict[str, SoftmaxFactory] = {}


def register_softmax_quantizer(name: str, factory: SoftmaxFactory) -> None:
    """Make ``name`` a choice of ``QuantSpec.softmax_quantizer``."""
    SOFTMAX_QUANTIZERS[name] = factory


def softmax_quantizer_names() -> list[str]:
    return sorted(SOFTMAX_QUANTIZERS)
