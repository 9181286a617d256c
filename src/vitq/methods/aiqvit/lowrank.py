"""Low-rank compensation (LRC, aiqvit.md §2.2) of a QuantLinear's weight error, in two forms.

* merged ("premerge", the default): :class:`LowRankDelta` is a
  ``torch.nn.utils.parametrize`` parametrization of ``layer.weight``, ``W -> W + B diag(m) A``;
  the layer's weight quantizer then sees ``W + B A`` and its straight-through rounding lets
  gradients reach A and B. Zero inference cost: :func:`fold_merged` removes the parametrization
  and leaves ``W + B A`` in the weight.
* side ("residual"): :class:`SideBranch` in the layer's ``side`` slot, which adds
  ``x_q (B A)^T`` in ``QuantMode.QUANT`` (fed the layer's quantized input); kept at inference.

Both are plain submodules (no hooks, no back-references), so ``copy.deepcopy`` and
``state_dict`` work as for any module.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ...errors import VitqError
from ...qmodules import QuantLinear, QuantMode, QuantModule
from .choices import LOWRANK_INITS, canonical_mode, check_choice
from .factors import LowRankFactors


class LowRankDelta(LowRankFactors, QuantModule):
    """Merged compensation: the parametrization ``W -> W + B diag(m) A`` of a QuantLinear's weight.

    It is a :class:`~vitq.qmodules.QuantModule` so that ``set_mode`` reaches it: the delta is
    added in ``QuantMode.QUANT`` only, so the float path (FLOAT: the reconstruction teacher,
    OBSERVE) keeps computing with the original ``W``. :func:`attach_lowrank` starts it in the
    layer's mode. With B = 0 (the LoRA init) the weight is bit-identical to ``W``.
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode != QuantMode.QUANT:
            return weight
        return weight + self.delta().to(weight.dtype)


