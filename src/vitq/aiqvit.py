"""AIQViT's components (research note aiqvit.md): DFQ, low-rank compensation, rank search, curriculum.

Everything here is engine-agnostic: modules that sit in the slots of the existing quant modules,
plus plain functions that take losses / optimizers, so a reconstruction loop can drive them.

* :class:`DynamicFocusingQuantizer` (DFQ, §3): a learnable interval ``[b1, b2]`` in ``[0, 1]`` for
  post-softmax attention, uniform inside, values outside mapped to the interval (``below="clip"``)
  or to an exact 0 below ``b1`` (``below="zero"``). It has the activation-quantizer surface
  (``bits``, ``enabled``, ``drop_prob``, ``initialized``, ``observe``, ``init_from_minmax``), so it
  fits a :class:`~vitq.qmodules.QuantMatMul`'s ``a_quantizer`` slot.
* Low-rank compensation (LRC, §2.2) of a :class:`~vitq.qmodules.QuantLinear`'s weight error:
  :class:`MergedLowRank` (``W_hat = Q_w(W0 + B A)``, zero inference overhead, the default) and
  :class:`SideBranchLowRank` (``y = x Q_w(W0)^T + b + x (B A)^T``). :func:`attach_lowrank` /
  :func:`detach_lowrank` install them without changing ``qmodules.py``.
* Rank search (§2.3-2.4): the nested-rank (or independent) supernet lives in
  :class:`LowRankFactors` (``alpha``, ``pi``, ``mask``, ``expected_cost``, ``discretise``);
  :func:`first_order_darts_step` alternates a weight and an architecture step; :func:`energy_rank`
  is the SVD-energy fallback.
* Curriculum (§4): :func:`curriculum_order`, :func:`curriculum_pool_size`, :func:`sample_batch`.
* :class:`AIQConfig`: every switch, including each open point of aiqvit.md §6.

Known limits: (resolved) DFQ derives from ``vitq.quantizers.Quantizer``, so quant modules list it;
so a DFQ in a slot is invisible to them, and the calibration "mse" search treats any non-log
quantizer as uniform; calibrate a DFQ with ``init_minmax`` / :meth:`DynamicFocusingQuantizer.init_from`.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import VitqError
from .qmodules import QuantLinear, QuantMode
from .quantizers import AdaRoundQuantizer, Quantizer, UniformQuantizer, round_ste

DFQ_GRANULARITIES = ("layer", "head")
DFQ_BELOW = ("clip", "zero")
LOWRANK_MODES = ("merged", "side")
# The spec's names for the two forms (aiqvit.md §2.2) are accepted as aliases.
_MODE_ALIASES = {"premerge": "merged", "residual": "side", "merged": "merged", "side": "side"}
SUPERNETS = ("nested", "independent")
RANK_POLICIES = ("search", "fixed", "energy")
CANDIDATE_MODES = ("absolute", "relative")
DEFAULT_CANDIDATES = (0, 10, 20, 40, 60, 80, 100)
DEFAULT_FRACTIONS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
DFQ_EPS = 1e-4
# b2 candidates of the DFQ initial grid search: these quantiles of P (1.0 = max), aiqvit.md §3.4.
DFQ_B2_QUANTILES = (0.99, 0.999, 0.9999, 1.0)
DFQ_B1_ZERO_MODE = (0.0, 1e-4, 1e-3, 5e-3)
# torch.quantile refuses inputs above 2^24 elements; larger maps are subsampled (fixed seed).
_QUANTILE_MAX = 1 << 24


def _choice(field_name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise VitqError(f"{field_name} must be one of {', '.join(map(str, choices))}, got {value!r}")


# =========================================================================== DFQ

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
    they get gradients by autograd through :func:`~vitq.quantizers.round_ste`. Call
    :meth:`project_` after every optimizer step to keep ``0 <= b1 < b2 <= 1``.

    Args:
        bits: 2..8, or None/16/32 for "off" (identity).
        granularity: "layer" (one pair, default) or "head" (one pair per head, dim 1).
        below: "clip" or "zero".
        num_heads: creates the per-head pair at once; otherwise its size is set by the first
            :meth:`observe`, :meth:`init_from` or :meth:`set_bounds`.
    """

    # the bounds become per-head only once the head count is known
    _RESIZABLE = ("b1", "b2", "min_val", "max_val")

    def __init__(self, bits: int | None, granularity: str = "layer", below: str = "clip",
                 num_heads: int | None = None) -> None:
        super().__init__(bits)
        _choice("dfq granularity", granularity, DFQ_GRANULARITIES)
        _choice("dfq below", below, DFQ_BELOW)
        self.granularity = granularity
        self.below = below
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

    @torch.no_grad()
    def project_(self, eps: float = DFQ_EPS) -> None:
        """Clamp ``b1`` to ``[0, 1-eps]`` and ``b2`` to ``[b1+eps, 1]``; call after each optimizer step."""
        self.b1.clamp_(0.0, 1.0 - eps)
        self.b2.copy_(torch.minimum(torch.maximum(self.b2, self.b1 + eps), torch.ones_like(self.b2)))

    # ----------------------------------------------------------------- observer / min-max
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
    def init_from(self, P: torch.Tensor, V: torch.Tensor | None = None) -> torch.Tensor:
        """Grid-search initial bounds on calibration attention ``P`` (B, H, N, N) (aiqvit.md §3.4).

        ``b1`` in {0} (clip) or {0, 1e-4, 1e-3, 5e-3} (zero); ``b2`` among the
        {0.99, 0.999, 0.9999, 1.0} quantiles of ``P``. Criterion ``||P_hat V - P V||^2`` when
        ``V`` (B, H, N, D) is given, else ``||P_hat - P||^2``; per head for the per-head
        granularity. Pass a subsample of the calibration maps for large sets.
        Returns the chosen pair's error (per head: shape (H,)).
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
                b2 = b2_cands[j].reshape(shape).clamp(max=1.0)
                b2 = torch.maximum(b2, b1 + DFQ_EPS)
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
    _NOT_READY_HINT = "run init_from(), observe() + init_from_minmax(), or set_bounds() before quantizing"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._check_ready()
        return self._qdrop(x, _dfq_fake(x, self.b1, self.b2, self.bits, self.below))

    # ----------------------------------------------------------------- integer forms (§3.5)
    @torch.no_grad()
    def codes(self, P: torch.Tensor) -> torch.Tensor:
        """The k-bit integer codes of ``P`` (int64), the ones :meth:`forward` dequantizes."""
        self._check_ready()
        delta = self.delta()
        q = torch.clamp(torch.round((P - self.b1) / delta), 0, self.levels)
        if self.below == "zero":
            q = torch.where(P < self.b1, torch.zeros_like(q), q + 1)
        return q.to(torch.int64)

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
        integer zero point (e.g. :class:`~vitq.quantizers.UniformQuantizer`, which rounds it)
        only matches after :meth:`snap_zero_point_` moved ``b1`` onto the grid (aiqvit.md §3.5).
        """
        if self.below != "clip":
            raise VitqError("dfq below='zero' has no affine (scale, zero point) equivalent; use below='clip'")
        self._check_ready()
        delta = self.delta().detach().clone()
        return delta, -self.b1.detach() / delta

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
        return f"bits={self.bits}, {self.granularity}, below={self.below}, bounds_shape={tuple(self.b1.shape)}"


