"""Block-wise reconstruction: AdaRound + QDrop + learned activation scales, with FIMA-Q's losses.

For each block the adapter lists (patch embed, each transformer block, each Swin patch merging,
the head), in forward order (fimaq.md §1.4):

1. cache the block's float input ``X_fp`` over the optimisation images (everything float) and
   its float output ``Y_fp = block(X_fp)``; cache its quantized-prefix input ``X_q`` (blocks
   already reconstructed quantized, hard rounding);
2. put AdaRound on every weight quantizer of the block, switch its activation quantizers to
   training mode (straight-through rounding, QDrop with ``drop_prob``) and make their scales
   learnable; freeze everything else;
3. run ``iters`` iterations: a random batch, the input mixed element-wise from ``X_q`` and
   ``X_fp`` (``qdrop``) or taken from one of them (``qinp`` / ``rinp``), the loss of
   :mod:`vitq.losses` plus the rounding regulariser, Adam on the AdaRound ``alpha`` and on the
   activation scales (cosine-annealed);
4. keep the hard rounding; the next blocks see this block quantized in their ``X_q``.

After the last block the hard-rounded weights are folded into the weights and the AdaRound
modules are replaced by the uniform quantizers again (nearest rounding of a folded weight
reproduces it exactly).

Fisher snapshots (``fimaq_*`` losses) take the KL gradient at the block output with only the
current block quantized: they start from the cached block input and run the rest of the
network through :func:`vitq.adapters.forward_after`, instead of the whole model.

After each block the engine's state is saved atomically to ``work_dir`` (if given); the same
call resumes at the next block and reaches the same result as an uninterrupted run, because
every block draws its random numbers from a generator seeded by ``(seed, block index)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .adapters import DistilledHeads, forward_after, reconstruction_blocks
from .aiqvit import DynamicFocusingQuantizer
from .capture import StopForward, run_until_stopped
from .data import atomic_write_bytes
from .errors import VitqError
from .losses import (LOWRANK_FORMS, brecq_fisher_loss, fisher_diag_loss, fisher_lowrank_loss, kl_logits_loss,
                     lowrank_metric, lp_loss, normalised)
from .qmodules import QuantMode, QuantModule, set_mode
from .quantizers import AdaRoundQuantizer, UniformQuantizer
from .report import _PeakSampler

LOSSES = ("mse", "mae", "brecq", "fimaq_diag", "fimaq_lowrank", "fimaq_dplr")
FISHER_LOSSES = ("fimaq_diag", "fimaq_lowrank", "fimaq_dplr")
INPUT_MODES = ("qdrop", "rinp", "qinp")
SNAPSHOT_SCHEDULES = ("q", "qf", "r")
HEAD_BLOCKS = ("head", "head+head_dist")


@dataclass
class ReconConfig:
    """Block-reconstruction settings. Defaults are the paper's / official code's (fimaq.md §4)."""

    loss: str = "fimaq_dplr"
    iters: int = 20000                # iterations per block
    batch_size: int = 32
    optim_size: int = 1024            # optimisation images
    input_mode: str = "qdrop"         # qdrop | rinp (float input) | qinp (quantized-prefix input)
    drop_prob: float = 0.5            # QDrop: probability of KEEPING the quantized value
    adaround: bool = True             # learn the weight rounding (off: nearest rounding, weights frozen)
    weight_lr: float = 1e-3           # Adam on the AdaRound alphas
    act_lr: float = 4e-5              # Adam on the activation scales, cosine-annealed to 0
    learn_act_scales: bool = True
    dfq_lr: float = 1e-4              # Adam on AIQViT DFQ bounds (post-softmax), cosine-annealed
    round_lambda: float = 0.01        # weight of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2               # share of iterations without the regulariser
    rank: int = 5                     # k: number of Fisher snapshots
    temperature: float = 20.0         # T of the KL behind the Fisher snapshots
    head_temperature: float = 1.0     # T of the head block's KL loss
    snapshot_schedule: str = "q"      # q: spread over the iterations; qf: the first k; r: perturbation
    lowrank_form: str = "gram_inverse"  # gram_inverse | identity | secant
    p1: float = 1.0                   # weight of the normalised low-rank term
    p2: float = 1.0                   # weight of the normalised diagonal term
    alpha: float | None = None        # if set: p1 = 2*alpha, p2 = 2*(1-alpha)
    renormalize: str = "refresh"      # refresh (official HEAD) | once (paper-era code)
    ridge: float = 1e-6
    snapshot_input: str = "fp"        # fp (official) | quant | qdrop: block input during a snapshot
    snapshot_qdrop: bool = True       # QDrop stays on during snapshots, as in the official code
    perturb_scale: float = 1e-6       # schedule "r": size of the positive output perturbation
    keep_on_device: bool = True       # caches on the compute device (else host memory)
    capture_batch_size: int = 64      # batch for caching inputs and for snapshots

    def __post_init__(self) -> None:
        checks = [("loss", self.loss, LOSSES), ("input_mode", self.input_mode, INPUT_MODES),
                  ("snapshot_schedule", self.snapshot_schedule, SNAPSHOT_SCHEDULES),
                  ("lowrank_form", self.lowrank_form, LOWRANK_FORMS), ("renormalize", self.renormalize, ("refresh", "once")),
                  ("snapshot_input", self.snapshot_input, ("fp", "quant", "qdrop"))]
        for field, value, choices in checks:
            if value not in choices:
                raise VitqError(f"{field} must be one of {', '.join(choices)}, got {value!r}")
        if self.iters <= 0 or self.batch_size <= 0 or self.optim_size <= 0:
            raise VitqError("iters, batch_size and optim_size must be positive")
        if self.rank < 1:
            raise VitqError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise VitqError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise VitqError(f"alpha must be in [0, 1], got {self.alpha}")

    @property
    def weights(self) -> tuple[float, float]:
        """(p1, p2): the weights of the normalised low-rank and diagonal terms."""
        if self.loss == "fimaq_diag":
            return 0.0, 2.0
        if self.loss == "fimaq_lowrank":
            return 2.0, 0.0
        if self.alpha is not None:
            return 2.0 * self.alpha, 2.0 * (1.0 - self.alpha)
        return self.p1, self.p2


def snapshot_iterations(iters: int, k: int, schedule: str) -> list[int]:
    """Iterations at which Fisher snapshots are taken: exactly ``k`` of them.

    ``q``: ``round(j * iters / k)`` for j < k (the official ``it % floor(iters/k)`` takes k+1
    when k does not divide iters, fimaq.md §7.2); ``qf``: 0..k-1; ``r``: all k before iteration 0.
    """
    if schedule == "q":
        its = sorted({min(iters - 1, round(j * iters / k)) for j in range(k)})
        return its
    if schedule == "qf":
        return list(range(min(k, iters)))
    return [0]


# --------------------------------------------------------------------------- caching

def _block_source(model: nn.Module, name: str, block: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose call carries this block's input: (module, input-is-its-output)."""
    if isinstance(block, DistilledHeads):
        return model.norm, True
    return model.get_submodule(name), False