class SideBranch(LowRankFactors):
    """Side-branch compensation: ``x -> x (B diag(m) A)^T`` (two thin GEMMs) in ``QuantLinear.side``.

    The layer adds it to ``F.linear(x_q, Q_w(W), b)`` in ``QuantMode.QUANT``, fed the same
    quantized input (and QDrop draw). Rank 0 adds exact zeros.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        h = F.linear(x, A)
        m = self.mask()
        if m is not None:
            h = h * m
        return F.linear(h, B)


# --------------------------------------------------------------------------- weight errors

@torch.no_grad()
def nearest_rounding_error(layer: QuantLinear) -> torch.Tensor:
    """``W - Q(W)`` with nearest rounding on the layer's weight grid.

    Nearest rather than the quantizer's own forward: an AdaRound quantizer at its soft start
    reproduces W, which would hide the error the compensation is for.
    """
    w = layer.weight.detach()
    q = layer.w_quantizer
    if q is None or not q.enabled:  # an unquantized weight has no error
        return torch.zeros_like(w)
    view = q.integer_view()
    if view.kind != "uniform":
        return w - q(w)
    zp = torch.round(view.zero_point)
    return w - (torch.clamp(torch.round(w / view.scale) + zp, view.qmin, view.qmax) - zp) * view.scale


def compensated_weight(layer: QuantLinear) -> torch.Tensor:
    """The weight the layer effectively computes with in QUANT mode.

    No compensation: ``Q_w(W)``; merged: ``Q_w(W + B A)``; side: ``Q_w(W) + B A``.
    """
    wq = layer.w_quantizer
    lowrank = find_lowrank(layer)
    if isinstance(lowrank, LowRankDelta):  # whatever the mode, apply the delta
        w = layer.parametrizations.weight.original + lowrank.delta()
    else:
        w = layer.weight
    w_hat = w if wq is None else wq(w)
    return w_hat + lowrank.delta() if isinstance(lowrank, SideBranch) else w_hat


# --------------------------------------------------------------------------- attach / find / detach

def _own_parametrized_class(layer: nn.Module) -> None:
    """Give a parametrized ``layer`` a class of its own before its parametrizations change.

    ``copy.deepcopy`` of a parametrized module shares the class torch injected, and torch's
    register / remove functions add and delete properties on that class: without this, folding
    a copy would strip the original's ``weight`` property.
    """
    if parametrize.is_parametrized(layer):
        shared = type(layer)
        own = {k: v for k, v in vars(shared).items() if k not in ("__dict__", "__weakref__")}
        layer.__class__ = type(shared.__name__, shared.__bases__, own)


def attach_lowrank(layer: QuantLinear, mode: str = "merged", rank: int = 20, *,
                   candidates: Sequence[int] | None = None, tau: float = 1.0, supernet: str = "nested",
                   init: str = "auto", act_rms: torch.Tensor | None = None, factor_bits: int | None = None,
                   generator: torch.Generator | None = None) -> LowRankFactors:
    """Install low-rank compensation on a calibrated :class:`~vitq.qmodules.QuantLinear`.

    ``mode="merged"`` registers a :class:`LowRankDelta` parametrization of ``layer.weight``
    (state-dict keys ``parametrizations.weight.original`` / ``.0.A`` / ``.0.B`` while attached);
    ``mode="side"`` puts a :class:`SideBranch` in ``layer.side``. ``candidates`` turns on the
    rank search (``rank`` is then ignored: r_max comes from them). ``init``: "auto" (merged:
    "lora"; side: "svd"), "lora" (B = 0) or "svd" (side only: truncated SVD of the nearest-rounding
    error, activation-scaled by ``act_rms``). ``factor_bits`` (8) is for the side branch only.
    Returns the installed module.
    """
    if not isinstance(layer, QuantLinear):
        raise VitqError(f"low-rank compensation needs a vitq QuantLinear, got {type(layer).__name__}")
    mode = canonical_mode(mode)
    check_choice("lowrank init", init, LOWRANK_INITS)
    if find_lowrank(layer) is not None:
        raise VitqError("this layer already has low-rank compensation; detach_lowrank() it first")
    wq = layer.w_quantizer
    if wq is None:
        raise VitqError("the layer has no weight quantizer, so there is no quantization error to compensate")
    if not wq.is_calibrated:
        raise VitqError("calibrate the layer's weight quantizer before attaching low-rank compensation")
    init = ("lora" if mode == "merged" else "svd") if init == "auto" else init
    kwargs = dict(candidates=candidates, tau=tau, supernet=supernet, generator=generator)
    dev, dtype = layer.weight.device, layer.weight.dtype
    d_out, d_in = layer.weight.shape
    if mode == "merged":
        if init == "svd":
            raise VitqError("init='svd' is for the side branch; the merged form starts at B = 0")
        if factor_bits is not None:
            raise VitqError("factor_bits only applies to the side branch (merged factors are folded away)")
        delta = LowRankDelta(d_out, d_in, rank, **kwargs).to(dev, dtype)
        delta.mode = layer.mode
        _own_parametrized_class(layer)
        parametrize.register_parametrization(layer, "weight", delta)
        return delta
    if layer.side is not None:
        raise VitqError(f"the layer's side slot already holds a {type(layer.side).__name__}")
    side = SideBranch(d_out, d_in, rank, factor_bits=factor_bits, **kwargs).to(dev, dtype)
    if init == "svd":
        side.init_svd_(nearest_rounding_error(layer), act_rms)
    layer.side = side
    return side


def find_lowrank(layer: nn.Module) -> LowRankFactors | None:
    """The low-rank module attached to ``layer`` (merged or side), or None."""
    if parametrize.is_parametrized(layer, "weight"):
        for p in layer.parametrizations.weight:
            if isinstance(p, LowRankDelta):
                return p
    side = getattr(layer, "side", None)
    return side if isinstance(side, SideBranch) else None


def lowrank_modules(model: nn.Module) -> list[tuple[str, LowRankFactors]]:
    """(layer name, low-rank module) of every compensated QuantLinear, in forward order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            lowrank = find_lowrank(m)
            if lowrank is not None:
                out.append((name, lowrank))
    return out