def dfq_parameters(module: nn.Module) -> list[nn.Parameter]:
    """``b1`` and ``b2`` of every DFQ inside ``module``."""
    return [p for m in module.modules() if isinstance(m, DynamicFocusingQuantizer) for p in (m.b1, m.b2)]


def project_dfq_(module: nn.Module) -> None:
    """:meth:`DynamicFocusingQuantizer.project_` on every DFQ inside ``module``."""
    for m in module.modules():
        if isinstance(m, DynamicFocusingQuantizer):
            m.project_()


# =========================================================================== low-rank factors

def _fake_quant_rows(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric fake quantization (straight-through), for 8-bit side-branch factors."""
    if t.numel() == 0:
        return t
    qmax = 2 ** (bits - 1) - 1
    s = (t.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    return torch.clamp(round_ste(t / s), -qmax - 1, qmax) * s


def _svd_factors(E: torch.Tensor, rank: int, act_rms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with ``B A`` the rank-``rank`` truncated SVD of ``E`` (activation-scaled if given).

    With ``a = act_rms``: SVD of ``E diag(a)``, then ``A`` is unscaled by ``diag(1/a)`` so that
    ``B A`` approximates ``E`` where the inputs are large (LQER). Singular values are split as
    square roots on both factors so neither factor dominates the learning rate.
    """
    E64 = E.detach().double()
    a = None
    if act_rms is not None:
        a = act_rms.detach().double().reshape(1, -1).clamp(min=1e-8)
        E64 = E64 * a
    U, S, Vh = torch.linalg.svd(E64, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B = U[:, :r] * root[None, :]
    A = root[:, None] * Vh[:r]
    if a is not None:
        A = A / a
    if r < rank:  # more components asked than the matrix has: pad with zeros (no effect)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)
        A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], 0)
    return B.to(E.dtype), A.to(E.dtype)


