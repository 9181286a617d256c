"""Calibration: the initial quantizer parameters of a prepared model.

Methods (``CalibConfig.method``):

* ``minmax``: per-channel weights and per-tensor / per-head activations at their observed range.
* ``percentile``: weights at their range, activations clipped at the ``[100-p, p]`` percentiles.
* ``mse``: FIMA-Q's search (research note fimaq.md §1.3, §2.6): candidate grids of (scale, zero
  point), a "self" search on each tensor, then ``search_rounds`` rounds of coordinate descent
  on the *layer-output* MSE (weights per output row, activations per tensor, matmul operands per
  head), then token-wise expansion of the activation scales.
* ``repq``: RepQ-ViT's calibration: per-channel / per-tensor scales picked among a few
  percentile clips by the tensor's own MSE, the LayerNorm fold, log-sqrt2 post-softmax.

Like the official code, every layer is calibrated on full-precision inputs (the whole model
stays in float mode during calibration), in forward order, one reconstruction block at a time.

Deviations from the official code, each deliberate:

* the 6- and 8-bit zero-point candidates are centred on the data's midpoint instead of the
  fixed ``2^(b-1) ± 8`` window that confines 6-bit zero points to 24..39 (fimaq.md §7.11);
  at 2..4 bits every zero point is a candidate, exactly as in the official grid;
* the RepQ fold runs whenever ``reparam`` is on, not only when ``a_bits == w_bits`` (§7.12);
* the weight-row output MSE is computed exactly from Gram matrices of the inputs, and the
  activation / matmul output MSE on a fixed random subsample (``max_search_tokens`` rows,
  ``max_search_samples`` images) so that CPU runs stay affordable; the official code uses every
  token of the 128 calibration images on a GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import layer_role, prev_layernorm, reconstruction_blocks
from .aiqvit import DynamicFocusingQuantizer
from .capture import StopForward, run_until_stopped
from .errors import VitqError
from .qmodules import QuantConv2d, QuantLinear, QuantMatMul, QuantMode, QuantModule, quant_modules, set_mode
from .quantizers import LogQuantizer, UniformQuantizer

METHODS = ("minmax", "percentile", "mse", "repq")
# RepQ-ViT's candidate clipping percentiles for its self-MSE initialisation.
REPQ_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
# torch.quantile refuses inputs above 2^24 elements; quantiles are taken on a subsample.
_QUANTILE_SAMPLE = 1 << 20


@dataclass
class CalibConfig:
    """How the initial quantizer parameters are found (see the module docstring)."""

    method: str = "mse"
    percentile: float = 99.99          # ``percentile``: activation clip percentile
    eq_n: int = 128                    # ``mse``: candidates per grid
    search_rounds: int = 3             # ``mse``: coordinate-descent rounds on the output MSE
    token_wise: bool = True            # expand activation scales per token after the search
    reparam: bool = True               # RepQ-ViT LayerNorm fold for post-LN inputs
    max_search_tokens: int = 2048      # rows of a linear input used for the activation search
    max_search_samples: int = 16       # images used for the matmul-operand search
    batch_size: int = 32               # forward batch while capturing inputs
    dfq_init: str = "output"           # AIQViT DFQ: ||P_hat V - P V|| ("output"), ||P_hat - P|| ("self"), "minmax"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise VitqError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise VitqError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.dfq_init not in ("output", "self", "minmax"):
            raise VitqError(f"dfq_init must be output, self or minmax, got {self.dfq_init!r}")
        if self.eq_n < 2 or self.search_rounds < 0:
            raise VitqError("eq_n must be >= 2 and search_rounds >= 0")


# --------------------------------------------------------------------------- small tensor helpers

def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Asymmetric uniform fake quantization (no gradient tricks; for searches)."""
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, qmax) - zero_point) * scale


def _subsample_rows(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)
    return x[idx]


