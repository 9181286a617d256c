"""RepQ-ViT's LayerNorm fold: per-channel activation scales folded into the LayerNorm and the next Linear."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..qmodules import QuantLinear
from ..quantizers import UniformQuantizer
from .config import CalibConfig
from .mse_search import _best_self, _channel_candidates
from .stats import _subsample_rows, init_by_method


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


def per_channel_params(x2d: torch.Tensor, bits: int, cfg: CalibConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input-channel (scale, zp) of a post-LayerNorm activation, by the recipe's rule."""
    qmax = 2 ** bits - 1
    if cfg.method == "mse":
        s, z = _channel_candidates(x2d, bits, cfg.eq_n)
        rows = _subsample_rows(x2d, cfg.max_search_tokens, torch.Generator().manual_seed(seed))
        return _best_self(rows, s, z, qmax, bits, dim=1, refine=(cfg.fine_grid, cfg.fine_grid_span))
    probe = UniformQuantizer(bits, granularity="channel", axis=-1).to(x2d.device)
    init_by_method(probe, x2d, cfg)
    return probe.scale.detach().reshape(-1), probe.zero_point.reshape(-1)

