"""Statistics rules for initial quantizer parameters: min-max, percentile clip, RepQ-ViT's percentile search.

They work on any affine (scale / zero-point) quantizer at its own granularity (uniform or log).
"""

from __future__ import annotations

import math

import torch

from ..quantizers import AffineQuantizer
from ..quantizers import kernels
from ..quantizers.kernels import fake_quant_values, reference_active
from .config import CalibConfig

# RepQ-ViT's candidate clipping percentiles for its self-MSE initialisation.
REPQ_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
# torch.quantile refuses inputs above 2^24 elements; quantiles are taken on a subsample.
_QUANTILE_SAMPLE = 1 << 20


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Asymmetric uniform fake quantization (no gradient tricks; for searches)."""
    if reference_active():
        return (torch.clamp(torch.round(x / scale) + zero_point, 0, qmax) - zero_point) * scale
    return fake_quant_values(x, scale, zero_point, 0, qmax)


def quant_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant(x) - x`` (one fused loop under ``compiled_kernels``); ``out``: a workspace
    (``kernels.workspace_for``) the eager kernels may write into."""
    if reference_active():
        return fake_quant(x, scale, zero_point, qmax) - x
    return kernels.quant_error(x, scale, zero_point, 0, qmax, out)


def quant_sq_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int,
                   dim: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum((fake_quant(x) - x)^2)`` over ``dim`` (None: all elements); ``out`` as in :func:`quant_error`."""
    if reference_active():
        e = (fake_quant(x, scale, zero_point, qmax) - x).pow(2)
        return e.sum() if dim is None else e.sum(dim)
    return kernels.quant_sq_error(x, scale, zero_point, 0, qmax, dim, out)


def _subsample_rows(x: torch.Tensor, n: int | None, gen: torch.Generator) -> torch.Tensor:
    """At most ``n`` rows of ``x`` (a fixed random draw from ``gen``); all of them for None."""
    if n is None or x.shape[0] <= n:
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


def init_minmax(q: AffineQuantizer, x: torch.Tensor) -> None:
    """Observed range, at the quantizer's own granularity."""
    q.reset_observer()
    q.observe(x)
    q.init_from_minmax()


def init_percentile(q: AffineQuantizer, x: torch.Tensor, pct: float) -> None:
    """Clip at the [100-pct, pct] percentiles (per head / channel where the quantizer is)."""
    _, axis = q._reduce_dims(x)
    p = pct / 100.0
    vals = _quantile(x, [1 - p, p], axis)
    shape = q._stat_shape(x)
    lo, hi = vals[0].reshape(shape), vals[1].reshape(shape)
    q.set_range(torch.minimum(lo, torch.zeros_like(lo)) if getattr(q, "symmetric", False) else lo, hi)


def init_percentile_search(q: AffineQuantizer, x: torch.Tensor) -> None:
    """RepQ-ViT style: among a few percentile clips, the one with the lowest self-MSE, per index."""
    _, axis = q._reduce_dims(x)
    shape = q._stat_shape(x)
    red = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    best_err, best = None, None
    for p in REPQ_PERCENTILES:
        vals = _quantile(x, [1 - p, p], axis)
        q.set_range(vals[0].reshape(shape), vals[1].reshape(shape))
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


def init_by_method(q: AffineQuantizer, x: torch.Tensor, cfg: CalibConfig) -> None:
    """Initialise ``q`` on ``x`` by the statistics rule of ``cfg.method`` (minmax, percentile, repq)."""
    if cfg.method == "minmax":
        init_minmax(q, x)
    elif cfg.method == "percentile":
        init_percentile(q, x, cfg.percentile)
    else:
        init_percentile_search(q, x)
