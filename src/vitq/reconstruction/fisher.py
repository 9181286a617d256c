"""Fisher snapshots: KL gradients at a block's output, taken from its cached input (fimaq.md §3.5).

A snapshot runs the block (quantized as in training) on its cached input, the rest of the network
through the adapter's ``forward_after``, and takes the KL gradient at the block output only, so
no pass re-runs the blocks before it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed
from ..adapters import forward_after
from ..losses import fisher_diag_loss, fisher_lowrank_loss, fisher_lr_loss, lowrank_metric, rms_normalised
from ..quantizers.kernels import keep_where
from .config import ReconConfig, snapshot_subset
from .rounding import activation_quantizers


class FisherState:
    """Snapshot vectors of one block and the normalisers of the current refresh."""

    def __init__(self) -> None:
        self.G: list[torch.Tensor] = []      # raw snapshots: mean |dKL/dout| (the diagonal uses these)
        self.G_lr: list[torch.Tensor] = []   # what the low-rank term uses (RMS-normalised for paper_rms)
        self.D: list[torch.Tensor] = []
        self.G_mat: torch.Tensor | None = None
        self.M: torch.Tensor | None = None
        self.g_bar: torch.Tensor | None = None
        self.refs: dict[str, float] = {}
        self.conds: list[float] = []


def _kl_to_targets(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.nn.functional.kl_div(torch.log_softmax(logits / temperature, -1), targets, reduction="batchmean")


def _local_batch(start: int, total: int) -> tuple[int, int, float]:
    """This rank's slice of the images ``start:start+total`` and its share of the batch."""
    dist = distributed.current()
    lo, hi = dist.span(total) if dist is not None else (0, total)
    return start + lo, start + hi, (hi - lo) / total