def _quantile(x: torch.Tensor, qs: list[float], dim: int | None = None) -> torch.Tensor:
    """Quantiles of ``x`` (flattened, or along ``dim``) on a strided subsample if it is large.

    Returns shape (len(qs),) or (len(qs), other) for ``dim``.
    """
    q = torch.tensor(qs, dtype=torch.float32, device=x.device)
    if dim is None:
        flat = x.reshape(-1).float()
        if flat.numel() > _QUANTILE_SAMPLE:
            flat = flat[:: math.ceil(flat.numel() / _QUANTILE_SAMPLE)]
        return torch.quantile(flat, q)
    moved = x.movedim(dim, -1).reshape(-1, x.shape[dim]).float()  # (M, K): quantiles over M per k
    limit = max(1, _QUANTILE_SAMPLE // moved.shape[1])
    if moved.shape[0] > limit:
        moved = moved[:: math.ceil(moved.shape[0] / limit)]
    return torch.quantile(moved, q, dim=0)


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise VitqError(f"NaN/Inf in the activations of {name} during calibration: "
                            "check the FP model and the calibration images (wrong normalisation?)")


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The zero point is not clamped to [0, qmax]: a range that excludes 0 (e.g. near-uniform
    # attention probabilities) needs an offset outside the code range, as in the official code.
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    return scale, -torch.round(lo / scale)


def _grid(lo_q: torch.Tensor, hi_q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, eq_n: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """FIMA-Q's (scale, zero point) candidate grid, vectorised over leading rows.

    ``lo_q/hi_q`` are the 10%/90% quantiles and ``lo/hi`` the min/max, each of shape (R,).
    Scales: S points from ``(q90-q10)/L`` to ``(max-min)/L``; zero points: all of 0..L when
    ``2^b <= 16`` (the official grid), else 16 integers around the zero point that centres the
    code window on the data's midpoint (the official grid assumes the midpoint is 0, which
    confines 6-bit zero points to 24..39 even for skewed post-GELU inputs). Returns (scales, zero points), each (R, S*Z).
    """
    qmax = 2 ** bits - 1
    n_zp = min(16, 2 ** bits)
    n_scale = max(2, eq_n // n_zp)  # at least both ends of the scale range
    frac = torch.linspace(0, 1, n_scale, device=lo.device)
    range_min, range_max = (hi_q - lo_q).clamp(min=1e-8), (hi - lo).clamp(min=1e-8)
    scales = (range_min[:, None] + frac[None] * (range_max - range_min)[:, None]) / qmax  # (R, S)
    scales = scales.clamp(min=1e-4 if lo.numel() == 1 else 1e-8)
    if 2 ** bits <= 16:
        zps = torch.arange(qmax + 1, device=lo.device, dtype=torch.float32)[None, None].expand(
            lo.shape[0], n_scale, -1)
    else:
        # centre the code window on the data's midpoint (the official grid centres it on 0);
        # at the widest scale this is exactly -min/s
        centre = torch.round(qmax / 2 - (lo + hi)[:, None] / (2 * scales))  # (R, S)
        offsets = torch.arange(n_zp, device=lo.device, dtype=torch.float32) - n_zp // 2
        zps = centre[..., None] + offsets
    scales = scales[..., None].expand_as(zps)
    return scales.reshape(lo.shape[0], -1), zps.reshape(lo.shape[0], -1)


# --------------------------------------------------------------------------- per-quantizer initialisers

def _uniform_qmax(q: UniformQuantizer) -> int:
    return q.quant_range()[1]


def init_minmax(q: UniformQuantizer | LogQuantizer, x: torch.Tensor) -> None:
    """Observed range, at the quantizer's own granularity."""
    q.reset_observer()
    q.observe(x)
    q.init_from_minmax()


def init_percentile(q: UniformQuantizer | LogQuantizer, x: torch.Tensor, pct: float) -> None:
    """Clip at the [100-pct, pct] percentiles (per head / channel where the quantizer is)."""
    _, axis = q._reduce_dims(x)
    p = pct / 100.0
    vals = _quantile(x, [1 - p, p], axis)
    shape = q._stat_shape(x)
    lo, hi = vals[0].reshape(shape), vals[1].reshape(shape)
    if isinstance(q, LogQuantizer):
        q.set_params(hi.clamp(min=1e-8))
        return
    q.set_params(*_params_from_range(torch.minimum(lo, torch.zeros_like(lo)) if q.symmetric else lo, hi,
                                     _uniform_qmax(q)))


def init_percentile_search(q: UniformQuantizer | LogQuantizer, x: torch.Tensor) -> None:
    """RepQ-ViT style: among a few percentile clips, the one with the lowest self-MSE, per index."""
    _, axis = q._reduce_dims(x)
    shape = q._stat_shape(x)
    red = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    best_err, best = None, None
    for p in REPQ_PERCENTILES:
        vals = _quantile(x, [1 - p, p], axis)
        lo, hi = vals[0].reshape(shape), vals[1].reshape(shape)
        if isinstance(q, LogQuantizer):
            q.set_params(hi.clamp(min=1e-8))
        else:
            q.set_params(*_params_from_range(lo, hi, _uniform_qmax(q)))
        with torch.no_grad():
            err = (q(x) - x).pow(2).mean(dim=red, keepdim=True).reshape(shape)
        params = (q.scale.detach().clone(), q.zero_point.clone())
        if best_err is None:
            best_err, best = err, params
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, params[0], best[0]), torch.where(better, params[1], best[1]))
    q.set_params(*best)


def init_by_method(q: UniformQuantizer | LogQuantizer, x: torch.Tensor, cfg: CalibConfig) -> None:
    """Initialise ``q`` on ``x`` by the statistics rule of ``cfg.method`` (minmax, percentile, repq)."""
    if cfg.method == "minmax":
        init_minmax(q, x)
    elif cfg.method == "percentile":
        init_percentile(q, x, cfg.percentile)
    else:
        init_percentile_search(q, x)


def init_dfq(q: DynamicFocusingQuantizer, p: torch.Tensor, v: torch.Tensor, how: str) -> None:
    """AIQViT's DFQ interval (aiqvit.md §3.4): grid search on the attention-output or self error, or min-max."""
    if how == "minmax":
        init_minmax(q, p)
    else:
        q.init_from(p.float(), v.float() if how == "output" else None)


# --------------------------------------------------------------------------- FIMA-Q MSE search

def _row_candidates(w2d: torch.Tensor, bits: int, eq_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row of a weight (R, K): the grid from the row's 10/90% quantiles and range."""
    lo, hi = w2d.amin(1), w2d.amax(1)
    qs = _quantile(w2d.t(), [0.1, 0.9], dim=1)  # (2, R): quantiles over each row's K values
    return _grid(qs[0], qs[1], lo, hi, bits, eq_n)


def _tensor_candidates(x: torch.Tensor, bits: int, eq_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = _quantile(x, [0.1, 0.9, 0.0, 1.0])
    s, z = _grid(q[0:1], q[1:2], x.amin().reshape(1), x.amax().reshape(1), bits, eq_n)
    return s[0], z[0]


def _channel_candidates(x2d: torch.Tensor, bits: int, eq_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input channel (columns of (tokens, C))."""
    q = _quantile(x2d, [0.1, 0.9], dim=1)
    return _grid(q[0], q[1], x2d.amin(0), x2d.amax(0), bits, eq_n)


def _best_self(t: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, qmax: int, dim: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per index along ``dim`` of a 2-D ``t``, the (scale, zp) candidate with the lowest self-MSE.

    ``dim=0``: one candidate set per row (weights, cands (R, C)); ``dim=1``: per column
    (input channels of (tokens, C), cands (C, K)).
    """
    view = (lambda v: v[:, None]) if dim == 0 else (lambda v: v)
    errs = torch.stack([(fake_quant(t, view(scales[:, c]), view(zps[:, c]), qmax) - t).pow(2).sum(1 - dim)
                        for c in range(scales.shape[1])], dim=1)
    best = errs.argmin(1)
    idx = torch.arange(t.shape[dim], device=t.device)
    return scales[idx, best], zps[idx, best]


def _best_tensor_self(x: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, qmax: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    errs = torch.stack([(fake_quant(x, scales[c], zps[c], qmax) - x).pow(2).sum() for c in range(len(scales))])
    best = int(errs.argmin())
    return scales[best].reshape(1), zps[best].reshape(1)


def _activation_output_errors(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, scales: torch.Tensor,
                              zps: torch.Tensor, qmax: int) -> torch.Tensor:
    """``||x W^T - Q_c(x) W_hat^T||^2`` for every per-tensor input candidate c.

    Written through the errors, ``R = x (W - W_hat)^T`` and ``E_c = Q_c(x) - x``:
    ``||R - E_c W_hat^T||^2 = ||R||^2 - 2<R W_hat, E_c> + <E_c W_hat^T W_hat, E_c>``. Every term is
    of the size of the error itself (no cancellation in float32), and a candidate costs
    ``N * in * min(in, out)`` instead of ``N * in * out``.
    """
    r = x @ (w - w_hat).t()
    use_gram = w.shape[1] <= w.shape[0]  # in <= out: go through the (in x in) Gram matrix
    if use_gram:
        gram = w_hat.t() @ w_hat
        rw = r @ w_hat
    errs = []
    for c in range(len(scales)):
        e = fake_quant(x, scales[c], zps[c], qmax) - x
        if use_gram:
            errs.append(((e @ gram) * e).sum() - 2 * (rw * e).sum())
        else:
            errs.append((r - e @ w_hat.t()).pow(2).sum())
    return torch.stack(errs)


@torch.no_grad()
def search_linear_mse(module: QuantLinear, x: torch.Tensor, cfg: CalibConfig, gen: torch.Generator) -> None:
    """FIMA-Q's linear search: weight rows and the (per-tensor) input, on the layer-output MSE."""
    wq, aq = module.w_quantizer, module.a_quantizer
    w = module.weight.detach().float()
    w2d = w.reshape(w.shape[0], -1)
    x2d = x.reshape(-1, x.shape[-1]).float()
    xs = _subsample_rows(x2d, cfg.max_search_tokens, gen)

    # 1) "self" searches
    if wq is not None:
        if wq.granularity == "channel":
            w_s, w_z = _row_candidates(w2d, wq.bits, cfg.eq_n)
            best_s, best_z = _best_self(w2d, w_s, w_z, _uniform_qmax(wq), dim=0)
            wq.set_params(best_s[:, None], best_z[:, None])
        else:
            s, z = _tensor_candidates(w2d, wq.bits, cfg.eq_n)
            wq.set_params(*_best_tensor_self(w2d, s, z, _uniform_qmax(wq)))
    if aq is not None:
        a_s, a_z = _tensor_candidates(xs, aq.bits, cfg.eq_n)
        aq.set_params(*_best_tensor_self(xs, a_s, a_z, _uniform_qmax(aq)))

    # 2) coordinate descent on the output MSE
    for _ in range(cfg.search_rounds):
        if wq is not None and wq.granularity == "channel":
            # ||X w - X_hat w_hat||^2 = const - 2 w X^T X_hat w_hat + w_hat X_hat^T X_hat w_hat, per row.
            # float64: at 8 bits the candidates differ far below float32's resolution of these terms.
            x_hat = (aq(x2d) if aq is not None else x2d).double()
            h1 = x_hat.t() @ x_hat
            wh2 = w2d.double() @ (x2d.double().t() @ x_hat)
            qmax = _uniform_qmax(wq)
            errs = []
            for c in range(w_s.shape[1]):
                w_hat = fake_quant(w2d, w_s[:, c:c + 1], w_z[:, c:c + 1], qmax).double()
                errs.append(((w_hat @ h1) * w_hat).sum(1) - 2 * (wh2 * w_hat).sum(1))
            best = torch.stack(errs, 1).argmin(1)
            rows = torch.arange(w2d.shape[0], device=w2d.device)
            wq.set_params(w_s[rows, best][:, None], w_z[rows, best][:, None])
        if aq is not None:
            w_hat = wq(w).reshape_as(w2d) if wq is not None else w2d
            best = int(_activation_output_errors(xs, w2d, w_hat, a_s, a_z, _uniform_qmax(aq)).argmin())
            aq.set_params(a_s[best].reshape(1), a_z[best].reshape(1))


def _matmul_candidates(t: torch.Tensor, q: UniformQuantizer, eq_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper/lower bound candidates per head (fimaq.md §2.6), shape (eq_n, *stat_shape)."""
    _, axis = q._reduce_dims(t)
    shape = q._stat_shape(t)
    qs = _quantile(t, [0.99, 0.99999, 0.01, 0.00001], axis)
    frac = torch.arange(eq_n, device=t.device, dtype=torch.float32)[:, None] / eq_n
    upper = qs[0][None] + frac * (qs[1] - qs[0])[None]
    lower = qs[3][None] + frac * (qs[2] - qs[3])[None]
    return upper.reshape(eq_n, *shape), lower.reshape(eq_n, *shape)


@torch.no_grad()
def search_matmul_mse(module: QuantMatMul, a: torch.Tensor, b: torch.Tensor, cfg: CalibConfig,
                      gen: torch.Generator) -> None:
    """FIMA-Q's matmul search: paired bound candidates, then coordinate descent, per head."""
    n = a.shape[0]
    if n > cfg.max_search_samples:
        idx = torch.randperm(n, generator=gen)[: cfg.max_search_samples].to(a.device)
        a, b = a[idx], b[idx]
    a, b = a.float(), b.float()
    ref = a @ b
    ops = {"a": (module.a_quantizer, a), "b": (module.b_quantizer, b)}
    bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    choice: dict[str, list[torch.Tensor]] = {}
    for key, (q, t) in ops.items():
        if q is None:
            continue
        if isinstance(q, LogQuantizer):  # log operands keep their own (self-MSE) initialisation
            init_percentile_search(q, t)
            continue
        if isinstance(q, DynamicFocusingQuantizer):  # AIQViT's post-softmax quantizer has its own search
            init_dfq(q, a, b, cfg.dfq_init)
            continue
        up, lo = _matmul_candidates(t, q, cfg.eq_n)
        bounds[key] = (up, lo)
        start = torch.full(q._stat_shape(t), cfg.eq_n - 1, dtype=torch.long, device=t.device)
        choice[key] = [start.clone(), start.clone()]  # [upper index, lower index]
        _set_bounds(q, up, lo, choice[key])

    def out_err() -> torch.Tensor:
        qa = module.a_quantizer(a) if module.a_quantizer is not None else a
        qb = module.b_quantizer(b) if module.b_quantizer is not None else b
        return (qa @ qb - ref).pow(2)

    def sweep(key: str, which: tuple[int, ...]) -> None:
        q, t = ops[key]
        up, lo = bounds[key]
        red = [d for d in range(t.dim()) if q._stat_shape(t)[d] == 1] if q.granularity != "tensor" else None
        errs, cand = [], []
        for i in range(cfg.eq_n):
            trial = [c.clone() for c in choice[key]]
            for w in which:
                trial[w] = torch.full_like(trial[w], i)
            _set_bounds(q, up, lo, trial)
            e = out_err()
            errs.append(e.sum(dim=red, keepdim=True) if red is not None else e.sum().reshape(1))
            cand.append(trial)
        errs_t = torch.stack(errs)  # (eq_n, *stat)
        best = errs_t.argmin(0)
        for w in which:
            stacked = torch.stack([c[w] for c in cand])
            choice[key][w] = torch.gather(stacked, 0, best[None].expand_as(stacked[:1]).reshape(1, *best.shape))[0] \
                if best.dim() else stacked[int(best)]
        _set_bounds(q, up, lo, choice[key])

    for key in bounds:
        sweep(key, (0, 1))                      # paired candidates first
    for _ in range(cfg.search_rounds):
        for key in bounds:
            sweep(key, (1,))                    # fix the upper bound, search the lower
            sweep(key, (0,))                    # then fix the lower, search the upper


def _set_bounds(q: UniformQuantizer, up: torch.Tensor, lo: torch.Tensor, idx: list[torch.Tensor]) -> None:
    u = torch.gather(up, 0, idx[0][None].expand(1, *idx[0].shape))[0] if up.dim() > 1 else up[idx[0]]
    l = torch.gather(lo, 0, idx[1][None].expand(1, *idx[1].shape))[0] if lo.dim() > 1 else lo[idx[1]]
    qmax = _uniform_qmax(q)
    q.set_params(*_params_from_range(l, u, qmax))


@torch.no_grad()
def search_conv_mse(module: QuantConv2d, x: torch.Tensor, cfg: CalibConfig) -> None:
    """Patch-embed weights: per output channel, percentile-clip pairs by the conv-output MSE."""
    wq = module.w_quantizer
    if wq is None:
        return
    w2d = module.weight.detach().float().reshape(module.weight.shape[0], -1)
    cols = F.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)  # (B, K, L)
    cols = cols.transpose(1, 2).reshape(-1, w2d.shape[1])
    gram = (cols.t() @ cols).double()
    n = cfg.eq_n
    pcts = [0.99 + (0.9999 - 0.99) * math.sqrt(i / (n - 1)) for i in range(n)] + [1.0]
    qs = _quantile(w2d.t(), pcts + [1 - p for p in pcts], dim=1)  # (2(n+1), rows)
    upper, lower = qs[: n + 1], qs[n + 1:]
    qmax = _uniform_qmax(wq)

    def errs_for(up: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        s, z = _params_from_range(lo, up, qmax)
        delta = (fake_quant(w2d, s[:, None], z[:, None], qmax) - w2d).double()
        return ((delta @ gram) * delta).sum(1)

    errs = torch.stack([errs_for(upper[i], lower[i]) for i in range(n + 1)])
    rows = torch.arange(w2d.shape[0], device=w2d.device)
    bu = bl = errs.argmin(0)
    bl = torch.stack([errs_for(upper[bu, rows], lower[i]) for i in range(n + 1)]).argmin(0)
    bu = torch.stack([errs_for(upper[i], lower[bl, rows]) for i in range(n + 1)]).argmin(0)
    s, z = _params_from_range(lower[bl, rows], upper[bu, rows], qmax)
    shape = (-1,) + (1,) * (module.weight.dim() - 1)
    wq.set_params(s.reshape(shape), z.reshape(shape))


# --------------------------------------------------------------------------- RepQ-ViT fold

@torch.no_grad()
def reparam_layernorm(norm: nn.LayerNorm, linear: QuantLinear, scale_c: torch.Tensor, zp_c: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold per-channel activation parameters into the LayerNorm and the next Linear.

    With ``s* = mean(s_c)``, ``z* = round(mean(z_c))``, ``r = s_c/s*`` and ``b = s*(z* - z_c)``:
    ``gamma' = gamma/r``, ``beta' = beta/r - b``, ``W' = W diag(r)``, ``bias' = bias + W' b``.
    The float function is unchanged, and per-channel quantization of the old LN output equals
    per-tensor quantization of the new one with ``(s*, z*)``. Returns ``(s*, z*, r, b)``.
    """
    s_star = scale_c.mean()
    z_star = torch.round(zp_c.mean())
    r = scale_c / s_star
    b = s_star * (z_star - zp_c)
    norm.weight.data = norm.weight.data / r
    norm.bias.data = norm.bias.data / r - b
    linear.weight.data = linear.weight.data * r[None, :]
    extra = linear.weight.data @ b
    if linear.bias is None:
        linear.bias = nn.Parameter(extra)
    else:
        linear.bias.data = linear.bias.data + extra
    return s_star.reshape(1), z_star.reshape(1), r, b


def _per_channel_params(x2d: torch.Tensor, bits: int, cfg: CalibConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input-channel (scale, zp) of a post-LayerNorm activation, by the recipe's rule."""
    qmax = 2 ** bits - 1
    if cfg.method == "mse":
        s, z = _channel_candidates(x2d, bits, cfg.eq_n)
        rows = _subsample_rows(x2d, cfg.max_search_tokens, torch.Generator().manual_seed(cfg.seed))
        return _best_self(rows, s, z, qmax, dim=1)
    probe = UniformQuantizer(bits, granularity="channel", axis=-1).to(x2d.device)
    init_by_method(probe, x2d, cfg)
    return probe.scale.detach().reshape(-1), probe.zero_point.reshape(-1)


# --------------------------------------------------------------------------- driver

def _capture_inputs(model: nn.Module, modules: list[tuple[str, QuantModule]], images: torch.Tensor,
                    batch_size: int, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Inputs of ``modules`` over all calibration images (the model in float mode)."""
    store: dict[str, list[list[torch.Tensor]]] = {name: [] for name, _ in modules}
    last = modules[-1][0]
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_mod: nn.Module, inputs: tuple) -> None:
            store[name].append([t.detach() for t in inputs if isinstance(t, torch.Tensor)])
            if name == last:
                raise StopForward
        return hook

    for name, mod in modules:
        handles.append(mod.register_forward_pre_hook(make_hook(name)))
    run_until_stopped(model, images, batch_size, device, handles)
    out: dict[str, list[torch.Tensor]] = {}
    for name, batches in store.items():
        if not batches:
            raise RuntimeError(f"calibration never reached {name}: is it used in the forward pass?")
        out[name] = [torch.cat([b[j] for b in batches]) for j in range(len(batches[0]))]
    return out


def _group_by_block(model: nn.Module) -> list[list[tuple[str, QuantModule]]]:
    """Quant modules grouped by reconstruction block, in forward order."""
    blocks = [name for name, _ in reconstruction_blocks(model)]
    groups: dict[str, list[tuple[str, QuantModule]]] = {}
    order: list[str] = []
    for name, mod in quant_modules(model):
        owner = next((b for b in blocks if name == b or name.startswith(b + ".")), name)
        if owner not in groups:
            groups[owner] = []
            order.append(owner)
        groups[owner].append((name, mod))
    return [groups[o] for o in order]


def _expand_tokenwise(module: QuantModule, inputs: list[torch.Tensor]) -> None:
    """One activation scale per token (zero points stay per tensor / head), fimaq.md §2.2.

    Linear 3-D inputs (B, N, C): scale (1, N, 1). MatMul operand A (B, H, N, *): (1, H, N, 1);
    operand B (B, H, *, M): (1, H, 1, M) (for attn @ v that is per head-dim channel, as in
    the official code). Values start identical, so the calibrated model is unchanged; block
    reconstruction then learns them separately.
    """
    if isinstance(module, QuantLinear):
        q, x = module.a_quantizer, inputs[0]
        if isinstance(q, UniformQuantizer) and x.dim() == 3 and q.granularity == "tensor":
            q.set_params(q.scale.detach().reshape(1, 1, 1).expand(1, x.shape[1], 1).clone(), q.zero_point)
    elif isinstance(module, QuantMatMul):
        for q, t, dim in ((module.a_quantizer, inputs[0], 2), (module.b_quantizer, inputs[1], 3)):
            if not isinstance(q, UniformQuantizer) or t.dim() != 4:
                continue
            shape = [1, t.shape[1] if q.granularity == "head" else 1, 1, 1]
            base = q.scale.detach().reshape(shape)
            shape[dim] = t.shape[dim]
            q.set_params(base.expand(*shape).clone(), q.zero_point)


def _init_module(module: QuantModule, inputs: list[torch.Tensor], cfg: CalibConfig, gen: torch.Generator) -> None:
    """Initialise one module's quantizers by the configured method."""
    if cfg.method == "mse":
        if isinstance(module, QuantLinear):
            search_linear_mse(module, inputs[0], cfg, gen)
        elif isinstance(module, QuantMatMul):
            search_matmul_mse(module, inputs[0], inputs[1], cfg, gen)
        elif isinstance(module, QuantConv2d):
            search_conv_mse(module, inputs[0], cfg)
            if module.a_quantizer is not None:
                init_minmax(module.a_quantizer, inputs[0])
        return
    weight = getattr(module, "weight", None)
    if getattr(module, "w_quantizer", None) is not None:
        if cfg.method == "repq":
            init_percentile_search(module.w_quantizer, weight.detach())
        else:
            init_minmax(module.w_quantizer, weight.detach())
    slots = [("a_quantizer", 0), ("b_quantizer", 1)] if isinstance(module, QuantMatMul) else [("a_quantizer", 0)]
    for slot, i in slots:
        q = getattr(module, slot, None)
        if q is None:
            continue
        x = inputs[i]
        if isinstance(q, DynamicFocusingQuantizer):
            init_dfq(q, inputs[0], inputs[1], cfg.dfq_init)
        else:
            init_by_method(q, x, cfg)


def calibrate(model: nn.Module, images: torch.Tensor, cfg: CalibConfig, device: torch.device | str = "cpu",
              progress: bool = True) -> dict[str, object]:
    """Calibrate every quantizer of a prepared model on ``images`` (preprocessed, (N, 3, H, W)).

    Leaves the model in ``QuantMode.QUANT`` and returns a summary (modules, folded layers, seconds).
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    set_mode(model, QuantMode.FLOAT)
    model.eval()
    groups = _group_by_block(model)
    n_modules = sum(len(g) for g in groups)
    folded: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(total=n_modules, desc=f"calibrate ({cfg.method})", unit="layer", disable=not progress)
    for group in groups:
        captured = _capture_inputs(model, group, images, cfg.batch_size, device)
        for name, module in group:
            inputs = captured.pop(name)
            _check_finite(name, *inputs)
            bar.set_postfix_str(name)
            role = layer_role(name)
            norm = prev_layernorm(model, name) if role in ("qkv", "fc1", "reduction") else None
            aq = getattr(module, "a_quantizer", None)
            if (cfg.reparam and norm is not None and norm.weight is not None and isinstance(module, QuantLinear)
                    and isinstance(aq, UniformQuantizer)):
                x2d = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                s_c, z_c = _per_channel_params(x2d, aq.bits, cfg)
                _, _, r, b = reparam_layernorm(norm, module, s_c, z_c)
                inputs[0] = inputs[0] / r - b  # the LN output the folded model now produces
                folded.append(name)
            _init_module(module, inputs, cfg, gen)
            if cfg.token_wise:
                _expand_tokenwise(module, inputs)
            bar.update(1)
        del captured
    bar.close()
    set_mode(model, QuantMode.QUANT)
    return {"modules": n_modules, "folded_layers": folded, "seconds": round(time.perf_counter() - t0, 3)}