@torch.no_grad()
def capture_block_input(model: nn.Module, name: str, block: nn.Module, images: torch.Tensor, batch_size: int,
                        device: torch.device, store: torch.device) -> torch.Tensor:
    """The input of block ``name`` over ``images`` with the model's current modes."""
    source, from_output = _block_source(model, name, block)
    chunks: list[torch.Tensor] = []

    def pre_hook(_m: nn.Module, inputs: tuple) -> None:
        chunks.append(inputs[0].detach().to(store))
        raise StopForward

    def post_hook(_m: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        chunks.append(output.detach().to(store))
        raise StopForward

    handle = source.register_forward_hook(post_hook) if from_output else source.register_forward_pre_hook(pre_hook)
    run_until_stopped(model, images, batch_size, device, [handle])
    return torch.cat(chunks)


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch_size: int, device: torch.device, store: torch.device) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)).detach().to(store) for i in range(0, len(x), batch_size)])


# --------------------------------------------------------------------------- extensions

@dataclass
class BlockContext:
    """What an extension sees of the block being reconstructed."""

    model: nn.Module
    name: str
    block: nn.Module
    x_fp: torch.Tensor
    x_q: torch.Tensor
    y_fp: torch.Tensor
    cfg: "ReconConfig"
    device: torch.device
    gen: torch.Generator

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block input and float target for sample indices ``idx`` (per ``cfg.input_mode``)."""
        xb_fp, yb = self.x_fp[idx].to(self.device), self.y_fp[idx].to(self.device)
        if self.cfg.input_mode == "rinp":
            return xb_fp, yb
        xb_q = self.x_q[idx].to(self.device)
        if self.cfg.input_mode == "qinp":
            return xb_q, yb
        keep = torch.rand(xb_fp.shape, generator=self.gen).to(self.device) < self.cfg.drop_prob
        return torch.where(keep, xb_q, xb_fp), yb


class BlockExtension:
    """Hooks a method adds to the reconstruction loop (AIQViT uses them). Every hook is optional.

    ``begin_block`` runs once the block's quantizers are trainable and returns extra parameter
    groups (Adam, cosine-annealed with the activation scales); ``sample`` may choose each
    batch's indices; ``end_block`` adds to the block summary; ``restore_block`` re-creates the
    extension's modules of a finished block before a resumed run loads its state; ``finalize``
    runs after the last block, before the AdaRound weights are folded.
    """

    def begin_block(self, ctx: BlockContext) -> list[dict[str, Any]]:
        return []

    def sample(self, it: int, n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor | None:
        return None

    def end_block(self, ctx: BlockContext) -> dict[str, Any]:
        return {}

    def restore_block(self, model: nn.Module, name: str, block: nn.Module, summary: dict[str, Any]) -> None:
        pass

    def finalize(self, model: nn.Module) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------- block state

def _block_quant_modules(block: nn.Module) -> list[QuantModule]:
    return [m for m in block.modules() if isinstance(m, QuantModule)]


def install_adaround(block: nn.Module) -> list[tuple[QuantModule, AdaRoundQuantizer, UniformQuantizer]]:
    """Replace each calibrated uniform weight quantizer of ``block`` by AdaRound (soft)."""
    installed = []
    for m in _block_quant_modules(block):
        base = getattr(m, "w_quantizer", None)
        if isinstance(base, UniformQuantizer) and base.enabled:
            ada = AdaRoundQuantizer(base, m.weight).to(m.weight.device)
            m.w_quantizer = ada
            installed.append((m, ada, base))
    return installed


def _activation_quantizers(block: nn.Module, kind: type = UniformQuantizer) -> list[nn.Module]:
    """Enabled activation quantizers of ``kind`` in ``block`` (uniform by default, or DFQ)."""
    out = []
    for m in _block_quant_modules(block):
        for slot in ("a_quantizer", "b_quantizer"):
            q = getattr(m, slot, None)
            if isinstance(q, kind) and q.enabled:
                out.append(q)
    return out


@torch.no_grad()
def fold_adaround(model: nn.Module, bases: dict[str, UniformQuantizer]) -> None:
    """Write every hard-rounded AdaRound weight into its weight and restore the uniform quantizer."""
    for name, m in model.named_modules():
        q = getattr(m, "w_quantizer", None)
        if isinstance(q, AdaRoundQuantizer):
            m.weight.data = q.hard_weight(m.weight)
            m.w_quantizer = bases[name]


# --------------------------------------------------------------------------- one block

class _FisherState:
    """Snapshot vectors of one block and the normalisers of the current refresh."""

    def __init__(self) -> None:
        self.G: list[torch.Tensor] = []
        self.D: list[torch.Tensor] = []
        self.G_mat: torch.Tensor | None = None
        self.M: torch.Tensor | None = None
        self.g_bar: torch.Tensor | None = None
        self.refs: dict[str, float] = {}
        self.conds: list[float] = []


def _kl_to_targets(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.nn.functional.kl_div(torch.log_softmax(logits / temperature, -1), targets, reduction="batchmean")


def _take_snapshot(model: nn.Module, name: str, block: nn.Module, x_in: torch.Tensor, y_fp: torch.Tensor,
                   targets: torch.Tensor, cfg: ReconConfig, device: torch.device, perturb: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One snapshot: (mean |dKL/dout|, mean |out - Y_fp|, sum of squared gradients), each over all images."""
    g_sum = d_sum = None
    sq = 0.0
    n = len(x_in)
    for i in range(0, n, cfg.capture_batch_size):
        xb = x_in[i:i + cfg.capture_batch_size].to(device)
        yb = y_fp[i:i + cfg.capture_batch_size].to(device)
        with torch.no_grad():
            if perturb is None:
                out = block(xb)
            else:  # schedule "r": a small positive perturbation of the float output
                out = yb + (1 + torch.rand(yb.shape, generator=perturb).to(device)) * cfg.perturb_scale
        out = out.detach().requires_grad_(True)
        logits = forward_after(model, name, out)
        loss = _kl_to_targets(logits, targets[i:i + cfg.capture_batch_size].to(device), cfg.temperature)
        (grad,) = torch.autograd.grad(loss, out)
        g = grad.abs().reshape(len(xb), -1).sum(0)
        d = (out.detach() - yb).abs().reshape(len(xb), -1).sum(0)
        sq += float(grad.pow(2).sum())
        g_sum = g if g_sum is None else g_sum + g
        d_sum = d if d_sum is None else d_sum + d
    return g_sum / n, d_sum / n, sq


