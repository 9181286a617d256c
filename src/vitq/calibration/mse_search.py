"""FIMA-Q's MSE search (fimaq.md §1.3, §2.6): (scale, zero-point) candidate grids scored on the layer output."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..distributed import split_candidates
from ..qmodules import QuantConv2d, QuantLinear, QuantMatMul
from ..quantizers import UniformQuantizer
from .config import CalibConfig
from ..quantizers.uniform import params_from_range
from ..quantizers.kernels import reference_active, sq_diff_sum, workspace_for
from .stats import _quantile, _subsample_rows, init_percentile_search, quant_error, quant_sq_error


def _grid(lo_q: torch.Tensor, hi_q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, eq_n: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """FIMA-Q's (scale, zero point) candidate grid, vectorised over leading rows.

    ``lo_q/hi_q`` are the 10%/90% quantiles and ``lo/hi`` the min/max, each of shape (R,).
    Scales: S points from ``(q90-q10)/L`` to ``(max-min)/L``; zero points: all of 0..L when
    ``2^b <= 16`` (the official grid), else 16 integers around the zero point that centres the
    code window on the data's midpoint (the official grid assumes the midpoint is 0, which
    confines 6-bit zero points to 24..39 even for skewed post-GELU inputs). Returns (scales, zero points),
    each (R, S*Z), scale-major (candidate ``i * Z + j`` is scale ``i``, zero point ``j``).
    """
    qmax = 2 ** bits - 1
    n_scale = max(2, eq_n // _zero_points_per_scale(bits))  # at least both ends of the scale range
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
        n_zp = _zero_points_per_scale(bits)
        offsets = torch.arange(n_zp, device=lo.device, dtype=torch.float32) - n_zp // 2
        zps = centre[..., None] + offsets
    scales = scales[..., None].expand_as(zps)
    return scales.reshape(lo.shape[0], -1), zps.reshape(lo.shape[0], -1)


def _zero_points_per_scale(bits: int) -> int:
    return min(16, 2 ** bits)


# Zero points tried per fine scale: the coarse winner's lower clip kept, +- this many codes
_REFINE_ZP_SPAN = 2


def _refined(scales: torch.Tensor, zps: torch.Tensor, best: torch.Tensor, bits: int, n_fine: int, span: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A finer grid around each row's coarse winner ``best`` (R,) of a ``_grid`` (R, S*Z).

    ``n_fine`` scales evenly over ``span`` coarse scales on either side of the winner's (cut at the
    ends of the range), each with the zero points that keep the winner's lower clip ``-z s``
    (rounded) +- ``_REFINE_ZP_SPAN`` codes, clamped to the codes where the official grid keeps them.
    The winner itself is appended last, so the refined choice never scores worse. Why: the coarse
    grid has only eq_n/Z scales (8 at 4 bits), and the objective can have a narrow basin beside a
    flat one (a post-GELU input: zero point 0 clips the negative values at a wide scale, zero point 1
    keeps them only in a narrow band of scales); whether the coarse points fall near it decides the
    model (benchmarks/calib_grid.md).
    """
    n_zp = _zero_points_per_scale(bits)
    rows = torch.arange(scales.shape[0], device=scales.device)
    coarse = scales.reshape(scales.shape[0], -1, n_zp)[..., 0]  # (R, S)
    si = best // n_zp
    left = coarse[rows, (si - span).clamp(min=0)]
    right = coarse[rows, (si + span).clamp(max=coarse.shape[1] - 1)]
    frac = torch.linspace(0, 1, n_fine, device=scales.device)
    fine = left[:, None] + frac[None] * (right - left)[:, None]  # (R, F)
    s_win, z_win = scales[rows, best], zps[rows, best]
    offsets = torch.arange(-_REFINE_ZP_SPAN, _REFINE_ZP_SPAN + 1, device=scales.device, dtype=torch.float32)
    fz = torch.round((z_win * s_win)[:, None] / fine)[..., None] + offsets  # (R, F, O)
    if 2 ** bits <= 16:
        fz = fz.clamp(0, 2 ** bits - 1)
    fs = fine[..., None].expand_as(fz)
    return (torch.cat([fs.reshape(len(rows), -1), s_win[:, None]], 1),
            torch.cat([fz.reshape(len(rows), -1), z_win[:, None]], 1))


