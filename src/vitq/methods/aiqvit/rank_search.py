"""Rank choice for low-rank compensation (aiqvit.md §2.3-2.4): candidates, energy rule, DARTS search.

The nested-rank (or independent) supernet itself lives in
:class:`~vitq.methods.aiqvit.factors.LowRankFactors` (``alpha``, ``pi``, ``mask``,
``expected_cost``, ``discretise``); this module has the search-space and the optimisation steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ...errors import VitqError
from .choices import CANDIDATE_MODES, DEFAULT_CANDIDATES, DEFAULT_FRACTIONS, check_choice
from .factors import LowRankFactors


def candidate_ranks(d_in: int, d_out: int, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                    mode: str = "absolute", fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    multiple: int = 4, limit: float = 1.5) -> list[int]:
    """Rank candidates of one layer, truncated to ranks ``< min(d_in, d_out) / limit`` (0 kept).

    ``relative``: ``fractions`` of ``min(d_in, d_out)`` rounded to multiples of ``multiple``.
    """
    check_choice("candidate mode", mode, CANDIDATE_MODES)
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
    ``weight_opt`` holds A, B, ``arch_opt`` only the ``alpha`` logits; each step clears both
    optimizers' gradients first, so neither step leaks into the other. ``after_weight_step``
    runs after the weight update (e.g. the quantizers' ``project_``).
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