def _per_sample_grads(model: nn.Module, name: str, block: nn.Module, x_in: torch.Tensor, targets: torch.Tensor,
                      cfg: ReconConfig, device: torch.device, store: torch.device) -> torch.Tensor:
    """BRECQ: per-sample KL gradients at the float block output fed by the quantized prefix."""
    grads = []
    for i in range(0, len(x_in), cfg.capture_batch_size):
        xb = x_in[i:i + cfg.capture_batch_size].to(device)
        with torch.no_grad():
            out = block(xb)
        out = out.detach().requires_grad_(True)
        loss = _kl_to_targets(forward_after(model, name, out), targets[i:i + cfg.capture_batch_size].to(device),
                              cfg.temperature)
        (grad,) = torch.autograd.grad(loss, out)
        grads.append(grad.reshape(len(xb), -1).to(store))
    return torch.cat(grads)


def reconstruct_block(model: nn.Module, name: str, block: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor,
                      targets: torch.Tensor | None, cfg: ReconConfig, device: torch.device, gen: torch.Generator,
                      progress: bool = True, desc: str = "", extension: BlockExtension | None = None
                      ) -> dict[str, Any]:
    """Optimise one block (AdaRound alphas and activation scales); returns its summary.

    On return the block's weight quantizers are AdaRound in hard mode and its activation
    quantizers are back in eval mode with frozen scales.
    """
    is_head = name in HEAD_BLOCKS
    store = x_fp.device
    # ---- float targets of this block (everything float)
    set_mode(model, QuantMode.FLOAT)
    y_fp = _batched(block, x_fp, cfg.capture_batch_size, device, store)
    fisher = (cfg.loss in FISHER_LOSSES) and not is_head
    per_sample = None
    fallback = None
    if cfg.loss == "brecq" and not is_head:
        if x_q is x_fp:
            # nothing is quantized before this block, so the model equals the teacher and every KL
            # gradient is 0: the official code turns this into NaN alphas (fimaq.md §7.4)
            fallback = "mse (no quantized prefix: all KL gradients are zero)"
        else:
            per_sample = _per_sample_grads(model, name, block, x_q, targets, cfg, device, store)

    # ---- trainable state (flags recorded before AdaRound adds its alphas, so they end frozen)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    installed = install_adaround(block) if cfg.adaround else []
    act_qs = _activation_quantizers(block)
    alphas = [ada.alpha for _, ada, _ in installed]
    for ada in alphas:
        ada.requires_grad_(True)
    scales = []
    for q in act_qs:
        q.train()
        q.drop_prob = cfg.drop_prob if cfg.input_mode == "qdrop" else 1.0
        if cfg.learn_act_scales:
            q.scale.requires_grad_(True)
            scales.append(q.scale)
    dfqs = _activation_quantizers(block, DynamicFocusingQuantizer)
    for q in dfqs:  # AIQViT: the post-softmax interval [b1, b2] is learned too
        q.train()
        q.drop_prob = cfg.drop_prob if cfg.input_mode == "qdrop" else 1.0
        q.b1.requires_grad_(True)
        q.b2.requires_grad_(True)
    for m in _block_quant_modules(block):
        m.mode = QuantMode.QUANT
    ext = extension or BlockExtension()
    ctx = BlockContext(model, name, block, x_fp, x_q, y_fp, cfg, device, gen)
    ext_groups = ext.begin_block(ctx)
    opt_w = torch.optim.Adam(alphas, lr=cfg.weight_lr) if alphas else None
    groups = ([{"params": scales, "lr": cfg.act_lr}] if scales else []) + \
             ([{"params": [p for q in dfqs for p in (q.b1, q.b2)], "lr": cfg.dfq_lr}] if dfqs else []) + ext_groups
    opt_a = torch.optim.Adam(groups) if groups else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=cfg.iters, eta_min=0.0) if opt_a else None

    n = len(x_fp)
    snaps = set(snapshot_iterations(cfg.iters, cfg.rank, cfg.snapshot_schedule)) if fisher else set()
    state = _FisherState()
    p1, p2 = cfg.weights
    warm = int(cfg.warmup * cfg.iters)
    ref_rec: float | None = None
    rec_v = round_v = 0.0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.iters), desc=desc or name, unit="it", disable=not progress, leave=False)
    for it in bar:
        if it in snaps:
            _refresh_snapshots(model, name, block, x_fp, x_q, y_fp, targets, cfg, device, gen, state)
        idx = ext.sample(it, n, cfg.batch_size, gen)
        if idx is None:
            idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        xb, yb = ctx.batch(idx)
        out = block(xb)
        if is_head:
            rec = kl_logits_loss(out, yb, cfg.head_temperature)
        elif fisher:
            delta = (out - yb).abs().reshape(len(xb), -1)
            terms = {}
            if p1:
                terms["lowrank"] = fisher_lowrank_loss(delta, state.G_mat, state.M, cfg.lowrank_form)
            if p2:
                terms["diag"] = fisher_diag_loss(delta, state.g_bar)
            if not state.refs:
                state.refs = {k: float(v.detach()) for k, v in terms.items()}
            rec = sum((p1 if k == "lowrank" else p2) * normalised(v, state.refs[k]) for k, v in terms.items())
        elif per_sample is not None:
            delta = (out - yb).abs().reshape(len(xb), -1)
            rec = brecq_fisher_loss(delta, per_sample[idx].to(device))
            ref_rec = float(rec.detach()) if ref_rec is None else ref_rec
            rec = normalised(rec, ref_rec)
        else:
            rec = lp_loss(out, yb, 1.0 if cfg.loss == "mae" else 2.0)
            ref_rec = float(rec.detach()) if ref_rec is None else ref_rec
            rec = normalised(rec, ref_rec)
        if it < warm or not installed:
            reg = torch.zeros((), device=device)
        else:
            beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - (it - warm) / max(1, cfg.iters - warm))
            reg = cfg.round_lambda * sum(ada.round_loss(beta) for _, ada, _ in installed)
        loss = rec + reg
        if not torch.isfinite(loss):
            raise VitqError(f"the reconstruction loss of {name} became NaN/Inf at iteration {it}: "
                            "lower --act-lr / --weight-lr or check the calibration")
        if opt_w:
            opt_w.zero_grad(set_to_none=True)
        if opt_a:
            opt_a.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        if opt_w:
            opt_w.step()
        if opt_a:
            opt_a.step()
            sched.step()
            with torch.no_grad():
                for s in scales:
                    s.clamp_(min=1e-8)  # a scale pushed through zero would flip the grid
                for q in dfqs:
                    q.project_()  # keeps 0 <= b1 < b2 <= 1
        rec_v, round_v = float(rec.detach()), float(reg.detach())
        if it % 50 == 0 or it == cfg.iters - 1:
            bar.set_postfix(rec=f"{rec_v:.4f}", round=f"{round_v:.1f}")
    bar.close()

    # ---- hard rounding, back to frozen eval-mode quantizers
    for _, ada, _ in installed:
        ada.soft = False
        ada.alpha.requires_grad_(False)
    for q in act_qs:
        q.eval()
        q.drop_prob = 1.0
        q.scale.requires_grad_(False)
    for q in dfqs:
        q.eval()
        q.drop_prob = 1.0
        q.b1.requires_grad_(False)
        q.b2.requires_grad_(False)
    for p, flag in frozen:
        p.requires_grad_(flag)
    with torch.no_grad():
        set_mode(model, QuantMode.FLOAT)
        for m in _block_quant_modules(block):
            m.mode = QuantMode.QUANT
        final = float(lp_loss(_batched(block, x_fp[:256], cfg.capture_batch_size, device, store), y_fp[:256]))
    return {"block": name, "seconds": round(time.perf_counter() - t0, 3), "final_rec_loss": rec_v,
            "final_round_loss": round_v, "output_mse_fp_input": final, "snapshots": len(state.G),
            "gram_condition": state.conds, "fallback": fallback, "adaround_layers": len(installed),
            **ext.end_block(ctx)}