class LowRankFactors(nn.Module):
    """``delta W = B diag(m) A`` with optional rank-search logits (aiqvit.md §2.3).

    Without ``candidates``: a fixed rank, ``m = 1``. With ``candidates`` (K ranks): logits
    ``alpha`` (K, init 0), ``pi = softmax(alpha / tau)`` and

    * ``supernet="nested"`` (default): one A/B pair of ``r_max`` components,
      ``m_j = sum_{k: r_k >= j} pi_k`` for j = 1..r_max (the first j components are shared);
    * ``supernet="independent"``: one segment of ``r_k`` components per candidate, each scaled by
      ``pi_k`` (the textbook DARTS mixture ``sum_k pi_k B_k A_k``).

    :meth:`discretise` keeps the components of ``r_{argmax alpha}`` and drops ``alpha``.
    Re-create optimizers over A/B afterwards (the Parameters are replaced).
    """

    def __init__(self, d_out: int, d_in: int, rank: int = 0, *, candidates: Sequence[int] | None = None,
                 tau: float = 1.0, supernet: str = "nested", factor_bits: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _choice("supernet", supernet, SUPERNETS)
        if factor_bits not in (None, 8):
            raise VitqError(f"factor_bits must be None (full precision) or 8, got {factor_bits!r}")
        if tau <= 0:
            raise VitqError(f"tau must be positive, got {tau}")
        self.d_out, self.d_in = int(d_out), int(d_in)
        self.supernet, self.tau, self.factor_bits = supernet, float(tau), factor_bits
        if candidates is not None:
            cands = sorted({int(r) for r in candidates})
            if not cands or cands[0] < 0:
                raise VitqError(f"rank candidates must be non-negative integers, got {list(candidates)}")
            self.register_buffer("candidates", torch.tensor(cands, dtype=torch.long))
            self.alpha: Optional[nn.Parameter] = nn.Parameter(torch.zeros(len(cands)))
            total = max(cands) if supernet == "nested" else sum(cands)
        else:
            if rank < 0:
                raise VitqError(f"rank must be >= 0, got {rank}")
            self.register_buffer("candidates", torch.empty(0, dtype=torch.long))
            self.alpha = None
            total = int(rank)
        self.A = nn.Parameter(torch.zeros(total, self.d_in))
        self.B = nn.Parameter(torch.zeros(self.d_out, total))
        self.reset_lora_(generator)

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def reset_lora_(self, generator: torch.Generator | None = None) -> None:
        """LoRA init: A Kaiming-uniform (as nn.Linear), B = 0, so ``delta W = 0`` exactly."""
        if self.A.numel():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B.zero_()

    @torch.no_grad()
    def init_svd_(self, E: torch.Tensor, act_rms: torch.Tensor | None = None) -> None:
        """Factors from the truncated SVD of the error ``E`` (d_out, d_in) (aiqvit.md §2.2)."""
        if tuple(E.shape) != (self.d_out, self.d_in):
            raise ValueError(f"error matrix {tuple(E.shape)} does not match ({self.d_out}, {self.d_in})")
        if self.supernet == "nested" or self.alpha is None:
            B, A = _svd_factors(E, self.A.shape[0], act_rms)
        else:  # every candidate segment starts from its own top-r_k components
            parts = [_svd_factors(E, int(r), act_rms) for r in self.candidates.tolist()]
            B = torch.cat([p[0] for p in parts], 1)
            A = torch.cat([p[1] for p in parts], 0)
        self.A.data = A.to(self.A.device, self.A.dtype)
        self.B.data = B.to(self.B.device, self.B.dtype)

    # ----------------------------------------------------------------- search state
    @property
    def rank(self) -> int:
        """Number of stored components (r_max during a nested search)."""
        return int(self.A.shape[0])

    @property
    def searching(self) -> bool:
        """True while rank-search logits exist (before :meth:`discretise`)."""
        return self.alpha is not None

    def pi(self) -> torch.Tensor:
        """``softmax(alpha / tau)`` over the candidates."""
        if self.alpha is None:
            raise RuntimeError("pi() without rank candidates (no search)")
        return torch.softmax(self.alpha / self.tau, dim=0)

    def mask(self) -> torch.Tensor | None:
        """Soft component mask ``m`` (rank,), or None when the rank is fixed."""
        if self.alpha is None:
            return None
        pi = self.pi()
        ranks = self.candidates.to(pi.device)
        if self.supernet == "nested":
            j = torch.arange(1, self.rank + 1, device=pi.device)
            return (ranks[None, :] >= j[:, None]).to(pi.dtype) @ pi
        return torch.repeat_interleave(pi, ranks, output_size=self.rank)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.factor_bits is None:
            return self.A, self.B
        return _fake_quant_rows(self.A, self.factor_bits), _fake_quant_rows(self.B, self.factor_bits)

    def delta(self) -> torch.Tensor:
        """``B diag(m) A`` (d_out, d_in); exact zeros for rank 0 or B = 0."""
        A, B = self._factors()
        m = self.mask()
        if m is not None:
            B = B * m[None, :]
        return B @ A

    def expected_cost(self) -> torch.Tensor:
        """``sum_k pi_k r_k (d_in + d_out) / (d_in d_out)``: expected relative parameter overhead.

        For a fixed rank: ``r (d_in + d_out) / (d_in d_out)`` (a constant).
        """
        rel = (self.d_in + self.d_out) / (self.d_in * self.d_out)
        if self.alpha is None:
            return torch.tensor(self.rank * rel, device=self.A.device)
        return (self.pi() * self.candidates.to(self.alpha.dtype)).sum() * rel

    def chosen_rank(self) -> int:
        """``r_{argmax alpha}`` (the stored rank when not searching)."""
        if self.alpha is None:
            return self.rank
        return int(self.candidates[int(torch.argmax(self.alpha.detach()))])

    @torch.no_grad()
    def discretise(self, reinit: bool = False, generator: torch.Generator | None = None) -> int:
        """Slice A, B to the chosen rank, drop ``alpha``; returns the rank.

        ``reinit=True`` restarts B = 0 (A Kaiming) instead of keeping the searched values
        (aiqvit.md §2.4 ``reinit_after_search``); :class:`SideBranchLowRank` re-runs its SVD init.
        """
        if self.alpha is None:
            return self.rank
        k = int(torch.argmax(self.alpha.detach()))
        r = int(self.candidates[k])
        if self.supernet == "nested":
            start = 0
        else:
            start = int(self.candidates[:k].sum())
        self.A = nn.Parameter(self.A.detach()[start:start + r].clone())
        self.B = nn.Parameter(self.B.detach()[:, start:start + r].clone())
        self.alpha = None
        self.candidates = torch.empty(0, dtype=torch.long, device=self.A.device)
        if reinit:
            self._reinit(generator)
        return r

    def _reinit(self, generator: torch.Generator | None) -> None:
        self.reset_lora_(generator)

    def __deepcopy__(self, memo: dict[int, Any]) -> "LowRankFactors":
        # The owner layer is held by a weak reference (a strong one would make the module tree
        # cyclic); in a deep copy of the layer it must point to the copied layer, not the original.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_layer":
                new.__dict__[key] = copy.deepcopy(value, memo)
        ref = self.__dict__.get("_layer")
        owner = ref() if ref is not None else None
        new.__dict__["_layer"] = weakref.ref(memo[id(owner)]) if owner is not None and id(owner) in memo else ref
        return new

    def extra_repr(self) -> str:
        search = f", candidates={self.candidates.tolist()}, supernet={self.supernet}, tau={self.tau}" \
            if self.alpha is not None else ""
        bits = "fp" if self.factor_bits is None else f"int{self.factor_bits}"
        return f"d_out={self.d_out}, d_in={self.d_in}, rank={self.rank}, factors={bits}{search}"


def _owner(ref: Optional[weakref.ref]) -> QuantLinear:
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError("this low-rank module is not attached to a QuantLinear (use attach_lowrank)")
    return layer


class MergedLowRank(LowRankFactors):
    """Merged ("premerge") compensation: a replacement weight quantizer ``w -> Q_w(w + B A)``.

    ``base`` is the layer's weight quantizer (UniformQuantizer or AdaRoundQuantizer); the sum is
    passed through it, so rounding uses the straight-through estimator and A, B get gradients
    (for AdaRound, whose floor has no input gradient, an in-range straight-through path is added).
    With B = 0 (the init) the output is bit-identical to ``base(w)``. In ``QuantMode.OBSERVE``
    the layer calls :meth:`observe`, which observes ``w + B A``. Zero inference overhead: fold
    with :func:`detach_lowrank` (writes :meth:`merge` into the weight, restores ``base``).
    """

    def __init__(self, base: nn.Module, d_out: int, d_in: int, rank: int = 0, **kwargs: Any) -> None:
        if kwargs.get("factor_bits") is not None:
            raise VitqError("factor_bits only applies to the side branch (merged factors are folded away)")
        super().__init__(d_out, d_in, rank, **kwargs)
        self.base = base
        self._layer: Optional[weakref.ref] = None

    # The attributes code expects of a weight quantizer are the base's.
    @property
    def bits(self) -> int | None:
        return getattr(self.base, "bits", None)

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.base, "enabled", True))

    @property
    def is_calibrated(self) -> bool:
        return bool(getattr(self.base, "is_calibrated", True))

    def observe(self, w: torch.Tensor) -> None:
        """Observe ``w + B A`` in the base quantizer (if it observes)."""
        if hasattr(self.base, "observe"):
            self.base.observe(w + self.delta().detach())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        v = w + self.delta()
        out = self.base(v)
        if isinstance(self.base, AdaRoundQuantizer):
            # AdaRound's floor() has zero gradient w.r.t. its input, so A and B would never
            # learn: add a straight-through path (inside the grid only, like round_ste + clamp).
            # Its value is exactly 0, so the output stays bit-identical to base(v).
            t = v.detach() / self.base.scale + self.base.zero_point
            inside = ((t >= self.base.qmin) & (t <= self.base.qmax)).to(v.dtype)
            out = out + (v - v.detach()) * inside
        return out

    @torch.no_grad()
    def merge(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W0 + B A`` (the weight to fold); ``weight`` defaults to the attached layer's."""
        w = weight if weight is not None else _owner(self._layer).weight
        return w.detach() + self.delta().detach()


class SideBranchLowRank(LowRankFactors):
    """Side-branch ("residual") compensation: ``y = F.linear(x_q, Q_w(W0), b) + x_q (B A)^T``.

    :meth:`forward` returns the branch term ``x (B diag(m) A)^T`` only (two thin GEMMs).
    :func:`attach_lowrank` registers it as the layer's ``lowrank`` child and adds it with a
    forward hook, in ``QuantMode.QUANT`` only (FLOAT/OBSERVE keep the float layer). The hook
    feeds the branch the layer's *quantized* input: a forward hook on the layer's activation
    quantizer stashes its output, so QDrop's random mask is the same on both paths. Rank 0 adds
    nothing (bit-exact). ``factor_bits=8`` fake-quantizes A and B per row (symmetric).
    """

    def __init__(self, d_out: int, d_in: int, rank: int = 0, **kwargs: Any) -> None:
        super().__init__(d_out, d_in, rank, **kwargs)
        self._layer: Optional[weakref.ref] = None
        self._handles: list[Any] = []
        self._xq: torch.Tensor | None = None
        self._svd_source: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self._factors()
        h = F.linear(x, A)
        m = self.mask()
        if m is not None:
            h = h * m
        return F.linear(h, B)

    @torch.no_grad()
    def init_from_layer_(self, layer: QuantLinear, act_rms: torch.Tensor | None = None) -> None:
        """SVD init on ``E = W0 - Q_w(W0)`` of ``layer`` (activation-scaled by ``act_rms``)."""
        E = layer.weight.detach() - _quantized_weight(layer)
        self._svd_source = (E.clone(), None if act_rms is None else act_rms.detach().clone())
        self.init_svd_(E, act_rms)

    def _reinit(self, generator: torch.Generator | None) -> None:
        if self._svd_source is None:
            self.reset_lora_(generator)
        else:
            self.init_svd_(*self._svd_source)

    def effective_weight(self) -> torch.Tensor:
        """``Q_w(W0) + B diag(m) A`` of the attached layer (what the branch makes it compute)."""
        layer = _owner(self._layer)
        return _quantized_weight(layer) + self.delta()

    # --- hook plumbing (see attach_lowrank)
    def _stash(self, _m: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self._xq = output

    def _add(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x_q, self._xq = self._xq, None
        if layer.mode != QuantMode.QUANT or self.rank == 0:
            return None  # keep the layer's output untouched (bit-exact)
        if x_q is None:
            # no activation quantizer, or it did not run: the layer saw the raw input
            aq = layer.a_quantizer
            x_q = inputs[0] if aq is None else aq(inputs[0])
        return output + self(x_q)


def _quantized_weight(layer: QuantLinear) -> torch.Tensor:
    wq = layer.w_quantizer
    return layer.weight if wq is None else wq(layer.weight)


# =========================================================================== attach / detach

def attach_lowrank(layer: QuantLinear, mode: str = "merged", rank: int = 20, *,
                   candidates: Sequence[int] | None = None, tau: float = 1.0, supernet: str = "nested",
                   init: str = "auto", act_rms: torch.Tensor | None = None, factor_bits: int | None = None,
                   generator: torch.Generator | None = None) -> LowRankFactors:
    """Install low-rank compensation on a calibrated :class:`~vitq.qmodules.QuantLinear`.

    ``mode="merged"``: the layer's ``w_quantizer`` becomes a :class:`MergedLowRank` wrapping it
    (state-dict keys move to ``w_quantizer.base.*`` while attached). ``mode="side"``: a
    :class:`SideBranchLowRank` becomes the child ``layer.lowrank`` and two forward hooks add its
    output (module names, classes and ``qmodules.py`` stay unchanged, unlike a wrapper module).
    ``candidates`` turns on the rank search (``rank`` is then ignored: r_max comes from them).
    ``init``: "auto" (merged: "lora"; side: "svd"), "lora" (B = 0) or "svd" (side only).
    Returns the installed module.
    """
    if not isinstance(layer, QuantLinear):
        raise VitqError(f"low-rank compensation needs a vitq QuantLinear, got {type(layer).__name__}")
    mode = _MODE_ALIASES.get(mode, mode)
    _choice("lowrank mode", mode, LOWRANK_MODES)
    _choice("lowrank init", init, ("auto", "lora", "svd"))
    if find_lowrank(layer) is not None:
        raise VitqError("this layer already has low-rank compensation; detach_lowrank() it first")
    wq = layer.w_quantizer
    if wq is None:
        raise VitqError("the layer has no weight quantizer, so there is no quantization error to compensate")
    if not getattr(wq, "is_calibrated", True):
        raise VitqError("calibrate the layer's weight quantizer before attaching low-rank compensation")
    init = ("lora" if mode == "merged" else "svd") if init == "auto" else init
    kwargs = dict(candidates=candidates, tau=tau, supernet=supernet, generator=generator)
    dev, dtype = layer.weight.device, layer.weight.dtype
    d_out, d_in = layer.weight.shape
    if mode == "merged":
        if init == "svd":
            raise VitqError("init='svd' is for the side branch; the merged form starts at B = 0")
        mod: LowRankFactors = MergedLowRank(wq, d_out, d_in, rank, **kwargs).to(dev, dtype)
        mod._layer = weakref.ref(layer)
        layer.w_quantizer = mod
        return mod
    side = SideBranchLowRank(d_out, d_in, rank, factor_bits=factor_bits, **kwargs).to(dev, dtype)
    if init == "svd":
        side.init_from_layer_(layer, act_rms)
    side._layer = weakref.ref(layer)
    layer.lowrank = side
    if layer.a_quantizer is not None:
        side._handles.append(layer.a_quantizer.register_forward_hook(side._stash))
    side._handles.append(layer.register_forward_hook(side._add))
    return side


def find_lowrank(layer: nn.Module) -> LowRankFactors | None:
    """The low-rank module attached to ``layer`` (merged or side), or None."""
    if isinstance(getattr(layer, "w_quantizer", None), MergedLowRank):
        return layer.w_quantizer
    side = getattr(layer, "lowrank", None)
    return side if isinstance(side, SideBranchLowRank) else None


def lowrank_modules(model: nn.Module) -> list[tuple[str, LowRankFactors]]:
    """(layer name, low-rank module) of every compensated QuantLinear, in forward order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            lr = find_lowrank(m)
            if lr is not None:
                out.append((name, lr))
    return out


@torch.no_grad()
def detach_lowrank(layer: QuantLinear, fold: bool = True) -> LowRankFactors | None:
    """Remove the compensation of ``layer``; returns the removed module (None if none).

    ``fold=True`` writes ``W0 + B A`` into ``layer.weight``. Merged form: exact (the layer keeps
    computing ``Q_w(W0 + B A)``, now with no A/B tensors - the finalisation of aiqvit.md §2.2).
    Side form: this converts to the merged semantics ``Q_w(W0 + B A)``, which is NOT the branch's
    output ``Q_w(W0) + B A``; keep the branch attached (or export its factors) to preserve it.
    ``fold=False`` just drops the compensation.
    """
    mod = find_lowrank(layer)
    if mod is None:
        return None
    if fold and mod.rank > 0:
        layer.weight.data = layer.weight.data + mod.delta().detach().to(layer.weight.dtype)
    if isinstance(mod, MergedLowRank):
        layer.w_quantizer = mod.base
    else:
        # Remove the hooks by identity rather than through the stored handles: after a deep copy
        # the handles would still point to the original layer's hook tables.
        for owner in (layer, layer.a_quantizer):
            if owner is None:
                continue
            for key, fn in list(owner._forward_hooks.items()):
                if getattr(fn, "__self__", None) is mod:
                    del owner._forward_hooks[key]
        mod._handles.clear()
        del layer.lowrank
    mod._layer = None
    return mod


def lowrank_overhead(d_in: int, d_out: int, rank: int, tokens: int = 1, factor_bits: int | None = None,
                     mode: str = "side") -> dict[str, int]:
    """Inference overhead of one compensated Linear (aiqvit.md §2.5).

    Merged: zero (folded into the k-bit weight). Side: ``r (d_in + d_out)`` extra parameters,
    ``2 tokens r (d_in + d_out)`` FLOPs, stored at 16 bits (FP16) or ``factor_bits`` plus one
    FP16 scale per factor row (``r + d_out`` rows).
    """
    mode = _MODE_ALIASES.get(mode, mode)
    _choice("lowrank mode", mode, LOWRANK_MODES)
    if mode == "merged" or rank == 0:
        return {"params": 0, "flops": 0, "weight_bits": 0}
    params = rank * (d_in + d_out)
    bits = 16 * params if factor_bits is None else factor_bits * params + 16 * (rank + d_out)
    return {"params": params, "flops": 2 * tokens * params, "weight_bits": bits}


# =========================================================================== rank search

def candidate_ranks(d_in: int, d_out: int, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                    mode: str = "absolute", fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    multiple: int = 4, limit: float = 1.5) -> list[int]:
    """Rank candidates of one layer, truncated to ranks ``< min(d_in, d_out) / limit`` (0 kept).

    ``relative``: ``fractions`` of ``min(d_in, d_out)`` rounded to multiples of ``multiple``.
    """
    _choice("candidate mode", mode, CANDIDATE_MODES)
    small = min(d_in, d_out)
    if mode == "relative":
        raw = [int(round(f * small / multiple)) * multiple for f in fractions]
    else:
        raw = [int(r) for r in candidates]
    if any(r < 0 for r in raw):
        raise VitqError(f"rank candidates must be non-negative, got {raw}")
    kept = sorted({r for r in raw if r == 0 or r < small / limit})
    return kept or [0]


def energy_rank(E: torch.Tensor, candidates: Sequence[int], energy: float = 0.9,
                act_rms: torch.Tensor | None = None) -> int:
    """Smallest candidate whose top singular values hold ``>= energy`` of ``||E diag(a)||_F^2``.

    The SVD-energy fallback of aiqvit.md §2.4. A zero error returns the smallest candidate;
    if no candidate reaches the share, the largest one.
    """
    if not 0.0 < energy <= 1.0:
        raise VitqError(f"energy must be in (0, 1], got {energy}")
    cands = sorted({int(r) for r in candidates})
    M = E.detach().double()
    if act_rms is not None:
        M = M * act_rms.detach().double().reshape(1, -1)
    s2 = torch.linalg.svdvals(M).pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return cands[0]
    cum = torch.cumsum(s2, 0) / total
    for r in cands:
        held = 0.0 if r == 0 else float(cum[min(r, cum.numel()) - 1])
        if held >= energy - 1e-12:
            return r
    return cands[-1]


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The rank-search logits ``alpha`` of every low-rank module in ``model``."""
    return [m.alpha for m in model.modules() if isinstance(m, LowRankFactors) and m.alpha is not None]


def lowrank_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A and B of every low-rank module in ``model``."""
    return [p for m in model.modules() if isinstance(m, LowRankFactors) for p in (m.A, m.B)]


def make_arch_optimizer(params: Sequence[nn.Parameter], lr: float = 5e-3, betas: tuple[float, float] = (0.5, 0.999),
                        weight_decay: float = 1e-3) -> torch.optim.Optimizer:
    """Adam for the architecture logits with the DARTS settings of aiqvit.md §1.2."""
    return torch.optim.Adam(list(params), lr=lr, betas=betas, weight_decay=weight_decay)


def search_split(n: int, split: float = 0.8, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (train, val) index split of ``n`` samples for the bi-level search."""
    if not 0.0 < split < 1.0:
        raise VitqError(f"search split must be in (0, 1), got {split}")
    perm = torch.randperm(n, generator=generator)
    k = min(n - 1, max(1, int(round(split * n))))
    return perm[:k], perm[k:]


def arch_objective(val_loss: torch.Tensor, lowranks: Sequence[LowRankFactors], size_penalty: float = 0.01,
                   ref_loss: float | None = None) -> torch.Tensor:
    """``L_rec(val) / L_rec,0 + lambda * sum_layers C_layer`` (aiqvit.md §2.4).

    ``ref_loss`` (the block's loss at the start of the search) makes lambda scale-free; None
    leaves the loss unnormalised.
    """
    loss = val_loss / max(ref_loss, 1e-12) if ref_loss is not None else val_loss
    if size_penalty and lowranks:
        loss = loss + size_penalty * sum(m.expected_cost() for m in lowranks)
    return loss


def first_order_darts_step(weight_loss: Callable[[], torch.Tensor], val_loss: Callable[[], torch.Tensor],
                           weight_opt: torch.optim.Optimizer | None, arch_opt: torch.optim.Optimizer,
                           lowranks: Sequence[LowRankFactors], size_penalty: float = 0.01,
                           ref_loss: float | None = None,
                           after_weight_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One alternating first-order DARTS iteration: a weight step, then an architecture step.

    ``weight_loss()`` must return the reconstruction loss on a search-train minibatch and
    ``val_loss()`` on a search-val minibatch (both built by the caller, curriculum-paced or not).
    ``weight_opt`` holds A, B (and DFQ bounds), ``arch_opt`` only the ``alpha`` logits; each step
    clears both optimizers' gradients first, so neither step leaks into the other.
    ``after_weight_step`` runs after the weight update (e.g. ``lambda: project_dfq_(block)``).
    """
    w_val = float("nan")
    if weight_opt is not None:
        arch_opt.zero_grad(set_to_none=True)
        weight_opt.zero_grad(set_to_none=True)
        lw = weight_loss()
        if lw.requires_grad:
            lw.backward()
        weight_opt.step()
        w_val = float(lw.detach())
        if after_weight_step is not None:
            after_weight_step()
    arch_opt.zero_grad(set_to_none=True)
    if weight_opt is not None:
        weight_opt.zero_grad(set_to_none=True)
    lv = val_loss()
    la = arch_objective(lv, lowranks, size_penalty, ref_loss)
    if la.requires_grad:
        la.backward()
    arch_opt.step()
    if weight_opt is not None:
        weight_opt.zero_grad(set_to_none=True)  # the arch pass also filled A/B gradients
    return {"weight_loss": w_val, "val_loss": float(lv.detach()), "arch_loss": float(la.detach())}


# =========================================================================== curriculum

@torch.no_grad()
def sample_difficulty(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      batch_size: int = 64) -> torch.Tensor:
    """Per-sample ``||fn(x_i) - y_i||^2`` (the difficulty score of aiqvit.md §4), on x's device."""
    out = []
    for i in range(0, len(x), batch_size):
        d = fn(x[i:i + batch_size]) - y[i:i + batch_size].to(x.device)
        out.append(d.reshape(len(d), -1).pow(2).sum(1).float())
    return torch.cat(out)


def curriculum_order(per_sample_losses: torch.Tensor) -> torch.Tensor:
    """Sample indices from easy (low loss) to hard; ties keep their original order."""
    return torch.argsort(per_sample_losses.detach().reshape(-1), stable=True)


def curriculum_pool_size(it: int, iters: int, n: int, start: float = 0.3, end: float = 1.0,
                         ramp: float = 0.5) -> int:
    """Easiest samples usable at iteration ``it``: ``ceil(g n)``, ``g = min(end, start + (end - start) it / (ramp iters))``.

    Grows linearly from ``start`` to ``end`` over the first ``ramp`` share of the iterations.
    """
    if not 0.0 < start <= end <= 1.0:
        raise VitqError(f"curriculum needs 0 < start <= end <= 1, got start={start}, end={end}")
    if not 0.0 <= ramp <= 1.0:
        raise VitqError(f"curriculum ramp must be in [0, 1], got {ramp}")
    span = ramp * iters
    g = end if span <= 0 else min(end, start + (end - start) * it / span)
    # the small epsilon keeps 0.3 * 100 from becoming 31 through float error
    return int(min(n, max(1, math.ceil(g * n - 1e-9))))


def sample_batch(order: torch.Tensor, pool: int, batch_size: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A minibatch of sample indices drawn uniformly from the ``pool`` easiest (``order[:pool]``).

    Without replacement when the pool is large enough, with replacement otherwise.
    """
    pool = max(1, min(int(pool), len(order)))
    if batch_size <= pool:
        pick = torch.randperm(pool, generator=generator)[:batch_size]
    else:
        pick = torch.randint(pool, (batch_size,), generator=generator)
    return order[pick.to(order.device)]


# =========================================================================== config

@dataclass
class AIQConfig:
    """AIQViT's own switches; defaults are aiqvit.md's recommendations (W3/W4 budget).

    The §6 open points map to switches as follows. Here: 1 merged vs side -> ``lrc_mode``;
    2 factor precision -> ``factor_bits``; 3 init -> ``lrc_init``, ``lrc_act_scaled``; 4 search ->
    ``rank_policy``, ``supernet``, ``tau``, ``reinit_after_search``; 5 search space ->
    ``candidate_mode``, ``candidates``, ``candidate_fractions``, ``rank_limit``; 6 cost term ->
    ``size_penalty``, ``normalise_search_loss``; 10 (part) -> ``search_iters``, ``search_warmup``, ``lrc_lr``;
    11 -> ``dfq_granularity``; 12 -> ``dfq_below``; 15 -> ``curriculum*``. Settings the recipe
    already owns are not repeated here: the fine-tuning budget, batch, loss, activation-scale
    learning (8-10) are the recipe's ``ReconConfig``; the base quantizers and granularities (8) its
    calibration and quantizer spec; the DFQ initialisation and learning rate (13) are
    ``CalibConfig.dfq_init`` and ``ReconConfig.dfq_lr``. Only the static DFQ (14), the block
    search scope (7), first-order DARTS with argmax discretisation (4) and the initial-MSE
    difficulty (15) are implemented, so they are not switches. 16 (detection, point clouds) is
    outside this toolkit; 17 (the paper's numbers) is not a switch.
    """

    # --- DFQ (§3; §6.11-6.14)
    dfq: bool = True
    dfq_granularity: str = "layer"        # layer | head  (§6.11)
    dfq_below: str = "clip"               # clip | zero   (§6.12)
    # --- low-rank compensation (§2; §6.1-6.3)
    lrc: bool = True
    lrc_mode: str = "merged"              # merged (premerge) | side (residual)  (§6.1)
    factor_bits: Optional[int] = None     # side branch: None = FP16, 8 = per-row int8  (§6.2)
    lrc_init: str = "auto"                # auto (merged: lora, side: svd) | lora | svd  (§6.3)
    lrc_act_scaled: bool = True           # activation-scaled SVD (init and energy policy)  (§6.3)
    lrc_roles: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2", "reduction")
    lrc_patch_embed: bool = False
    lrc_head: bool = False
    lrc_lr: float = 1e-4                  # Adam on A, B  (§6.10)
    # --- rank (§2.3-2.4; §6.4-6.7)
    rank_policy: str = "search"           # search (DARTS) | fixed | energy  (§6.4)
    fixed_rank: int = 20
    candidate_mode: str = "absolute"      # absolute | relative  (§6.5)
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    candidate_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    rank_limit: float = 1.5               # keep candidates < min(d_in, d_out) / rank_limit
    supernet: str = "nested"              # nested | independent  (§6.4)
    tau: float = 1.0
    search_iters: int = 300
    # Share of search_iters that train only A, B before the architecture steps start: with B = 0
    # every candidate rank gives the same output, so without a warm-up only the size penalty moves
    # alpha and short searches pick rank 0 everywhere (seen on the reference model).
    search_warmup: float = 0.25
    search_split: float = 0.8             # train share of the calibration set during the search
    arch_lr: float = 5e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    size_penalty: float = 0.01            # lambda of the expected-parameter cost  (§6.6)
    normalise_search_loss: bool = True    # divide L_rec(val) by L_rec,0  (§6.6)
    reinit_after_search: bool = False
    energy: float = 0.9                   # rank_policy="energy"
    # --- curriculum (§4; §6.15)
    curriculum: bool = True
    curriculum_start: float = 0.3
    curriculum_end: float = 1.0
    curriculum_ramp: float = 0.5          # share of the block's iterations (search + fine-tune)
    seed: int = 0

    def __post_init__(self) -> None:
        self.lrc_mode = _MODE_ALIASES.get(self.lrc_mode, self.lrc_mode)
        self.candidates = tuple(int(r) for r in self.candidates)
        self.candidate_fractions = tuple(float(f) for f in self.candidate_fractions)
        self.lrc_roles = tuple(self.lrc_roles)
        self.arch_betas = tuple(self.arch_betas)  # type: ignore[assignment]
        for name, choices in (("dfq_granularity", DFQ_GRANULARITIES), ("dfq_below", DFQ_BELOW),
                              ("lrc_mode", LOWRANK_MODES), ("lrc_init", ("auto", "lora", "svd")),
                              ("rank_policy", RANK_POLICIES), ("candidate_mode", CANDIDATE_MODES),
                              ("supernet", SUPERNETS)):
            _choice(name, getattr(self, name), choices)
        if self.factor_bits not in (None, 8):
            raise VitqError(f"factor_bits must be None (FP16) or 8, got {self.factor_bits!r}")
        if self.lrc_mode == "merged" and self.lrc_init == "svd":
            raise VitqError("lrc_init='svd' is for lrc_mode='side'; the merged form starts at B = 0")
        bad_roles = set(self.lrc_roles) - {"qkv", "proj", "fc1", "fc2", "reduction"}
        if bad_roles:
            raise VitqError(f"lrc_roles must be among qkv, proj, fc1, fc2, reduction, got {sorted(bad_roles)}")
        if self.fixed_rank < 0:
            raise VitqError(f"fixed_rank must be >= 0, got {self.fixed_rank}")
        if not self.candidates or min(self.candidates) < 0:
            raise VitqError(f"candidates must be non-negative ranks, got {self.candidates}")
        if not self.candidate_fractions or not all(0.0 <= f < 1.0 for f in self.candidate_fractions):
            raise VitqError(f"candidate_fractions must be in [0, 1), got {self.candidate_fractions}")
        if self.rank_limit < 1.0:
            raise VitqError(f"rank_limit must be >= 1, got {self.rank_limit}")
        if self.tau <= 0:
            raise VitqError(f"tau must be positive, got {self.tau}")
        if not 0.0 < self.search_split < 1.0:
            raise VitqError(f"search_split must be in (0, 1), got {self.search_split}")
        if not 0.0 < self.energy <= 1.0:
            raise VitqError(f"energy must be in (0, 1], got {self.energy}")
        if self.size_penalty < 0:
            raise VitqError(f"size_penalty must be >= 0, got {self.size_penalty}")
        for name in ("lrc_lr", "arch_lr"):
            if getattr(self, name) <= 0:
                raise VitqError(f"{name} must be positive, got {getattr(self, name)}")
        if self.arch_weight_decay < 0:
            raise VitqError(f"arch_weight_decay must be >= 0, got {self.arch_weight_decay}")
        if len(self.arch_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.arch_betas):
            raise VitqError(f"arch_betas must be two numbers in [0, 1), got {self.arch_betas}")
        if self.search_iters < 0:
            raise VitqError(f"search_iters must be >= 0, got {self.search_iters}")
        if not 0.0 <= self.search_warmup < 1.0:
            raise VitqError(f"search_warmup is a share of search_iters in [0, 1), got {self.search_warmup}")
        if not 0.0 < self.curriculum_start <= self.curriculum_end <= 1.0:
            raise VitqError("curriculum needs 0 < curriculum_start <= curriculum_end <= 1, "
                            f"got {self.curriculum_start}, {self.curriculum_end}")
        if not 0.0 <= self.curriculum_ramp <= 1.0:
            raise VitqError(f"curriculum_ramp must be in [0, 1], got {self.curriculum_ramp}")

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> "AIQConfig":
        """The recommended budget for ``bits`` (aiqvit.md §1.2): W6 uses 100 + 200 iterations, lr 5e-5."""
        base: dict[str, Any] = {}
        if bits >= 6:
            base = {"search_iters": 100, "lrc_lr": 5e-5}
        base.update(overrides)
        return cls(**base)

    def rank_candidates(self, d_in: int, d_out: int) -> list[int]:
        """This config's candidate ranks for a (d_out, d_in) layer."""
        return candidate_ranks(d_in, d_out, self.candidates, self.candidate_mode, self.candidate_fractions,
                               limit=self.rank_limit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = [
    "AIQConfig",
    "DynamicFocusingQuantizer",
    "LowRankFactors",
    "MergedLowRank",
    "SideBranchLowRank",
    "arch_objective",
    "arch_parameters",
    "attach_lowrank",
    "candidate_ranks",
    "curriculum_order",
    "curriculum_pool_size",
    "detach_lowrank",
    "dfq_parameters",
    "energy_rank",
    "find_lowrank",
    "first_order_darts_step",
    "lowrank_modules",
    "lowrank_overhead",
    "lowrank_parameters",
    "make_arch_optimizer",
    "project_dfq_",
    "sample_batch",
    "sample_difficulty",
    "search_split",
]
