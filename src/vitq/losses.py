"""Block-reconstruction losses (research note fimaq.md §3).

Notation: ``P`` is the quantized block output and ``Y`` the float target, both flattened per
sample to ``(B, N)``; ``Δ = |P - Y|`` (the official code takes absolute values before every
Fisher term). Snapshots: ``G`` (k, N) holds mean absolute KL gradients at the block output,
``D`` (k, N) the mean absolute output errors at the same moments.

Every function returns the *un-normalised* term; the reconstruction engine divides each term by
its value at a reference iteration (the first iteration, or the latest snapshot refresh), with a
small epsilon so an all-zero reference cannot give 0/0 (fimaq.md §7.4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOWRANK_FORMS = ("gram_inverse", "identity", "paper_rms", "secant")


def lp_loss(p: torch.Tensor, y: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """``mean over the other dims of sum_dim1 |P - Y|^power`` (the official ``lp_loss``).

    Dim 1 is the token axis for ``(B, N, C)`` and the height for Swin's ``(B, H, W, C)``.
    """
    err = (p - y).abs().pow(power)
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


def mse_loss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``lp_loss`` with power 2."""
    return lp_loss(p, y, 2.0)


def mae_loss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``lp_loss`` with power 1."""
    return lp_loss(p, y, 1.0)


def kl_logits_loss(p: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(Y/T) || softmax(P/T))``, batch mean: the head block's loss."""
    return F.kl_div(F.log_softmax(p / temperature, -1), F.log_softmax(y / temperature, -1), reduction="batchmean",
                    log_target=True)


def brecq_fisher_loss(delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """BRECQ's diagonal Fisher: ``mean_{b,n} Δ_bn^2 * g_bn^2`` with per-sample KL gradients ``g``.

    The squared gradient is what FIMA-Q argues against (the FIM is linear in the KL gradient).
    """
    return (delta.pow(2) * grad.pow(2)).mean()


def fisher_diag_loss(delta: torch.Tensor, g_bar: torch.Tensor) -> torch.Tensor:
    """FIMA-Q's diagonal term: ``mean_{b,n} Δ_bn^2 * ḡ_n`` with ``ḡ = mean_j |g_j|``.

    Linear in the gradient magnitude, not squared.
    """
    return (delta.pow(2) * g_bar[None]).mean()


def fisher_lr_loss(delta: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The official code's ``fisher_lr``: ``mean_b mean_j (mean_n Δ_bn g_jn)^2`` (fimaq.md §3.6).

    With one snapshot (k = 1) this is exactly the official formula; the official code crashes for
    k >= 2 (a broadcast error at the second snapshot), so here the k rank-one terms are averaged.
    """
    return (delta @ G.t() / delta.shape[1]).pow(2).mean()


def rms_normalised(g: torch.Tensor, sum_sq: float, count: int) -> torch.Tensor:
    """The paper-era rescaling of one snapshot: ``g * sqrt(count / sum of squared gradients)``.

    ``count`` is samples x elements and ``sum_sq`` the sum of the squared per-sample gradients,
    so the rescaled per-sample gradients have unit RMS (fimaq.md §3.9).
    """
    return g * math.sqrt(count / max(sum_sq, 1e-30))


def lowrank_metric(G: torch.Tensor, D: torch.Tensor, form: str, ridge: float = 1e-6) -> torch.Tensor:
    """The k x k middle matrix ``M`` of the low-rank FIM ``F_lr = G^T M G`` (float64).

    * ``gram_inverse`` (official HEAD): ``M = (D D^T)^{-1}``;
    * ``secant``: ``M = (G D^T)^{-1}``, so that ``F_lr d_j = g_j`` for every snapshot j (the secant
      conditions; ``F_lr`` is then not symmetric, and a quadratic form only sees its symmetric part);
    * ``identity`` / ``paper_rms``: ``M = I`` (a sum of k rank-one terms; ``paper_rms`` is the
      paper-era code, whose caller passes RMS-normalised snapshots as ``G``).

    The inverse is a ridge-regularised float64 solve, ``(B + ridge * tr|B|/k * I)^{-1}``, not the
    official bare fp32 ``inv`` that fails for collinear snapshots (fimaq.md §7.3).
    """
    k = G.shape[0]
    eye = torch.eye(k, dtype=torch.float64, device=G.device)
    if form in ("identity", "paper_rms"):
        return eye
    if form == "gram_inverse":
        B = D.double() @ D.double().t()
    elif form == "secant":
        B = G.double() @ D.double().t()
    else:
        raise ValueError(f"unknown low-rank form {form!r}; choose from {LOWRANK_FORMS}")
    trace = B.diagonal().abs().sum().clamp(min=1e-30)
    M = torch.linalg.solve(B + ridge * trace / k * eye, eye)
    return (M + M.t()) / 2 if form == "gram_inverse" else M


def fisher_lowrank_loss(delta: torch.Tensor, G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """DPLR's low-rank term ``|Δ|^T F_lr |Δ|`` with ``F_lr = G^T M G``, averaged over the batch.

    ``a_b = Δ_b G^T`` (a k-vector, sums over N) and ``L1 = mean_b a_b^T M a_b`` (float64).
    """
    a = (delta @ G.t()).double()
    return ((a @ M) * a).sum(1).mean().to(delta.dtype)


def normalised(value: torch.Tensor, reference: torch.Tensor | float, eps: float = 1e-12) -> torch.Tensor:
    """``value / reference`` with an epsilon, so an all-zero reference gives 0 rather than NaN."""
    return value / (float(reference) + eps)