def _refresh_snapshots(model: nn.Module, name: str, block: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor,
                       y_fp: torch.Tensor, targets: torch.Tensor, cfg: ReconConfig, device: torch.device,
                       gen: torch.Generator, state: _FisherState) -> None:
    """Take the snapshot(s) due now and rebuild the low-rank metric and the diagonal."""
    saved_drop = [(q, q.drop_prob) for q in _activation_quantizers(block) + _activation_quantizers(
        block, DynamicFocusingQuantizer)]
    if not cfg.snapshot_qdrop:
        for q, _ in saved_drop:
            q.drop_prob = 1.0
    if cfg.snapshot_input == "fp":
        x_in = x_fp
    elif cfg.snapshot_input == "quant":
        x_in = x_q
    else:
        keep = torch.rand(x_fp.shape, generator=gen) < cfg.drop_prob
        x_in = torch.where(keep.to(x_fp.device), x_q, x_fp)
    count = cfg.rank if cfg.snapshot_schedule == "r" else 1
    for _ in range(count):
        perturb = gen if cfg.snapshot_schedule == "r" else None
        g, d, sq = _take_snapshot(model, name, block, x_in, y_fp, targets, cfg, device, perturb)
        if cfg.lowrank_form == "identity":
            # paper-era code: each snapshot RMS-normalised over all samples and elements
            g = g * math.sqrt(len(x_in) * g.numel() / max(sq, 1e-30))
        state.G.append(g)
        state.D.append(d)
    for q, p in saved_drop:
        q.drop_prob = p
    state.G_mat = torch.stack(state.G)
    D = torch.stack(state.D)
    state.M = lowrank_metric(state.G_mat, D, cfg.lowrank_form, cfg.ridge)
    state.g_bar = state.G_mat.mean(0)
    gram = D.double() @ D.double().t()
    state.conds.append(float(torch.linalg.cond(gram)) if gram.abs().sum() > 0 else float("inf"))
    if cfg.renormalize == "refresh" or not state.refs:
        state.refs = {}  # the next iteration sets the normalisers


