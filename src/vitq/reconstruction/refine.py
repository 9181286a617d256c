"""End-to-end refinement: every block together, the quantized model's logits matched to the float model's.

Block reconstruction fits each block to its own float output; the errors it leaves still add up
along the network. This stage runs after it (or straight after calibration) and learns the
activation-quantizer parameters of the whole model at once (and, with ``rounding="soft"``, the
weight rounding; with ``learn_biases``, the quantized layers' float biases, a learned bias
correction) on ``KL(softmax(z_fp / T) || softmax(z_q / T))``, the quantity block reconstruction
only approximates. Nothing else of the model is trained.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed
from ..distributed import sharded_map
from ..errors import VitqError
from ..losses import kl_logits_loss, normalised
from ..qmodules import QuantMode, set_mode
from ..quantizers.kernels import compile_status, compiled_kernels
from .config import COMPILE, compiles
from .optim import QuantizerOptimiser
from .rounding import activation_quantizers, block_quant_modules, fold_learned_rounding, install_learned_rounding

ROUNDING = ("hard", "soft")


@dataclass
class RefineConfig:
    """Settings of the end-to-end refinement stage."""

    iters: int = 200
    batch_size: int = 32
    optim_size: int | None = None   # images; None: the reconstruction's optimisation images (else 1024)
    rounding: str = "hard"          # hard: the learned rounding stays; soft: it learns again, hard at the end
    act_lr: float = 4e-5            # Adam on activation scales (group "scale"), cosine-annealed to 0
    interval_lr: float = 1e-4       # Adam on learned clipping intervals (group "interval")
    weight_lr: float = 1e-3         # Adam on the rounding variables (soft rounding)
    round_lambda: float = 0.01      # soft rounding: weight of the regulariser that keeps offsets binary
    beta: float = 2.0               # soft rounding: the regulariser's exponent (block stage's final value)
    temperature: float = 1.0        # T of the KL
    drop_prob: float = 1.0          # QDrop keep probability inside the whole model (1: off)
    learn_biases: bool = False      # also learn the quantized layers' float biases (learned bias correction)
    bias_lr: float = 1e-4           # Adam on those biases (group "bias"), cosine-annealed
    log_every: int = 10
    compile_kernels: str = "auto"   # as ReconConfig.compile_kernels

    def __post_init__(self) -> None:
        if self.compile_kernels not in COMPILE:
            raise VitqError(f"refine compile_kernels must be one of {', '.join(COMPILE)}, got {self.compile_kernels!r}")
        if self.rounding not in ROUNDING:
            raise VitqError(f"refine rounding must be one of {', '.join(ROUNDING)}, got {self.rounding!r}")
        if min(self.iters, self.batch_size, 1 if self.optim_size is None else self.optim_size, self.log_every) <= 0:
            raise VitqError("refine iters, batch_size, optim_size and log_every must be positive")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise VitqError(f"refine drop_prob must be in [0, 1], got {self.drop_prob}")
        if not self.temperature > 0:
            raise VitqError(f"refine temperature must be positive, got {self.temperature}")

    def learning_rate(self, group: str) -> float:
        rates = {"rounding": self.weight_lr, "scale": self.act_lr, "interval": self.interval_lr}
        if group not in rates:
            raise VitqError(f"no refine learning rate for quantizer parameter group {group!r}: "
                            f"known groups are {', '.join(rates)}")
        return rates[group]


@torch.no_grad()
def float_logits(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The float model's logits of ``images`` (on the CPU), the refinement's targets.

    Taken before block reconstruction: afterwards the float mode of a model whose AIQViT
    compensation was merged is no longer the float model.
    """
    set_mode(model, QuantMode.FLOAT)
    return sharded_map(model, images, batch_size, device, torch.device("cpu"))