def _pick(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scales: torch.Tensor, zps: torch.Tensor,
          bits: int, refine: int, span: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a candidate grid (R, C), the (scale, zp) with the lowest ``score``, then refined.

    ``score(s, z)`` takes one candidate per row, each (R,), and returns the R errors. ``refine``:
    scales of the finer grid over ``span`` coarse scales either side of each winner (0: the coarse
    grid's choice stands). Returns the chosen (scale, zero point), each (R,).
    """
    rows = torch.arange(scales.shape[0], device=scales.device)

    def best_of(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return split_candidates(s.shape[1], lambda c: score(s[:, c], z[:, c]).reshape(len(rows))).argmin(0)

    best = best_of(scales, zps)
    if refine:
        scales, zps = _refined(scales, zps, best, bits, refine, span)
        best = best_of(scales, zps)
    return scales[rows, best], zps[rows, best]


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


def _best_self(t: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, qmax: int, bits: int, dim: int,
               refine: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per index along ``dim`` of a 2-D ``t``, the (scale, zp) candidate with the lowest self-MSE.

    ``refine``: (fine scales, span), as in ``_pick``.
    ``dim=0``: one candidate set per row (weights, cands (R, C)); ``dim=1``: per column
    (input channels of (tokens, C), cands (C, K)).
    """
    view = (lambda v: v[:, None]) if dim == 0 else (lambda v: v)
    return _pick(lambda s, z: quant_sq_error(t, view(s), view(z), qmax, 1 - dim), scales, zps, bits, *refine)


def _best_tensor_self(x: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, qmax: int, bits: int,
                      refine: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor (scale, zp) with the lowest self-MSE; ``refine``: (fine scales, span) as in ``_pick``."""
    buf = workspace_for(x)  # every candidate's error in one buffer
    return _pick(lambda s, z: quant_sq_error(x, s[0], z[0], qmax, out=buf), scales[None], zps[None], bits, *refine)


def _activation_output_scorer(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, qmax: int,
                              centred: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``score(s, z) = ||x W^T - Q_{s,z}(x) W_hat^T||^2`` for a per-tensor input candidate (s, z).

    Written through the errors, ``R = x (W - W_hat)^T`` and ``E = Q(x) - x``:
    ``||R - E W_hat^T||^2 = ||R||^2 - 2<R W_hat, E> + <E W_hat^T W_hat, E>``. Every term is
    of the size of the error itself (no cancellation in float32), and a candidate costs
    ``N * in * min(in, out)`` instead of ``N * in * out``. ``centred``: the error left once each
    output's mean error over the N rows is added back (bias correction): minus ``N ||mean(R - E W_hat^T)||^2``.
    """
    r = x @ (w - w_hat).t()
    use_gram = w.shape[1] <= w.shape[0]  # in <= out: go through the (in x in) Gram matrix
    if use_gram:
        gram = w_hat.t() @ w_hat
        rw = r @ w_hat
    r_mean = r.mean(0) if centred else None
    # buffers every candidate writes into (the same products as new tensors, without a fresh
    # allocation of the input's size per candidate: see kernels.workspace_for)
    e_buf = workspace_for(x)
    prod = torch.empty_like(x) if use_gram else torch.empty_like(r)

    def score(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        e = quant_error(x, s, z, qmax, out=e_buf)
        if use_gram:
            err = torch.mm(e, gram, out=prod).mul_(e).sum() - 2 * torch.mul(rw, e, out=prod).sum()
        else:
            err = torch.sub(r, torch.mm(e, w_hat.t(), out=prod), out=prod).pow_(2).sum()
        if centred:
            shift = r_mean - e.mean(0) @ w_hat.t()
            err = err - len(x) * shift.dot(shift)
        return err

    return score


def _row_output_scorer(x: torch.Tensor, x_hat: torch.Tensor | None, w: torch.Tensor, qmax: int,
                       centred: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``score(s, z)``: per output row o of ``w`` (R, K), ``||x w_o - x_hat Q_{s_o,z_o}(w_o)||^2`` up to a
    per-row constant, for one candidate per row (each (R,)); ``x_hat`` None: the input is not quantized.

    Through the errors d = w_hat - w and r = (x - x_hat) w (fixed in this step):
    ||x w - x_hat w_hat||^2 = ||r||^2 - 2 r^T x_hat d + d^T x_hat^T x_hat d. The constant ||r||^2 is
    dropped and the other terms are of the size of the weight error itself, so float32 resolves them
    (the expanded form, const - 2 w x^T x_hat w_hat + w_hat x_hat^T x_hat w_hat, cancels: it needed
    float64 at twice the cost). Sums in float64, once. ``centred``: the error left once each row's mean
    error over the N inputs is added back (bias correction): the mean is r_mean - x_hat_mean . d, so
    minus N mean^2 is, dropping N r_mean^2, - N (x_hat_mean . d)^2 + 2 N r_mean (x_hat_mean . d).
    """
    x64 = x.double()
    xh64 = x_hat.double() if x_hat is not None else x64
    gram = (xh64.t() @ xh64).float()
    cross = (w.double() @ ((x64 - xh64).t() @ xh64)).float() if x_hat is not None else None
    if centred:
        x_hat_mean = xh64.mean(0)
        r_mean = (w.double() @ (x64.mean(0) - x_hat_mean)).float()
        x_hat_mean = x_hat_mean.float()

    def score(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d = quant_error(w, s[:, None], z[:, None], qmax)
        err = ((d @ gram) * d).sum(1)
        if cross is not None:
            err = err - 2 * (cross * d).sum(1)
        if centred:
            proj = d @ x_hat_mean
            err = err - len(x) * proj * (proj - 2 * r_mean)
        return err

    return score


@torch.no_grad()
def search_linear_mse(module: QuantLinear, x: torch.Tensor, cfg: CalibConfig, gen: torch.Generator) -> None:
    """FIMA-Q's linear search: weight rows and the (per-tensor) input, on the layer-output MSE."""
    wq, aq = module.w_quantizer, module.a_quantizer
    w = module.weight.detach().float()
    w2d = w.reshape(w.shape[0], -1)
    x2d = x.reshape(-1, x.shape[-1]).float()
    xs = _subsample_rows(x2d, cfg.max_search_tokens, gen)

    # 1) "self" searches
    refine = (cfg.fine_grid, cfg.fine_grid_span)
    if wq is not None:
        if wq.granularity == "channel":
            w_s, w_z = _row_candidates(w2d, wq.bits, cfg.eq_n)
            best_s, best_z = _best_self(w2d, w_s, w_z, wq.quant_range()[1], wq.bits, dim=0, refine=refine)
            wq.set_params(best_s[:, None], best_z[:, None])
        else:
            s, z = _tensor_candidates(w2d, wq.bits, cfg.eq_n)
            wq.set_params(*_best_tensor_self(w2d, s, z, wq.quant_range()[1], wq.bits, refine))
    if aq is not None:
        a_s, a_z = _tensor_candidates(xs, aq.bits, cfg.eq_n)
        aq.set_params(*_best_tensor_self(xs, a_s, a_z, aq.quant_range()[1], aq.bits, refine))

    # 2) coordinate descent on the output MSE. Each step depends only on the other quantizer's
    # parameters, so a step that picks what its own last step did is a fixed point: the other
    # step would then repeat its last one exactly, and so on, so the remaining steps are skipped.
    # Without a per-row weight step the activation step's input never changes: one round is the
    # fixed point.
    row_search = wq is not None and wq.granularity == "channel"
    last_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    last_act: tuple[torch.Tensor, torch.Tensor] | None = None
    for _ in range(cfg.search_rounds if row_search else min(1, cfg.search_rounds)):
        if row_search:
            row_errors = _row_output_scorer(x2d, aq(x2d) if aq is not None else None, w2d, wq.quant_range()[1],
                                            cfg.bias_correction)
            chosen = _pick(row_errors, w_s, w_z, wq.bits, *refine)
            if last_rows is not None and all(torch.equal(a, b) for a, b in zip(chosen, last_rows)):
                break
            last_rows = chosen
            wq.set_params(chosen[0][:, None], chosen[1][:, None])
        if aq is not None:
            w_hat = wq(w).reshape_as(w2d) if wq is not None else w2d
            score = _activation_output_scorer(xs, w2d, w_hat, aq.quant_range()[1], cfg.bias_correction)
            chosen = _pick(lambda s, z: score(s[0], z[0]), a_s[None], a_z[None], aq.bits, *refine)
            aq.set_params(*chosen)
            if last_act is not None and all(torch.equal(a, b) for a, b in zip(chosen, last_act)):
                break  # the next weight step would repeat the last one
            last_act = chosen


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
    keep = n if cfg.max_search_samples is None else min(n, cfg.max_search_samples)
    if cfg.max_search_elements is not None:
        per_sample = math.prod(a.shape[1:-1]) * b.shape[-1]  # elements of one sample's a @ b
        keep = min(keep, max(1, cfg.max_search_elements // per_sample))
    if keep < n:
        idx = torch.randperm(n, generator=gen)[:keep].to(a.device)
        a, b = a[idx], b[idx]
    a, b = a.float(), b.float()
    ref = a @ b
    ops = {"a": (module.a_quantizer, a), "b": (module.b_quantizer, b)}
    bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    choice: dict[str, list[torch.Tensor]] = {}
    for key, (q, t) in ops.items():
        if q is None:
            continue
        if q.calibrates_itself:  # a quantizer with its own search (e.g. AIQViT's DFQ on attn @ v)
            q.calibrate_itself(t, partner=b if key == "a" else None)
            continue
        if not q.grid_searchable:  # log operands keep their own (self-MSE) initialisation
            init_percentile_search(q, t)
            continue
        up, lo = _matmul_candidates(t, q, cfg.eq_n)
        bounds[key] = (up, lo)
        start = torch.full(q._stat_shape(t), cfg.eq_n - 1, dtype=torch.long, device=t.device)
        choice[key] = [start.clone(), start.clone()]  # [upper index, lower index]
        _set_bounds(q, up, lo, choice[key])

    def quantized(key: str) -> torch.Tensor:
        q, t = ops[key]
        return q(t) if q is not None else t

    def product(key: str, fixed: torch.Tensor | None) -> torch.Tensor:
        # only operand ``key`` changes within a sweep: the other one is quantized once (``fixed``;
        # None on the reference path, which quantized both for every candidate)
        other = quantized("b" if key == "a" else "a") if fixed is None else fixed
        return quantized("a") @ other if key == "a" else other @ quantized("b")

    def sweep(key: str, which: tuple[int, ...]) -> bool:  # True when the choice moved
        q, t = ops[key]
        up, lo = bounds[key]
        red = [d for d in range(t.dim()) if q._stat_shape(t)[d] == 1] if q.granularity != "tensor" else None
        fixed = None if reference_active() else quantized("b" if key == "a" else "a")
        cand = []
        for i in range(cfg.eq_n):
            trial = [c.clone() for c in choice[key]]
            for w in which:
                trial[w] = torch.full_like(trial[w], i)
            cand.append(trial)

        def score(i: int) -> torch.Tensor:
            _set_bounds(q, up, lo, cand[i])
            return sq_diff_sum(product(key, fixed), ref, red)  # the product is a fresh tensor: overwritten

        errs_t = split_candidates(cfg.eq_n, score)  # (eq_n, *stat)
        best = errs_t.argmin(0)
        before = [c.clone() for c in choice[key]]
        for w in which:
            stacked = torch.stack([c[w] for c in cand])
            choice[key][w] = torch.gather(stacked, 0, best[None].expand_as(stacked[:1]).reshape(1, *best.shape))[0] \
                if best.dim() else stacked[int(best)]
        _set_bounds(q, up, lo, choice[key])
        return not all(torch.equal(a, b) for a, b in zip(before, choice[key]))

    for key in bounds:
        sweep(key, (0, 1))                      # paired candidates first
    # Then each bound in turn with the others fixed: (operand, 1) fixes the upper bound and searches
    # the lower, (operand, 0) the other way round. A sweep's choice depends only on the other bounds,
    # so once every other bound has been swept without moving since a bound's last sweep, that sweep
    # would repeat itself: a fixed point, and the remaining sweeps are skipped (the same result as
    # sweeping up to a round that moves nothing, without that round).
    # (The bound swept just before those must itself have been swept alone, not paired: hence
    # at least one whole round.)
    order = [(key, w) for key in bounds for w in (1, 0)]
    still = 0  # sweeps in a row that moved nothing
    for done, (key, w) in enumerate(order * cfg.search_rounds, start=1):
        still = 0 if sweep(key, (w,)) else still + 1
        if done >= len(order) and still >= len(order) - 1:
            break


def _set_bounds(q: UniformQuantizer, up: torch.Tensor, lo: torch.Tensor, idx: list[torch.Tensor]) -> None:
    u = torch.gather(up, 0, idx[0][None].expand(1, *idx[0].shape))[0] if up.dim() > 1 else up[idx[0]]
    l = torch.gather(lo, 0, idx[1][None].expand(1, *idx[1].shape))[0] if lo.dim() > 1 else lo[idx[1]]
    qmax = q.quant_range()[1]
    q.set_params(*params_from_range(l, u, qmax))


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
    qmax = wq.quant_range()[1]

    def errs_for(up: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        s, z = params_from_range(lo, up, qmax)
        delta = quant_error(w2d, s[:, None], z[:, None], qmax).double()
        return ((delta @ gram) * delta).sum(1)

    errs = split_candidates(n + 1, lambda i: errs_for(upper[i], lower[i]))
    rows = torch.arange(w2d.shape[0], device=w2d.device)
    bu = bl = errs.argmin(0)
    bl = split_candidates(n + 1, lambda i: errs_for(upper[bu, rows], lower[i])).argmin(0)
    bu = split_candidates(n + 1, lambda i: errs_for(upper[i], lower[bl, rows])).argmin(0)
    s, z = params_from_range(lower[bl, rows], upper[bu, rows], qmax)
    shape = (-1,) + (1,) * (module.weight.dim() - 1)
    wq.set_params(s.reshape(shape), z.reshape(shape))