# --------------------------------------------------------------------------- the whole model

def _config_hash(cfg: ReconConfig, extra: dict[str, Any]) -> str:
    blob = json.dumps({"recon": asdict(cfg), **extra}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reconstruct(model: nn.Module, images: torch.Tensor, cfg: ReconConfig, device: torch.device | str = "cpu",
                seed: int = 0, progress: bool = True, work_dir: str | Path | None = None,
                resume_key: dict[str, Any] | None = None, extension: BlockExtension | None = None) -> dict[str, Any]:
    """Reconstruct every block of a calibrated model in order; returns the per-block report.

    ``images``: the preprocessed optimisation images. With ``work_dir``, the state after each
    block is saved atomically there and a later call with the same settings resumes after the
    last finished block.
    """
    device = torch.device(device)
    store = device if cfg.keep_on_device else torch.device("cpu")
    blocks = reconstruction_blocks(model)
    names = [n for n, _ in blocks]
    model.eval()
    bases: dict[str, UniformQuantizer] = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "w_quantizer", None), UniformQuantizer):
            bases[name] = m.w_quantizer
    ckpt = Path(work_dir) / "reconstruction.pt" if work_dir is not None else None
    key = _config_hash(cfg, {"seed": seed, "images": int(len(images)), **(resume_key or {})})
    done: list[dict[str, Any]] = []
    if ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved.get("key") != key:
            raise VitqError(f"{ckpt} belongs to a run with other settings: use a new --out folder or delete it")
        done = saved["blocks"]
        for name, block in blocks:
            summary = next((d for d in done if d["block"] == name), None)
            if summary is not None:
                if cfg.adaround:
                    for _, ada, _ in install_adaround(block):
                        ada.soft = False
                if extension is not None:
                    extension.restore_block(model, name, block, summary)
        model.load_state_dict(saved["model"])

    needs_targets = cfg.loss in FISHER_LOSSES or cfg.loss == "brecq"
    targets = None
    if needs_targets:
        set_mode(model, QuantMode.FLOAT)
        logits = _batched(model, images, cfg.capture_batch_size, device, store)
        targets = torch.softmax(logits / cfg.temperature, -1)
    finished = {d["block"] for d in done}
    t_start = time.perf_counter()
    todo = [b for b in blocks if b[0] not in finished]
    for pos, (name, block) in enumerate(blocks):
        if name in finished:
            continue
        index = names.index(name)
        gen = torch.Generator().manual_seed(seed * 100003 + index)
        torch.manual_seed(seed * 100003 + index)  # QDrop masks inside the quantizers
        with _PeakSampler() as mem:
            t0 = time.perf_counter()
            set_mode(model, QuantMode.FLOAT)
            x_fp = capture_block_input(model, name, block, images, cfg.capture_batch_size, device, store)
            for other in names[:index]:  # heads come last, so every earlier name is a submodule
                for m in _block_quant_modules(model.get_submodule(other)):
                    m.mode = QuantMode.QUANT
            x_q = x_fp if index == 0 else capture_block_input(model, name, block, images, cfg.capture_batch_size,
                                                               device, store)
            k_done = len(done) - (len(blocks) - len(todo))
            eta = ""
            if k_done > 0:
                per = (time.perf_counter() - t_start) / k_done
                eta = f", ~{per * (len(todo) - k_done) / 60:.1f} min left"
            summary = reconstruct_block(model, name, block, x_fp, x_q, targets, cfg, device, gen, progress,
                                        desc=f"block {index + 1}/{len(blocks)} {name}{eta}", extension=extension)
            summary["seconds"] = round(time.perf_counter() - t0, 3)
        summary["peak_mem_mb"] = round(mem.peak, 1)
        if device.type == "cuda":
            summary["peak_cuda_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        done.append(summary)
        del x_fp, x_q
        if ckpt is not None:
            state = {"key": key, "blocks": done, "model": model.state_dict()}
            atomic_write_bytes(ckpt, lambda fh: torch.save(state, fh))
        if progress:
            tqdm.write(f"  {name}: {summary['seconds']:.1f}s, rec loss {summary['final_rec_loss']:.4f}, "
                       f"output MSE {summary['output_mse_fp_input']:.5f}")
    final = extension.finalize(model) if extension is not None else {}
    fold_adaround(model, bases)
    set_mode(model, QuantMode.QUANT)
    return {"blocks": done, "seconds": round(sum(d["seconds"] for d in done), 3), **final}