def refine_end_to_end(model: nn.Module, images: torch.Tensor, teacher: torch.Tensor, cfg: RefineConfig,
                      device: torch.device | str = "cpu", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Refine the whole quantized model on ``images`` towards the float ``teacher`` logits.

    On return every learned rounding is folded into its weight, every quantizer is frozen in eval
    mode and the model is in quantized mode. The global torch RNG is left as it was.
    """
    device = torch.device(device)
    if len(images) != len(teacher):
        raise ValueError("one teacher logit row per refinement image")
    model.eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    if cfg.rounding == "soft":
        install_learned_rounding(model)  # weights that have no learned rounding yet get one
    pairs = _rounding_pairs(model)
    learned_rounding = [q for _, q in pairs]
    codes_before = [q.codes(m.weight) for m, q in pairs]
    rounding: list[nn.Parameter] = []
    if cfg.rounding == "soft":
        for q in learned_rounding:
            q.set_soft_rounding(True)
            rounding += q.trainable_parameters()["rounding"]
    act_qs = activation_quantizers(model)
    learned: dict[str, list[nn.Parameter]] = {}
    for q in act_qs:
        q.train()
        q.set_qdrop(cfg.drop_prob)
        for group, params in q.trainable_parameters().items():
            learned.setdefault(group, []).extend(params)
    biases = [m.bias for m in block_quant_modules(model) if cfg.learn_biases and getattr(m, "bias", None) is not None]
    train_params = rounding + [p for params in learned.values() for p in params] + biases
    if not train_params:
        raise VitqError("end-to-end refinement has nothing to learn: the model has no learnable quantizer "
                        "parameters (use rounding='soft', or activation quantizers)")
    for p in train_params:
        p.requires_grad_(True)
    set_mode(model, QuantMode.QUANT)
    groups = [{"params": params, "lr": cfg.learning_rate(group)} for group, params in learned.items()]
    if biases:
        groups.append({"params": biases, "lr": cfg.bias_lr})
    optimiser = QuantizerOptimiser(rounding, cfg.weight_lr, groups, cfg.iters, act_qs, "the end-to-end refinement")

    stage_seed = seed * 100003 + 99991  # apart from every block's seed (engine.block_seed)
    gen = torch.Generator().manual_seed(stage_seed)
    n = len(images)
    ref: float | None = None
    kl_v = round_v = 0.0
    history: dict[str, list[float]] = {"iteration": [], "kl": [], "round": []}
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            compiled_kernels(compiles(cfg.compile_kernels, cfg.iters)):
        torch.manual_seed(stage_seed)  # QDrop draws
        bar = tqdm(range(cfg.iters), desc="refine end to end", unit="it", disable=not progress, leave=False)
        for it in bar:
            idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
            total = len(idx)
            start, stop, share = distributed.batch_slice(total)
            idx = idx[start:stop]
            with distributed.sharded_draws(start, stop, total):
                out = model(images[idx].to(device)).float()
            kl = kl_logits_loss(out, teacher[idx].to(device), cfg.temperature)
            if ref is None:
                ref = distributed.sum_floats([share * float(kl.detach())], "the end-to-end refinement")[0]
            kl = normalised(kl, ref)
            if rounding:
                reg = cfg.round_lambda * sum(q.round_loss(cfg.beta) for q in learned_rounding)
            else:
                reg = torch.zeros((), device=device)
            loss = share * kl + reg / distributed.world_size()
            optimiser.step(loss)
            if it % cfg.log_every == 0 or it == cfg.iters - 1:
                kl_v = distributed.sum_floats([share * float(kl.detach())], "the end-to-end refinement")[0]
                round_v = float(reg.detach())
                if not math.isfinite(kl_v + round_v):
                    raise VitqError(f"the end-to-end refinement loss became NaN/Inf by iteration {it}: "
                                    "lower the refinement learning rates")
                history["iteration"].append(it)
                history["kl"].append(kl_v)
                history["round"].append(round_v)
                bar.set_postfix(kl=f"{kl_v:.4f}")
        bar.close()
        kernels = compile_status()

    for q in learned_rounding + act_qs:
        q.freeze_()
    flipped = sum(int((q.codes(m.weight) != before).sum()) for (m, q), before in zip(pairs, codes_before))
    for p, flag in frozen:
        p.requires_grad_(flag)
    fold_learned_rounding(model)
    set_mode(model, QuantMode.QUANT)
    return {"iters": cfg.iters, "seconds": round(time.perf_counter() - t0, 3), "rounding": cfg.rounding,
            "initial_kl": ref, "final_kl_ratio": kl_v, "rounding_flips": flipped,
            "rounding_layers": len(learned_rounding), "kernels": kernels, "history": history}


def _rounding_pairs(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(module, its learned-rounding weight quantizer) for every such weight."""
    return [(m, m.w_quantizer) for m in block_quant_modules(model)
            if getattr(m, "w_quantizer", None) is not None and m.w_quantizer.trainable_parameters().get("rounding")]
