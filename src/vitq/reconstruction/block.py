"""One block of block-wise reconstruction: the optimisation loop (fimaq.md §1.4, §3)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

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
from .global_loss import penultimate_after
from .optim import QuantizerOptimiser
from .fisher import FisherState, fisher_terms, per_sample_grads, refresh_snapshots
from .rounding import activation_quantizers, block_quant_modules, install_learned_rounding


def float_block_outputs(model: nn.Module, block: nn.Module, x_fp: torch.Tensor, cfg: ReconConfig,
                        device: torch.device, store: torch.device) -> torch.Tensor:
    """The float targets of a block's reconstruction: its outputs over ``x_fp``, everything float."""
    set_mode(model, QuantMode.FLOAT)
    return keep_cache(sharded_map(block, x_fp, cfg.capture_batch_size, device, store), cfg.cache_on_disk)


def reconstruct_block(model: nn.Module, name: str, block: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor,
                      targets: torch.Tensor | None, cfg: ReconConfig, device: torch.device, gen: torch.Generator,
                      progress: bool = True, desc: str = "", extension: BlockExtension | None = None,
                      features: torch.Tensor | None = None,
                      on_step: Callable[[int], None] | None = None,
                      y_fp: torch.Tensor | None = None) -> dict[str, Any]:
    """Optimise one block (rounding variables and activation-quantizer parameters); returns its summary.

    ``features``: the float model's penultimate features of the optimisation images, for the
    global term (``cfg.global_weight`` > 0; not for the head block, whose loss is already global).
    ``on_step(it)`` is called after each optimiser step (the cost model times iterations with it).
    ``y_fp``: the block's float outputs over ``x_fp`` (:func:`float_block_outputs`) when the caller
    has them already; computed here otherwise.

    On return the block's weight quantizers hold their final (hard) learned rounding and every
    quantizer of the block is frozen in eval mode.
    """
    is_head = is_head_block(model, name)
    store = x_fp.device
    if y_fp is None:
        y_fp = float_block_outputs(model, block, x_fp, cfg, device, store)
    set_mode(model, QuantMode.FLOAT)
    amp = cfg.autocast_context(device)
    fisher = (cfg.loss in FISHER_LOSSES) and not is_head
    use_global = cfg.global_weight > 0 and not is_head
    if use_global and features is None:
        raise ValueError("the global term needs the float model's penultimate features")
    ref_global: float | None = None
    global_v = 0.0
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
    groups = [{"params": params, "lr": cfg.learning_rate(group)} for group, params in learned.items()] + ext_groups
    optimiser = QuantizerOptimiser(rounding, cfg.learning_rate("rounding"), groups, cfg.iters, act_qs,
                                   f"the reconstruction of {name}")

    n = len(x_fp)
    dist = distributed.current()
    world = distributed.world_size()
    snaps = set(snapshot_iterations(cfg.iters, cfg.rank, cfg.snapshot_schedule)) if fisher else set()
    state = FisherState()
    p1, p2 = cfg.weights
    warm = int(cfg.warmup * cfg.iters)
    ref_rec: float | None = None
    rec_v = round_v = 0.0
    history: dict[str, list[float]] = {"iteration": [], "rec": [], "round": []}
    if use_global:
        history["global"] = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.iters), desc=desc or name, unit="it", disable=not progress, leave=False)
    for it in bar:
        if it in snaps:
            refresh_snapshots(model, name, block, x_fp, x_q, y_fp, targets, cfg, device, gen, state)
        idx = ext.sample(it, n, cfg.batch_size, gen)
        if idx is None:
            idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        # distributed: every rank draws the same global batch and runs its slice; its loss is the
        # slice's mean weighted by its share, so the ranks' gradients sum to the global batch's
        total = len(idx)
        start, stop, share = distributed.batch_slice(total)
        xb, yb = ctx.batch(idx, slice(start, stop))
        idx = idx[start:stop]
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
        objective = rec
        if use_global and it % cfg.global_every == 0:
            with amp:
                feat = penultimate_after(model, name, out)
            glob = lp_loss(feat.float(), features[idx].to(device))
            if ref_global is None:
                ref_global = distributed.sum_floats([share * float(glob.detach())])[0]
            glob = normalised(glob, ref_global)
            objective = rec + cfg.global_weight * glob
        if it < warm or not installed:
            reg = torch.zeros((), device=device)
        else:
            beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - (it - warm) / max(1, cfg.iters - warm))
            reg = cfg.round_lambda * sum(q.round_loss(beta) for q in installed)
        loss = share * objective + reg / world  # one process: share 1, world 1, exactly objective + reg
        optimiser.step(loss)
        if on_step is not None:
            on_step(it)
        # the losses are read (a host sync on a GPU) and checked only every log_every iterations;
        # a NaN stays NaN through Adam, so it is still caught within log_every iterations
        if it % cfg.log_every == 0 or it == cfg.iters - 1:
            rec_v, round_v = float(rec.detach()), float(reg.detach())
            if use_global and it % cfg.global_every == 0:
                global_v = float(glob.detach())
            if dist is not None:
                rec_v, global_v = distributed.sum_floats([share * rec_v, share * global_v],
                                                         f"the reconstruction of {name}")
            if not math.isfinite(rec_v + round_v):
                raise VitqError(f"the reconstruction loss of {name} became NaN/Inf by iteration {it}: "
                                "lower --act-lr / --weight-lr or check the calibration")
            history["iteration"].append(it)
            history["rec"].append(rec_v)
            history["round"].append(round_v)
            if use_global:
                history["global"].append(global_v)
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
            "final_round_loss": round_v,
            "final_global_loss": global_v if use_global else None, "output_mse_fp_input": final, "output_mse_calibrated": before,
            "history": history, "snapshots": len(state.G),
            "gram_condition": state.conds, "fallback": fallback, "adaround_layers": len(installed),
            **ext.end_block(ctx)}