def _take_snapshot(model: nn.Module, name: str, block: nn.Module, x_in: torch.Tensor, y_fp: torch.Tensor,
                   targets: torch.Tensor, cfg: ReconConfig, device: torch.device, perturb: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One snapshot: (mean |dKL/dout|, mean |out - Y_fp|, sum of squared gradients), each over all images.

    Distributed, each batch is split over the ranks (QDrop and the perturbation draw for the whole
    batch, each rank keeps its rows; the KL is weighted by the rank's share so its gradient is the
    batch's) and the sums are summed over the ranks.
    """
    g_sum = d_sum = None
    sq = torch.zeros((), dtype=torch.float64, device=device)
    n = len(x_in)
    amp = cfg.autocast_context(device)
    for i in range(0, n, cfg.capture_batch_size):
        total = min(cfg.capture_batch_size, n - i)
        lo, hi, share = _local_batch(i, total)
        xb = x_in[lo:hi].to(device)
        yb = y_fp[lo:hi].to(device)
        with torch.no_grad(), distributed.sharded_draws(lo - i, hi - i, total), amp:
            if perturb is None:
                out = block(xb).float()
            else:  # schedule "r": a small positive perturbation of the float output
                noise = torch.rand((total, *y_fp.shape[1:]), generator=perturb)[lo - i:hi - i]
                out = yb + (1 + noise.to(device)) * cfg.perturb_scale
        out = out.detach().requires_grad_(True)
        with amp:
            logits = forward_after(model, name, out).float()
        loss = _kl_to_targets(logits, targets[lo:hi].to(device), cfg.temperature)
        (grad,) = torch.autograd.grad(loss * share, out)  # share 1.0 in one process: exact
        g = grad.abs().reshape(len(xb), -1).sum(0)
        d = (out.detach() - yb).abs().reshape(len(xb), -1).sum(0)
        sq += grad.pow(2).sum().double()  # a float32 sum per batch, totalled in float64 on the device
        g_sum = g if g_sum is None else g_sum + g
        d_sum = d if d_sum is None else d_sum + d
    distributed.all_sum_([g_sum, d_sum, sq], f"a Fisher snapshot of {name}")
    return g_sum / n, d_sum / n, float(sq)


def per_sample_grads(model: nn.Module, name: str, block: nn.Module, x_in: torch.Tensor, targets: torch.Tensor,
                      cfg: ReconConfig, device: torch.device, store: torch.device) -> torch.Tensor:
    """BRECQ: per-sample KL gradients at the float block output fed by the quantized prefix."""
    grads = []
    for i in range(0, len(x_in), cfg.capture_batch_size):
        total = min(cfg.capture_batch_size, len(x_in) - i)
        lo, hi, share = _local_batch(i, total)
        xb = x_in[lo:hi].to(device)
        with torch.no_grad():
            out = block(xb)
        out = out.detach().requires_grad_(True)
        loss = _kl_to_targets(forward_after(model, name, out), targets[lo:hi].to(device), cfg.temperature)
        (grad,) = torch.autograd.grad(loss * share, out)
        grads.append(grad.reshape(len(xb), -1).to(store))
    return distributed.gather_rows(torch.cat(grads))


def refresh_snapshots(model: nn.Module, name: str, block: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor,
                       y_fp: torch.Tensor, targets: torch.Tensor, cfg: ReconConfig, device: torch.device,
                       gen: torch.Generator, state: FisherState) -> None:
    """Take the snapshot(s) due now and rebuild the low-rank metric and the diagonal."""
    saved_drop = [(q, q.drop_prob) for q in activation_quantizers(block)]
    if not cfg.snapshot_qdrop:
        for q, _ in saved_drop:
            q.set_qdrop(1.0)
    if cfg.snapshot_input == "fp":
        x_in = x_fp
    elif cfg.snapshot_input == "quant":
        x_in = x_q
    else:
        keep = keep_where(x_fp.shape, cfg.drop_prob, gen)
        x_in = torch.where(keep.to(x_fp.device), x_q, x_fp)
    subset = snapshot_subset(len(x_in), cfg.snapshot_images)
    if subset is not None:  # every snapshot of the block over the same images
        x_in, y_fp, targets = x_in[subset], y_fp[subset], targets[subset]
    count = cfg.rank if cfg.snapshot_schedule == "r" else 1
    for _ in range(count):
        perturb = gen if cfg.snapshot_schedule == "r" else None
        g, d, sq = _take_snapshot(model, name, block, x_in, y_fp, targets, cfg, device, perturb)
        state.G.append(g)
        # paper-era code: the low-rank term's snapshots RMS-normalised over all samples and elements;
        # the diagonal keeps the raw ones
        state.G_lr.append(rms_normalised(g, sq, len(x_in) * g.numel()) if cfg.lowrank_form == "paper_rms" else g)
        state.D.append(d)
    for q, p in saved_drop:
        q.set_qdrop(p)
    state.G_mat = torch.stack(state.G_lr)
    D = torch.stack(state.D)
    state.M = lowrank_metric(state.G_mat, D, cfg.lowrank_form, cfg.ridge)
    state.g_bar = torch.stack(state.G).mean(0)
    gram = D.double() @ D.double().t()
    state.conds.append(float(torch.linalg.cond(gram)) if gram.abs().sum() > 0 else float("inf"))
    if cfg.renormalize == "refresh" or not state.refs:
        state.refs = {}  # the next iteration sets the normalisers




def fisher_terms(delta: torch.Tensor, state: FisherState, cfg: ReconConfig, p1: float, p2: float
                 ) -> dict[str, torch.Tensor]:
    """The un-normalised Fisher loss terms of ``cfg.loss`` for output errors ``delta`` (B, N)."""
    terms: dict[str, torch.Tensor] = {}
    if p1:
        if cfg.loss == "fimaq_lowrank":
            terms["lowrank"] = fisher_lr_loss(delta, state.G_mat)
        else:
            terms["lowrank"] = fisher_lowrank_loss(delta, state.G_mat, state.M)
    if p2:
        terms["diag"] = fisher_diag_loss(delta, state.g_bar)
    return terms
