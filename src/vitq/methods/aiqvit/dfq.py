"""AIQViT's dynamic focusing quantizer (DFQ, aiqvit.md §3) for post-softmax attention.

A learnable interval ``[b1, b2]`` inside ``[0, 1]``, uniform inside, values outside mapped onto
the interval (``below="clip"``) or to an exact 0 below ``b1`` (``below="zero"``). It is an
ordinary :class:`~vitq.quantizers.Quantizer`: reconstruction learns the group ``interval``
(``trainable_parameters``) and calls ``project_``; calibration calls ``calibrate_itself`` with
the value operand; export reads ``integer_view`` (kind ``dfq``) and ``codes``. Registered as the
post-softmax quantizer ``"dfq"`` (options ``granularity``, ``below``, ``init``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ...errors import VitqError
from ...quantizers import IntegerView, Quantizer, UniformQuantizer, register_softmax_quantizer, round_ste
from .choices import check_choice

DFQ_GRANULARITIES = ("layer", "head")
DFQ_BELOW = ("clip", "zero")
DFQ_INITS = ("output", "self", "minmax")
# Smallest gap kept between 0, b1, b2 and 1 by project_ (a zero-width interval has no step).
DFQ_EPS = 1e-4
# b2 candidates of the initial grid search: these quantiles of P (1.0 = max), aiqvit.md §3.4.
DFQ_B2_QUANTILES = (0.99, 0.999, 0.9999, 1.0)
DFQ_B1_ZERO_MODE = (0.0, 1e-4, 1e-3, 5e-3)
# torch.quantile refuses inputs above 2^24 elements; larger maps are subsampled (fixed seed).
_QUANTILE_MAX = 1 << 24


def _dfq_fake(x: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, bits: int, below: str) -> torch.Tensor:
    """DFQ fake quantization (straight-through round); shared by forward and the init search."""
    if below == "clip":
        steps = 2 ** bits - 1
        delta = (b2 - b1) / steps
        q = torch.clamp(round_ste((x - b1) / delta), 0, steps)
        return b1 + delta * q
    # "zero": code 0 is an exact 0, the other 2^k - 1 codes are 2^k - 1 levels on [b1, b2].
    steps = 2 ** bits - 2
    delta = (b2 - b1) / steps
    q = torch.clamp(round_ste((x - b1) / delta), 0, steps)
    return torch.where(x < b1, torch.zeros_like(x * delta), b1 + delta * q)


def _quantiles(x: torch.Tensor, qs: Sequence[float], per_head: bool) -> torch.Tensor:
    """Quantiles of ``x`` (B, H, ...) over everything (``(len(qs), 1)``) or per head (``(len(qs), H)``)."""
    flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1) if per_head else x.detach().float().reshape(1, -1)
    if flat.shape[1] > _QUANTILE_MAX // flat.shape[0]:
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(flat.shape[1], generator=gen)[: _QUANTILE_MAX // flat.shape[0]].to(flat.device)
        flat = flat[:, idx]
    q = torch.tensor(list(qs), dtype=flat.dtype, device=flat.device)
    return torch.quantile(flat, q, dim=1)  # (len(qs), rows)


class DynamicFocusingQuantizer(Quantizer):
    """DFQ for post-softmax attention ``P`` in [0, 1] (aiqvit.md §3.2).

    ``clip`` (default): ``Delta = (b2-b1)/(2^k-1)``, ``q = clamp(round((P-b1)/Delta), 0, 2^k-1)``,
    ``P_hat = b1 + Delta q`` (below b1 -> b1, above b2 -> b2); an ordinary asymmetric uniform grid.
    ``zero``: ``P < b1`` -> exact 0 (code 0), otherwise codes 1..2^k-1 on the 2^k-1 levels
    ``b1 + Delta j`` with ``Delta = (b2-b1)/(2^k-2)``.

    ``b1``/``b2`` are Parameters (shape ``(1,)``, or ``(1, H, 1, 1)`` per head on ``(B, H, N, N)``);
    they get gradients by autograd through the straight-through rounding.

    Args:
        bits: 2..8, or None/16/32 for "off" (identity).
        granularity: "layer" (one pair, default) or "head" (one pair per head, dim 1).
        below: "clip" or "zero".
        num_heads: creates the per-head pair at once; otherwise its size is set by the first
            :meth:`observe`, :meth:`init_from` or :meth:`set_bounds`.
        init: what :meth:`calibrate_itself` minimises: "output" (``||P_hat V - P V||``, V the
            partner operand), "self" (``||P_hat - P||``) or "minmax" (the observed range).
    """

    calibrates_itself = True
    # the bounds become per-head only once the head count is known
    _RESIZABLE = ("b1", "b2", "min_val", "max_val")

    def __init__(self, bits: int | None, granularity: str = "layer", below: str = "clip",
                 num_heads: int | None = None, init: str = "output") -> None:
        super().__init__(bits)
        check_choice("dfq granularity", granularity, DFQ_GRANULARITIES)
        check_choice("dfq below", below, DFQ_BELOW)
        check_choice("dfq init", init, DFQ_INITS)
        self.granularity, self.below, self.init = granularity, below, init
        shape = (1, num_heads, 1, 1) if (granularity == "head" and num_heads) else (1,)
        self.b1 = nn.Parameter(torch.zeros(shape), requires_grad=False)
        self.b2 = nn.Parameter(torch.ones(shape), requires_grad=False)

    # ----------------------------------------------------------------- state
    @property
    def levels(self) -> int:
        """Number of uniform steps on [b1, b2] (2^k - 1 for clip, 2^k - 2 for zero)."""
        return 2 ** self.bits - (1 if self.below == "clip" else 2)

    def delta(self) -> torch.Tensor:
        """Step size ``(b2 - b1) / levels``."""
        return (self.b2 - self.b1) / self.levels

    def _param_shape(self, n: int) -> tuple[int, ...]:
        if n == 1:
            return (1,) if self.granularity == "layer" else (1, 1, 1, 1)
        if self.granularity != "head":
            raise VitqError(f"a layer-wise DFQ takes one (b1, b2) pair, got {n} values")
        return (1, n, 1, 1)

    @torch.no_grad()
    def set_bounds(self, b1: torch.Tensor | float, b2: torch.Tensor | float) -> None:
        """Set ``[b1, b2]`` (scalars, or H values for per-head), project, mark calibrated.

        The Parameter objects are kept (only their data changes), so optimizers stay valid.
        """
        dev = self.b1.device
        t1 = torch.as_tensor(b1, dtype=torch.float32, device=dev).detach().reshape(-1).clone()
        t2 = torch.as_tensor(b2, dtype=torch.float32, device=dev).detach().reshape(-1).clone()
        n = max(t1.numel(), t2.numel())
        shape = self._param_shape(n)
        self.b1.data = t1.expand(n).reshape(shape).clone()
        self.b2.data = t2.expand(n).reshape(shape).clone()
        self.project_()
        self.initialized.fill_(True)

    # ----------------------------------------------------------------- reconstruction interface
    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The interval bounds (group ``interval``, learned at ``ReconConfig.interval_lr``)."""
        return {"interval": [self.b1, self.b2]} if self.enabled else {}

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp ``b1`` to ``[0, 1-eps]`` and ``b2`` to ``[b1+eps, 1]``; called after each optimizer step."""
        self.b1.clamp_(0.0, 1.0 - DFQ_EPS)
        self.b2.copy_(torch.minimum(torch.maximum(self.b2, self.b1 + DFQ_EPS), torch.ones_like(self.b2)))

    # ----------------------------------------------------------------- calibration
    def _reduce(self, x: torch.Tensor) -> list[int]:
        if self.granularity == "layer":
            return list(range(x.dim()))
        if x.dim() < 2:
            raise RuntimeError(f"a per-head DFQ needs (B, H, ...) input, got a {x.dim()}-D tensor")
        return [d for d in range(x.dim()) if d != 1]

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate running min/max (per layer or per head); no-op when bits are off."""
        if not self.enabled:
            return
        x = x.detach().float()
        dims = self._reduce(x)
        lo, hi = x.amin(dim=dims).reshape(-1), x.amax(dim=dims).reshape(-1)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo, hi
            return
        if self.min_val.shape != lo.shape:
            raise RuntimeError("observed head count differs from earlier observations; call reset_observer()")
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    @torch.no_grad()
    def init_from_minmax(self) -> None:
        """``b1`` = observed min (clipped to >= 0), ``b2`` = observed max."""
        if self.enabled:
            lo, hi = self._observed()
            self.set_bounds(lo.clamp(min=0.0), hi.clamp(max=1.0))

    @torch.no_grad()
    def calibrate_itself(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> None:
        """Initial bounds on calibration attention ``x`` = P by this quantizer's ``init`` rule.

        ``partner`` is the value operand V of ``P @ V``; "output" without it falls back to the
        self error ``||P_hat - P||`` (there is no product to measure).
        """
        if not self.enabled:
            return
        if self.init == "minmax":
            self.reset_observer()
            self.observe(x)
            self.init_from_minmax()
            return
        V = partner.float() if (self.init == "output" and partner is not None) else None
        self.init_from(x.float(), V)

    @torch.no_grad()
    def init_from(self, P: torch.Tensor, V: torch.Tensor | None = None) -> torch.Tensor:
        """Grid-search initial bounds on calibration attention ``P`` (B, H, N, N) (aiqvit.md §3.4).

        ``b1`` in {0} (clip) or {0, 1e-4, 1e-3, 5e-3} (zero); ``b2`` among the
        {0.99, 0.999, 0.9999, 1.0} quantiles of ``P``. Criterion ``||P_hat V - P V||^2`` when
        ``V`` (B, H, N, D) is given, else ``||P_hat - P||^2``; per head for the per-head
        granularity. Returns the chosen pair's error (per head: shape (H,)).
        """
        if not self.enabled:
            return torch.zeros(1)
        per_head = self.granularity == "head"
        if per_head and P.dim() != 4:
            raise RuntimeError(f"a per-head DFQ needs P of shape (B, H, N, N), got {tuple(P.shape)}")
        P = P.detach().float()
        Vf = V.detach().float() if V is not None else None
        shape = (1, P.shape[1], 1, 1) if per_head else (1,)
        b2_cands = _quantiles(P, DFQ_B2_QUANTILES, per_head)  # (4, rows)
        b1_cands = DFQ_B1_ZERO_MODE if self.below == "zero" else (0.0,)
        dims = self._reduce(P)
        best_err = best_b1 = best_b2 = None
        for b1v in b1_cands:
            for j in range(b2_cands.shape[0]):
                b1 = torch.full(shape, float(b1v), device=P.device)
                b2 = torch.maximum(b2_cands[j].reshape(shape).clamp(max=1.0), b1 + DFQ_EPS)
                diff = _dfq_fake(P, b1, b2, self.bits, self.below) - P
                if Vf is not None:
                    diff = diff @ Vf
                err = diff.pow(2).sum(dim=dims if per_head else list(range(diff.dim()))).reshape(-1)
                if best_err is None:
                    best_err, best_b1, best_b2 = err, b1.reshape(-1), b2.reshape(-1)
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best_b1 = torch.where(better, b1.reshape(-1), best_b1)
                    best_b2 = torch.where(better, b2.reshape(-1), best_b2)
        self.set_bounds(best_b1, best_b2)
        return best_err

    # ----------------------------------------------------------------- forward
    _NOT_READY_HINT = "run calibrate_itself(), observe() + init_from_minmax(), or set_bounds() before quantizing"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._check_ready()
        return self._qdrop(x, _dfq_fake(x, self.b1, self.b2, self.bits, self.below))

    # ----------------------------------------------------------------- integer forms (§3.5)
    def integer_view(self) -> IntegerView:
        """Kind ``dfq``: ``x_hat = (q - zero_point) * scale`` with ``scale = Delta``.

        clip: ``zero_point = -b1 / Delta`` (the equivalent affine grid, NOT rounded; see
        :meth:`snap_zero_point_`). zero: ``zero_point = 1 - b1 / Delta`` and code 0 means an exact 0.
        ``extra`` holds ``b1``, ``b2`` and ``below``.
        """
        self._check_ready()
        delta = self.delta().detach().clone()
        zp = -self.b1.detach() / delta + (0.0 if self.below == "clip" else 1.0)
        return IntegerView(kind="dfq", bits=self.bits, scale=delta, zero_point=zp, qmin=0, qmax=2 ** self.bits - 1,
                           axis=1 if self.b1.numel() > 1 else None, signed=False,
                           extra={"b1": self.b1.detach().clone(), "b2": self.b2.detach().clone(), "below": self.below})

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The k-bit integer codes (int32) of attention ``x``, the ones :meth:`forward` dequantizes."""
        self._check_ready()
        q = torch.clamp(torch.round((x - self.b1) / self.delta()), 0, self.levels)
        if self.below == "zero":
            q = torch.where(x < self.b1, torch.zeros_like(q), q + 1)
        return q.to(torch.int32)

    @torch.no_grad()
    def integer_matmul(self, P: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``DFQ(P) @ V`` as one GEMM on the integer codes plus a correction (aiqvit.md §3.5).

        clip: ``Delta (q V) + b1 (1 V)`` - the rank-1 term is ``b1`` times the column sums of
        ``V``, shared by every query row. zero: ``Delta (c V) + (b1 - Delta) ([c > 0] V)``, which
        needs an extra masked sum (not free on standard hardware).
        """
        c = self.codes(P)
        delta, b1 = self.delta().to(V.dtype), self.b1.to(V.dtype)
        main = delta * (c.to(V.dtype) @ V)
        if self.below == "clip":
            return main + b1 * V.sum(dim=-2, keepdim=True)
        return main + (b1 - delta) * ((c > 0).to(V.dtype) @ V)

    @torch.no_grad()
    def to_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of the equivalent asymmetric uniform quantizer (clip mode).

        ``scale = Delta``, ``zero_point = -b1 / Delta``, NOT rounded: a uniform quantizer with an
        integer zero point only matches after :meth:`snap_zero_point_` moved ``b1`` onto the grid.
        """
        if self.below != "clip":
            raise VitqError("dfq below='zero' has no affine (scale, zero point) equivalent; use below='clip'")
        view = self.integer_view()
        return view.scale, view.zero_point

    @torch.no_grad()
    def snap_zero_point_(self) -> None:
        """Move ``b1`` to ``-round(-b1/Delta) Delta`` (< Delta/2 away) keeping ``Delta`` (b2 moves too).

        Afterwards :meth:`to_affine` has an integer zero point. ``b2`` may end up slightly above 1
        (harmless for inference); do not call :meth:`project_` after snapping.
        """
        delta = self.delta()
        new_b1 = -torch.round(-self.b1 / delta) * delta
        self.b2.copy_(new_b1 + delta * self.levels)
        self.b1.copy_(new_b1)

    def to_uniform(self) -> UniformQuantizer:
        """A calibrated :class:`~vitq.quantizers.UniformQuantizer` from :meth:`to_affine`."""
        scale, zp = self.to_affine()
        gran = "head" if self.b1.numel() > 1 else "tensor"
        q = UniformQuantizer(self.bits, symmetric=False, granularity=gran, axis=1 if gran == "head" else None)
        q.set_params(scale, zp)
        return q

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, {self.granularity}, below={self.below}, init={self.init}, "
                f"bounds_shape={tuple(self.b1.shape)}")


def make_dfq(bits: int, granularity: str, num_heads: int, options: dict[str, Any]) -> DynamicFocusingQuantizer:
    """The ``"dfq"`` post-softmax factory: options ``granularity``, ``below``, ``init`` (see the class).

    ``granularity`` (the recipe's matmul granularity) is not used: DFQ's own granularity is the
    option, per layer by default as in the paper (aiqvit.md §6.11).
    """
    unknown = sorted(set(options) - {"granularity", "below", "init"})
    if unknown:
        raise VitqError(f"unknown dfq softmax options {unknown}; the options are granularity, below, init")
    return DynamicFocusingQuantizer(bits, granularity=options.get("granularity", "layer"),
                                    below=options.get("below", "clip"), num_heads=num_heads,
                                    init=options.get("init", "output"))


register_softmax_quantizer("dfq", make_dfq)
