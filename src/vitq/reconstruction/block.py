"""One block of block-wise reconstruction: the optimisation loop (fimaq.md §1.4, §3)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed
from ..adapters import is_head_block
from ..distributed import sharded_map
from ..errors import VitqError
from ..losses import brecq_fisher_loss, kl_logits_loss, lp_loss, normalised
from ..qmodules import QuantMode, set_mode
from .capture import batched, keep_cache
from .config import FISHER_LOSSES, ReconConfig, snapshot_iterations
from .extension import BlockContext, BlockExtension
from .fisher import FisherState, fisher_terms, per_sample_grads, refresh_snapshots
from .rounding import activation_quantizers, block_quant_modules, install_learned_rounding


def reconstruct_block(model: nn.Module, name: str, block: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor,
                      targets: torch.Tensor | None, cfg: ReconConfig, device: torch.device, gen: torch.Generator,
                      progress: bool = True, desc: str = "", extension: BlockExtension | None = None
                      ) -> dict[str, Any]:
    """Optimise one block (rounding variables and activation-quantizer parameters); returns its summary.

    On return the block's weight quantizers hold their final (hard) learned rounding and every
    quantizer of the block is frozen in eval mode.
    """
    is_head = is_head_block(model, name)
    store = x_fp.device
    # ---- float targets of this block (everything float)
    set_mode(model, QuantMode.FLOAT)
    y_fp = keep_cache(sharded_map(block, x_fp, cfg.capture_batch_size, device, store), cfg.cache_on_disk)
    amp = cfg.autocast_context(device)
    fisher = (cfg.loss in FISHER_LOSSES) and not is_head
    per_sample = None
    fallback = None
    if cfg.loss == "brecq" and not is_head:
        if x_q is x_fp:
            # nothing is quantized before this block, so the model equals the teacher and every KL
            # gradient is 0: the official code turns this into NaN alphas (fimaq.md §7.4)
            fallback = "mse (no quantized prefix: all KL gradients are zero)"
        else:
            per_sample = per_sample_grads(model, name, block, x_q, targets, cfg, device, store)

    # ---- the block's output error as calibrated (nearest rounding), for the before/after report
    with torch.no_grad():
        for m in block_quant_modules(block):
            m.mode = QuantMode.QUANT
        before = float(lp_loss(batched(block, x_fp[:256], cfg.capture_batch_size, device, store), y_fp[:256]))
        set_mode(model, QuantMode.FLOAT)

    # ---- trainable state (flags recorded before AdaRound adds its alphas, so they end frozen)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    installed = install_learned_rounding(block) if cfg.adaround else []
    rounding = [p for q in installed for p in q.trainable_parameters().get("rounding", [])]
    act_qs = activation_quantizers(block)
    learned: dict[str, list[nn.Parameter]] = {}
    for q in act_qs:
        q.train()
        q.set_qdrop(cfg.drop_prob if cfg.input_mode == "qdrop" else 1.0)
        for group, params in q.trainable_parameters().items():
            if group == "scale" and not cfg.learn_act_scales:
                continue
            learned.setdefault(group, []).extend(params)
    for p in rounding + [p for params in learned.values() for p in params]:
        p.requires_grad_(True)
    for m in block_quant_modules(block):
        m.mode = QuantMode.QUANT
    ext = extension or BlockExtension()
    ctx = BlockContext(model, name, block, x_fp, x_q, y_fp, cfg, device, gen)
    ext_groups = ext.begin_block(ctx)
    # rounding variables: plain Adam; quantizer parameters (and an extension's): cosine-annealed Adam
    opt_w = torch.optim.Adam(rounding, lr=cfg.learning_rate("rounding")) if rounding else None
    groups = [{"params": params, "lr": cfg.learning_rate(group)} for group, params in learned.items()] + ext_groups
    opt_a = torch.optim.Adam(groups) if groups else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=cfg.iters, eta_min=0.0) if opt_a else None

    n = len(x_fp)
    train_params = rounding + [p for params in learned.values() for p in params] + \
        [p for g in ext_groups for p in g["params"]]
    dist = distributed.current()
    world = distributed.world_size()
    snaps = set(snapshot_iterations(cfg.iters, cfg.rank, cfg.snapshot_schedule)) if fisher else set()
    state = FisherState()
    p1, p2 = cfg.weights
    warm = int(cfg.warmup * cfg.iters)
    ref_rec: float | None = None
    rec_v = round_v = 0.0
    history: dict[str, list[float]] = {"iteration": [], "rec": [], "round": []}
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.iters), desc=desc or name, unit="it", disable=not progress, leave=False)
    for it in bar:
        if it in snaps:
            refresh_snapshots(model, name, block, x_fp, x_q, y_fp, targets, cfg, device, gen, state)
        idx = ext.sample(it, n, cfg.batch_size, gen)
        if idx is None:
            idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        xb, yb = ctx.batch(idx)
        # distributed: every rank draws the same global batch and runs its slice; its loss is the
        # slice's mean weighted by its share, so the ranks' gradients sum to the global batch's
        total = len(idx)
        start, stop = dist.span(total) if dist is not None else (0, total)
        share = (stop - start) / total
        if dist is not None:
            xb, yb, idx = xb[start:stop], yb[start:stop], idx[start:stop]
        with distributed.sharded_draws(start, stop, total), amp:
            out = block(xb)
        out = out.float()
        if is_head:
            rec = kl_logits_loss(out, yb, cfg.head_temperature)
        elif fisher:
            terms = fisher_terms((out - yb).abs().reshape(len(xb), -1), state, cfg, p1, p2)
            if not state.refs:
                keys = list(terms)
                state.refs = dict(zip(keys, distributed.sum_floats([share * float(terms[k].detach()) for k in keys])))
            rec = sum((p1 if k == "lowrank" else p2) * normalised(v, state.refs[k]) for k, v in terms.items())
        else:
            if per_sample is not None:
                delta = (out - yb).abs().reshape(len(xb), -1)
                rec = brecq_fisher_loss(delta, per_sample[idx].to(device))
            else:
                rec = lp_loss(out, yb, 1.0 if cfg.loss == "mae" else 2.0)
            if ref_rec is None:
                ref_rec = distributed.sum_floats([share * float(rec.detach())])[0]
            rec = normalised(rec, ref_rec)
        if it < warm or not installed:
            reg = torch.zeros((), device=device)
        else:
            beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - (it - warm) / max(1, cfg.iters - warm))
            reg = cfg.round_lambda * sum(q.round_loss(beta) for q in installed)
        loss = share * rec + reg / world  # one process: share 1, world 1, exactly rec + reg
        if opt_w:
            opt_w.zero_grad(set_to_none=True)
        if opt_a:
            opt_a.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        if dist is not None:
            for p in train_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_sum_([p.grad for p in train_params], f"the reconstruction of {name}")
        if opt_w:
            opt_w.step()
        if opt_a:
            opt_a.step()
            sched.step()
            for q in act_qs:
                q.project_()  # back into the valid range (a scale through zero would flip the grid)
        # the losses are read (a host sync on a GPU) and checked only every log_every iterations;
        # a NaN stays NaN through Adam, so it is still caught within log_every iterations
        if it % cfg.log_every == 0 or it == cfg.iters - 1:
            rec_v, round_v = float(rec.detach()), float(reg.detach())
            if dist is not None:
                rec_v = distributed.sum_floats([share * rec_v], f"the reconstruction of {name}")[0]
            if not math.isfinite(rec_v + round_v):
                raise VitqError(f"the reconstruction loss of {name} became NaN/Inf by iteration {it}: "
                                "lower --act-lr / --weight-lr or check the calibration")
            history["iteration"].append(it)
            history["rec"].append(rec_v)
            history["round"].append(round_v)
        if it % 50 == 0 or it == cfg.iters - 1:
            bar.set_postfix(rec=f"{rec_v:.4f}", round=f"{round_v:.1f}")
    bar.close()

    # ---- final (hard) rounding, every quantizer frozen in eval mode
    for q in installed + act_qs:
        q.freeze_()
    for p, flag in frozen:
        p.requires_grad_(flag)
    with torch.no_grad():
        set_mode(model, QuantMode.FLOAT)
        for m in block_quant_modules(block):
            m.mode = QuantMode.QUANT
        final = float(lp_loss(batched(block, x_fp[:256], cfg.capture_batch_size, device, store), y_fp[:256]))
    return {"block": name, "seconds": round(time.perf_counter() - t0, 3), "final_rec_loss": rec_v,
            "final_round_loss": round_v, "output_mse_fp_input": final, "output_mse_calibrated": before,
            "history": history, "snapshots": len(state.G),
            "gram_condition": state.conds, "fallback": fallback, "adaround_layers": len(installed),
            **ext.end_block(ctx)}