def lowrank_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A and B of every low-rank module in ``model``."""
    return [p for m in model.modules() if isinstance(m, LowRankFactors) for p in (m.A, m.B)]


@torch.no_grad()
def fold_merged(layer: QuantLinear) -> None:
    """Remove the merged parametrization, leaving ``W + B A`` in ``layer.weight`` (same Parameter object).

    The layer then computes ``Q_w(W + B A)`` with no A/B tensors: the finalisation of aiqvit.md §2.2.
    Removes every parametrization of the weight (vitq registers only this one).
    """
    delta = find_lowrank(layer)
    if not isinstance(delta, LowRankDelta):
        raise VitqError("fold_merged needs a layer with merged low-rank compensation")
    delta.mode = QuantMode.QUANT  # the delta must be applied whatever mode the model is in
    _own_parametrized_class(layer)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


@torch.no_grad()
def detach_lowrank(layer: QuantLinear, fold: bool = True) -> LowRankFactors | None:
    """Remove the compensation of ``layer``; returns the removed module (None if none).

    Merged: ``fold=True`` is :func:`fold_merged` (exact), ``fold=False`` restores the original W.
    Side: ``fold=True`` adds ``B A`` to the weight, which converts to the merged semantics
    ``Q_w(W + B A)``, NOT the branch's output ``Q_w(W) + B A``; keep the branch attached to
    preserve it. ``fold=False`` just drops the branch.
    """
    lowrank = find_lowrank(layer)
    if lowrank is None:
        return None
    if isinstance(lowrank, LowRankDelta):
        if fold:
            fold_merged(layer)
        else:
            _own_parametrized_class(layer)
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        return lowrank
    if fold and lowrank.rank > 0:
        layer.weight.data = layer.weight.data + lowrank.delta().detach().to(layer.weight.dtype)
    layer.side = None
    return lowrank


def restore_side_branches(model: nn.Module, side_ranks: dict[str, int], factor_bits: int | None) -> None:
    """Re-create the side branches of a saved model (``{layer name: rank}``) before ``load_state_dict``.

    The branches start at LoRA init (from a fixed seed, so loading leaves the global RNG alone);
    the state dict then fills A and B. No calibration is needed first.
    """
    gen = torch.Generator().manual_seed(0)
    for name, rank in side_ranks.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise VitqError(f"the saved model has a side branch on {name!r}, which this model lacks") from None
        if not isinstance(layer, QuantLinear):
            raise VitqError(f"the saved side branch on {name!r} needs a QuantLinear, got {type(layer).__name__}")
        layer.side = SideBranch(*layer.weight.shape, int(rank), factor_bits=factor_bits, generator=gen).to(
            layer.weight.device, layer.weight.dtype)


def lowrank_overhead(d_in: int, d_out: int, rank: int, tokens: int = 1, factor_bits: int | None = None,
                     mode: str = "side") -> dict[str, int]:
    """Inference overhead of one compensated Linear (aiqvit.md §2.5).

    Merged: zero (folded into the k-bit weight). Side: ``r (d_in + d_out)`` extra parameters,
    ``2 tokens r (d_in + d_out)`` FLOPs, stored at 16 bits (FP16) or ``factor_bits`` plus one
    FP16 scale per factor row (``r + d_out`` rows).
    """
    if canonical_mode(mode) == "merged" or rank == 0:
        return {"params": 0, "flops": 0, "weight_bits": 0}
    params = rank * (d_in + d_out)
    bits = 16 * params if factor_bits is None else factor_bits * params + 16 * (rank + d_out)
    return {"params": params, "flops": 2 * tokens * params, "weight_bits": bits}
