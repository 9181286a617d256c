"""AIQViT inside block reconstruction: low-rank compensation with per-layer ranks, and a curriculum.

:class:`AIQViTExtension` plugs into :func:`vitq.reconstruction.reconstruct` through its
:class:`~vitq.reconstruction.BlockExtension` hooks (aiqvit.md §1.2 step 6):

* **curriculum** (§4): before training a block, score each optimisation image by the block's
  output MSE in its initial quantized state, order them easy to hard, and draw batches from the
  easiest share, growing linearly from ``curriculum_start`` to ``curriculum_end`` over the first
  ``curriculum_ramp`` of the iterations;
* **low-rank compensation** (§2) on the block's Linear layers (``lrc_roles``), merged
  (``Q(W + BA)``, no inference cost) or as a side branch (``Q(W) + BA``), with ranks
  ``fixed``, by the SVD-energy rule (``energy``), or by a first-order DARTS search over the
  candidate ranks on a train/val split of the images (``search``) that runs before the
  fine-tuning iterations of the block;
* the DFQ bounds (post-softmax) are an ordinary quantizer's ``interval`` group, learned by the
  engine itself when the recipe's softmax quantizer is ``dfq``.

After the last block, merged compensation is folded into the weights (``W <- W + BA``), so the
model is an ordinary quantized model; side branches stay attached and are saved with the model
(reload them with :func:`~vitq.methods.aiqvit.restore_side_branches`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from ...adapters import layer_role
from ...losses import lp_loss
from ...qmodules import QuantLinear, iter_quantizers
from ...reconstruction import BlockContext, BlockExtension
from .config import AIQConfig
from .curriculum import curriculum_order, curriculum_pool_size, sample_batch, sample_difficulty
from .factors import LowRankFactors
from .lowrank import (LowRankDelta, attach_lowrank, find_lowrank, fold_merged, lowrank_modules,
                      lowrank_parameters, nearest_rounding_error)
from .rank_search import (arch_parameters, energy_rank, first_order_darts_step, make_arch_optimizer,
                          search_split)


@torch.no_grad()
def _input_rms(block: nn.Module, layers: list[tuple[str, QuantLinear]], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel RMS of each layer's input over ``x`` (for activation-scaled SVDs)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, layer in layers:
        def record(m: nn.Module, inputs: tuple, name: str = name) -> None:
            x_in = m.layer_input(inputs[0].detach())  # the input the weight multiplies (rotated, if rotated)
            t = x_in.reshape(-1, x_in.shape[-1]).float()
            sums[name] = sums.get(name, 0) + t.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + t.shape[0]
        handles.append(layer.register_forward_pre_hook(record))
    try:
        block(x)
    finally:  # a measurement only: the hooks never outlive this call
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).sqrt() for name in sums}


def _project_quantizers(block: nn.Module) -> None:
    """Every quantizer of the block back into its valid range (e.g. DFQ's 0 <= b1 < b2 <= 1)."""
    for _, q in iter_quantizers(block):
        q.project_()


class AIQViTExtension(BlockExtension):
    """AIQViT's low-rank compensation and curriculum as reconstruction hooks (see the module docstring)."""

    def __init__(self, cfg: AIQConfig) -> None:
        self.cfg = cfg
        self.order: torch.Tensor | None = None
        self.iters = 0
        self.search_seconds = 0.0

    # ---------------------------------------------------------------- helpers
    def _layers(self, ctx: BlockContext) -> list[tuple[str, QuantLinear]]:
        out = []
        for sub, m in ctx.block.named_modules():
            if not isinstance(m, QuantLinear) or m.w_quantizer is None:
                continue
            full = f"{ctx.name}.{sub}" if sub else ctx.name
            try:
                role = layer_role(full)
            except ValueError:
                continue
            wanted = (role in self.cfg.lrc_roles or (role == "head" and self.cfg.lrc_head)
                      or (role == "patch_embed" and self.cfg.lrc_patch_embed))
            if wanted:
                out.append((full, m))
        return out

    def _loss(self, ctx: BlockContext, idx: torch.Tensor) -> torch.Tensor:
        """The search's block loss: the recipe's lp loss (MSE unless the recipe says MAE; the Fisher
        losses need snapshots the search does not take, so it uses MSE for them)."""
        xb, yb = ctx.batch(idx)
        return lp_loss(ctx.block(xb), yb, 1.0 if ctx.cfg.loss == "mae" else 2.0)

    def _search(self, ctx: BlockContext, lowranks: list[LowRankFactors]) -> None:
        """First-order DARTS over the candidate ranks (aiqvit.md §2.4), then discretise."""
        cfg = self.cfg
        train_idx, val_idx = search_split(len(ctx.x_fp), cfg.search_split, ctx.gen)
        weight_opt = torch.optim.Adam([p for lr in lowranks for p in (lr.A, lr.B)], lr=cfg.lrc_lr)
        arch_opt = make_arch_optimizer(arch_parameters(ctx.block), cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay)

        def draw(pool: torch.Tensor) -> torch.Tensor:
            return pool[torch.randint(len(pool), (min(ctx.cfg.batch_size, len(pool)),), generator=ctx.gen)]

        ref = None
        if cfg.normalise_search_loss:
            with torch.no_grad():
                ref = float(self._loss(ctx, draw(val_idx)))
        warmup = int(round(cfg.search_warmup * cfg.search_iters))
        for it in range(cfg.search_iters):
            if it < warmup:  # factors only: the candidates must differ before alpha can compare them
                weight_opt.zero_grad(set_to_none=True)
                self._loss(ctx, draw(train_idx)).backward()
                weight_opt.step()
                _project_quantizers(ctx.block)
                continue
            first_order_darts_step(lambda: self._loss(ctx, draw(train_idx)), lambda: self._loss(ctx, draw(val_idx)),
                                   weight_opt, arch_opt, lowranks, cfg.size_penalty, ref,
                                   after_weight_step=lambda: _project_quantizers(ctx.block))
        for lr in lowranks:
            lr.discretise(reinit=cfg.reinit_after_search, generator=ctx.gen)

    # ---------------------------------------------------------------- hooks
    def begin_block(self, ctx: BlockContext) -> list[dict[str, Any]]:
        cfg = self.cfg
        self.iters = ctx.cfg.iters
        self.order = None
        self.search_seconds = 0.0
        if cfg.curriculum:
            with torch.no_grad():
                xs = ctx.x_q if ctx.cfg.input_mode != "rinp" else ctx.x_fp
                losses = sample_difficulty(ctx.block, xs.to(ctx.device), ctx.y_fp.to(ctx.device),
                                           ctx.cfg.capture_batch_size)
            self.order = curriculum_order(losses.cpu())
        if not cfg.lrc:
            return []
        layers = self._layers(ctx)
        rms = _input_rms(ctx.block, layers, ctx.x_fp[:256].to(ctx.device)) if cfg.lrc_act_scaled else {}
        # factor precision is a side-branch setting: merged factors are folded into the k-bit weight
        factor_bits = cfg.factor_bits if cfg.lrc_mode == "side" else None
        lowranks = []
        for name, layer in layers:
            d_out, d_in = layer.weight.shape
            candidates = cfg.rank_candidates(d_in, d_out)
            common = dict(tau=cfg.tau, supernet=cfg.supernet, init=cfg.lrc_init, act_rms=rms.get(name),
                          factor_bits=factor_bits, generator=ctx.gen)
            if cfg.rank_policy == "search" and max(candidates) > 0:
                lowranks.append(attach_lowrank(layer, cfg.lrc_mode, candidates=candidates, **common))
                continue
            if cfg.rank_policy == "energy":
                rank = energy_rank(nearest_rounding_error(layer), candidates, cfg.energy, rms.get(name))
            elif cfg.rank_policy == "fixed":
                rank = min(cfg.fixed_rank, min(d_in, d_out))
            else:
                rank = 0
            lowranks.append(attach_lowrank(layer, cfg.lrc_mode, rank=rank, **common))
        searching = [lr for lr in lowranks if lr.searching]
        if searching:
            t0 = time.perf_counter()
            self._search(ctx, searching)
            self.search_seconds = time.perf_counter() - t0
        params = lowrank_parameters(ctx.block)
        for p in params:
            p.requires_grad_(True)
        return [{"params": params, "lr": cfg.lrc_lr}] if params else []

    def sample(self, it: int, n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor | None:
        if self.order is None:
            return None
        pool = curriculum_pool_size(it, self.iters, n, self.cfg.curriculum_start, self.cfg.curriculum_end,
                                    self.cfg.curriculum_ramp)
        return sample_batch(self.order, pool, batch_size, gen)

    def end_block(self, ctx: BlockContext) -> dict[str, Any]:
        for p in lowrank_parameters(ctx.block):
            p.requires_grad_(False)
        ranks = {}
        for name, layer in self._layers(ctx):
            lr = find_lowrank(layer)
            if lr is not None:
                ranks[name] = lr.rank
        return {"lrc_ranks": ranks, "lrc_search_seconds": round(self.search_seconds, 3),
                "curriculum": self.order is not None}

    def restore_block(self, model: nn.Module, name: str, block: nn.Module, summary: dict[str, Any]) -> None:
        factor_bits = self.cfg.factor_bits if self.cfg.lrc_mode == "side" else None
        for layer_name, rank in summary.get("lrc_ranks", {}).items():
            lr = attach_lowrank(model.get_submodule(layer_name), self.cfg.lrc_mode, rank=rank, init="lora",
                                factor_bits=factor_bits)
            for p in (lr.A, lr.B):
                p.requires_grad_(False)

    def finalize(self, model: nn.Module) -> dict[str, Any]:
        """Fold merged compensation (W <- W + BA, before the engine folds AdaRound); list side branches."""
        side = {}
        for name, lr in lowrank_modules(model):
            if isinstance(lr, LowRankDelta):
                fold_merged(model.get_submodule(name))  # no inference cost left
            else:
                side[name] = lr.rank
        return {"lrc_side_ranks": side} if side else {}
