"""AIQViT's curriculum (aiqvit.md §4): score samples by difficulty, draw batches from the easiest share."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ...errors import VitqError


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
    """Easiest samples usable at iteration ``it``: ``ceil(g n)``.

    ``g = min(end, start + (end - start) it / (ramp iters))``.

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
