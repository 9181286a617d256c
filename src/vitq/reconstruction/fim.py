"""The exact empirical Fisher of the KL loss at a block output, and the matrices vitq's Fisher losses stand for.

Used by ``benchmarks/fim.py`` to see how far FIMA-Q's approximations (fimaq.md §3.5-3.6) are from
the matrix they approximate:

* the exact empirical FIM ``F = mean_n g_n g_n^T``, with ``g_n`` the gradient of image n's own
  KL (the engine's snapshot loss, ``fisher._kl_to_targets``) at selected coordinates of the block
  output (e.g. the class token);
* the matrices ``A`` with ``engine loss = mean_b |Δ_b|^T A |Δ_b|`` for errors ``Δ`` that live on
  those coordinates: the diagonal term, the rank-k term and DPLR with the engine's weighting;
* the measures used to compare them: relative Frobenius error (raw and after the best scalar
  rescaling), quadratic-form losses of candidate errors, Spearman rank correlation.

Nothing here is used by the reconstruction engine itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..adapters import forward_after
from ..losses import lowrank_metric
from .config import ReconConfig
from .fisher import FisherState, _kl_to_targets, fisher_terms


@dataclass
class OutputGradients:
    """What one gradient pass over the images gives (per-image scale, not the engine's batch mean).

    ``grads``: (n, c) per-image KL gradients at the selected coordinates; ``g`` / ``d``: (N,) the
    engine's snapshot vectors over the whole block output, mean_n |grad| and mean_n |out - y_fp|;
    ``delta``: (b, N) |out - y_fp| of the images in ``keep``, in image order (for the loss normalisers).
    """

    grads: torch.Tensor
    g: torch.Tensor
    d: torch.Tensor
    delta: torch.Tensor | None


def output_gradients(model: nn.Module, name: str, block: nn.Module, x_in: torch.Tensor, y_fp: torch.Tensor,
                     targets: torch.Tensor, temperature: float, select: torch.Tensor, batch_size: int = 64,
                     keep: torch.Tensor | None = None) -> OutputGradients:
    """Per-image KL gradients at ``block``'s output, the rest of ``model`` run by ``forward_after``.

    The block runs on ``x_in`` in whatever state it is in (quantized, QDrop on or off), exactly as
    in ``fisher._take_snapshot``. The loss is the engine's batch-mean KL times the batch size, i.e.
    the sum of the per-image KLs: each image's logits depend only on its own block output, so the
    gradient of the sum at image n is image n's own gradient (the engine's is that / batch size).
    """
    n = len(x_in)
    grads, g_sum, d_sum, kept = [], None, None, []
    wanted = torch.zeros(n, dtype=torch.bool)
    if keep is not None:
        wanted[keep] = True
    for i in range(0, n, batch_size):
        xb, yb = x_in[i:i + batch_size], y_fp[i:i + batch_size]
        with torch.no_grad():
            out = block(xb)
        out = out.detach().requires_grad_(True)
        loss = _kl_to_targets(forward_after(model, name, out), targets[i:i + batch_size], temperature) * len(xb)
        (grad,) = torch.autograd.grad(loss, out)
        flat = grad.reshape(len(xb), -1)
        err = (out.detach() - yb).abs().reshape(len(xb), -1)
        grads.append(flat[:, select])
        g_sum = flat.abs().sum(0) if g_sum is None else g_sum + flat.abs().sum(0)
        d_sum = err.sum(0) if d_sum is None else d_sum + err.sum(0)
        kept.append(err[wanted[i:i + len(xb)]])
    return OutputGradients(torch.cat(grads), g_sum / n, d_sum / n, torch.cat(kept) if keep is not None else None)


def empirical_fim(grads: torch.Tensor) -> torch.Tensor:
    """``F = mean_n g_n g_n^T`` (float64) from per-image gradients ``grads`` (n, c)."""
    g = grads.double()
    return g.t() @ g / len(g)


def engine_state(G: torch.Tensor, D: torch.Tensor, cfg: ReconConfig) -> FisherState:
    """The engine's FisherState after snapshots ``G``, ``D`` (k, N), as ``refresh_snapshots`` builds it.

    Only the forms whose low-rank snapshots are the raw ``G`` are supported (``paper_rms``
    rescales them with sums of squares this function does not get).
    """
    if cfg.lowrank_form == "paper_rms":
        raise ValueError("engine_state: the paper_rms form needs the per-snapshot sums of squares")
    state = FisherState()
    state.G = list(G)
    state.G_lr = list(G)
    state.D = list(D)
    state.G_mat = G
    state.M = lowrank_metric(G, D, cfg.lowrank_form, cfg.ridge)
    state.g_bar = G.mean(0)
    return state


def engine_matrices(state: FisherState, select: torch.Tensor, n_elements: int, cfg: ReconConfig,
                    delta_ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """The (c, c) matrices of the engine's Fisher losses on errors confined to ``select``.

    For a per-sample error ``Δ`` (flattened block output, N elements) that is zero outside
    ``select``, each engine loss equals ``mean_b Δ_b[select]^T A Δ_b[select]`` with:

    * ``diag``: ``diag(ḡ[select]) / N`` (``fisher_diag_loss`` means over all N elements);
    * ``lowrank``: ``G[:, select]^T M G[:, select]``, the principal sub-block of ``G^T M G``,
      with ``M`` from the snapshots over the whole output (what ``fisher_lowrank_loss`` applies);
    * ``lowrank_identity``: ``G[:, select]^T G[:, select] / (k N^2)`` (``fisher_lr_loss``);
    * ``dplr``: ``p1 lowrank / r_lowrank + p2 diag / r_diag``: the engine's normalised sum, its
      normalisers ``r`` being the terms' values on ``delta_ref`` (B, N), as the engine sets them
      on the first batch after a refresh.

    Non-symmetric ``M`` (the ``secant`` form) is symmetrised: a quadratic form sees only that.
    """
    G = state.G_mat.double()[:, select]
    lowrank = G.t() @ state.M.double() @ G
    lowrank = (lowrank + lowrank.t()) / 2
    diag = torch.diag(state.g_bar.double()[select]) / n_elements
    identity = G.t() @ G / (len(G) * n_elements ** 2)
    dplr_cfg = replace(cfg, loss="fimaq_dplr")  # the weights and terms of DPLR whatever cfg.loss says
    p1, p2 = dplr_cfg.weights
    refs = {k: float(v) for k, v in fisher_terms(delta_ref, state, dplr_cfg, 1.0, 1.0).items()}
    eps = 1e-12  # as vitq.losses.normalised
    dplr = p1 * lowrank / (refs["lowrank"] + eps) + p2 * diag / (refs["diag"] + eps)
    return {"diag": diag, "lowrank": lowrank, "lowrank_identity": identity, "dplr": dplr}


def best_scale(F: torch.Tensor, A: torch.Tensor) -> float:
    """The scalar c minimising ``||F - c A||_F`` (the engine's losses are scale-free)."""
    den = float((A * A).sum())
    return float((F * A).sum()) / den if den > 0 else 0.0


def relative_frobenius(F: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> float:
    """``||F - scale * A||_F / ||F||_F``."""
    return float(torch.linalg.matrix_norm(F - scale * A) / torch.linalg.matrix_norm(F))


def best_rank_k(F: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of symmetric ``F`` in Frobenius norm (Eckart-Young)."""
    w, V = torch.linalg.eigh(F.double())
    top = w.abs().argsort(descending=True)[:k]
    return (V[:, top] * w[top]) @ V[:, top].t()


def best_nonneg_combination(F: torch.Tensor, parts: Sequence[torch.Tensor]) -> tuple[list[float], torch.Tensor]:
    """Weights c >= 0 minimising ``||F - sum_i c_i A_i||_F`` for two or one parts (DPLR's best weighting).

    With two parts: the unconstrained least-squares solution if both weights are >= 0, else the
    better one-part fit (the optimum then lies on an edge of the feasible quadrant).
    """
    flat = torch.stack([p.reshape(-1) for p in parts], 1)
    target = F.reshape(-1)
    candidates = []
    sol = torch.linalg.lstsq(flat, target[:, None]).solution[:, 0]
    if bool((sol >= 0).all()):
        candidates.append(sol.tolist())
    for i in range(len(parts)):
        c = [0.0] * len(parts)
        c[i] = max(0.0, best_scale(F, parts[i]))
        candidates.append(c)
    best = min(candidates, key=lambda c: float((target - flat @ torch.tensor(c, dtype=flat.dtype)).norm()))
    return best, sum(c * p for c, p in zip(best, parts))


def quadratic_losses(deltas: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``mean_n δ_cn^T A δ_cn`` for each candidate c of ``deltas`` (C, n, c) -> (C,), float64."""
    d = deltas.double()
    return torch.einsum("cni,ij,cnj->c", d, A.double(), d) / d.shape[1]


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=np.float64)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="mergesort")] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: the Pearson correlation of the ranks (nan if either is constant)."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")
