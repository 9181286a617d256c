"""The optimiser step that block reconstruction and end-to-end refinement share."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from .. import distributed


class QuantizerOptimiser:
    """Adam on the rounding variables (constant rate) and Adam on the other parameter groups
    (cosine-annealed to 0 over ``iters``); each step sums the gradients over the ranks and brings
    the quantizers' parameters back into their valid range (a scale through zero would flip the grid)."""

    def __init__(self, rounding: list[nn.Parameter], rounding_lr: float, groups: list[dict[str, Any]], iters: int,
                 quantizers: Sequence[Any], what: str) -> None:
        self.params = rounding + [p for g in groups for p in g["params"]]
        self.rounding = torch.optim.Adam(rounding, lr=rounding_lr) if rounding else None
        self.other = torch.optim.Adam(groups) if groups else None
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.other, T_max=iters, eta_min=0.0)
                      if self.other else None)
        self.quantizers = quantizers
        self.what = what

    def step(self, loss: torch.Tensor) -> None:
        for opt in (self.rounding, self.other):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        distributed.sum_grads_(self.params, self.what)
        if self.rounding:
            self.rounding.step()
        if self.other:
            self.other.step()
            self.sched.step()
            for q in self.quantizers:
                q.project_()
