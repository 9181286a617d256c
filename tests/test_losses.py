"""Every reconstruction loss against an independent, plain implementation of the official formulas
(fimaq.md §3), on random tensors, in float64 with explicit loops where the formula is a sum."""

import numpy as np
import pytest
import torch

from vitq.losses import (brecq_fisher_loss, fisher_diag_loss, fisher_lowrank_loss, fisher_lr_loss, kl_logits_loss,
                         lowrank_metric, lp_loss, normalised, rms_normalised)

RNG = np.random.default_rng(0)
B, N, K = 4, 7, 3
P = RNG.normal(size=(B, N))
Y = RNG.normal(size=(B, N))
DELTA = np.abs(P - Y)
G = np.abs(RNG.normal(size=(K, N)))     # snapshot vectors: mean |KL gradient| (non-negative)
D = np.abs(RNG.normal(size=(K, N)))     # mean |output error| at the snapshots
GRAD = RNG.normal(size=(B, N))          # BRECQ's per-sample gradients


def t(a):
    return torch.tensor(a, dtype=torch.float64)


def test_mse_and_mae_are_the_official_lp_loss():
    # official lp_loss: sum over dim 1 of |P - Y|^p, mean over the rest
    x = RNG.normal(size=(2, 5, 3))
    y = RNG.normal(size=(2, 5, 3))
    for p in (2.0, 1.0):
        plain = np.mean([[sum(abs(x[b, n, c] - y[b, n, c]) ** p for n in range(5)) for c in range(3)] for b in range(2)])
        assert lp_loss(t(x), t(y), p).item() == pytest.approx(plain, rel=1e-12)


def test_brecq_is_the_mean_of_squared_error_times_squared_gradient():
    plain = np.mean([[DELTA[b, n] ** 2 * GRAD[b, n] ** 2 for n in range(N)] for b in range(B)])
    assert brecq_fisher_loss(t(DELTA), t(GRAD)).item() == pytest.approx(plain, rel=1e-12)


def test_fimaq_diagonal_is_linear_in_the_mean_gradient():
    g_bar = [np.mean([abs(G[j, n]) for j in range(K)]) for n in range(N)]
    plain = np.mean([[DELTA[b, n] ** 2 * g_bar[n] for n in range(N)] for b in range(B)])
    assert fisher_diag_loss(t(DELTA), t(G).mean(0)).item() == pytest.approx(plain, rel=1e-12)


def test_fisher_lr_is_the_official_formula_with_one_snapshot_and_averages_rank_ones_beyond():
    # official fisher_lr (k = 1): mean_b (mean_n Δ_bn |g_n|)^2
    plain1 = np.mean([np.mean([DELTA[b, n] * abs(G[0, n]) for n in range(N)]) ** 2 for b in range(B)])
    assert fisher_lr_loss(t(DELTA), t(G[:1])).item() == pytest.approx(plain1, rel=1e-12)
    plain_k = np.mean([[np.mean([DELTA[b, n] * G[j, n] for n in range(N)]) ** 2 for j in range(K)] for b in range(B)])
    assert fisher_lr_loss(t(DELTA), t(G)).item() == pytest.approx(plain_k, rel=1e-12)


def test_dplr_lowrank_term_is_delta_gt_gram_inverse_g_delta():
    # official fisher_dplr L1: a_b = Δ_b |G|^T, L1 = mean_b a_b^T (D D^T)^-1 a_b
    binv = np.linalg.inv(D @ D.T)
    plain = np.mean([(DELTA[b] @ G.T) @ binv @ (DELTA[b] @ G.T) for b in range(B)])
    M = lowrank_metric(t(G), t(D), "gram_inverse", ridge=0.0)
    assert np.allclose(M.numpy(), binv, rtol=1e-9)
    assert fisher_lowrank_loss(t(DELTA), t(G), M).item() == pytest.approx(plain, rel=1e-9)
    # as a matrix: |Δ|^T F_lr |Δ| with F_lr = G^T (D D^T)^-1 G
    F_lr = G.T @ binv @ G
    assert np.mean([DELTA[b] @ F_lr @ DELTA[b] for b in range(B)]) == pytest.approx(plain, rel=1e-9)


def test_identity_form_is_a_plain_sum_of_rank_ones_and_proportional_to_fisher_lr():
    M = lowrank_metric(t(G), t(D), "identity")
    plain = np.mean([sum((DELTA[b] @ G[j]) ** 2 for j in range(K)) for b in range(B)])
    value = fisher_lowrank_loss(t(DELTA), t(G), M).item()
    assert value == pytest.approx(plain, rel=1e-12)
    # the same up to the constant K N^2, which the engine's normalisation cancels
    assert value == pytest.approx(fisher_lr_loss(t(DELTA), t(G)).item() * K * N * N, rel=1e-12)
    assert torch.equal(lowrank_metric(t(G), t(D), "paper_rms"), M)


def test_secant_form_satisfies_the_secant_conditions():
    M = lowrank_metric(t(G), t(D), "secant", ridge=0.0)
    F_lr = t(G).t() @ M @ t(G)
    for j in range(K):  # F_lr d_j = g_j: the low-rank FIM maps each observed error to its gradient
        assert torch.allclose(F_lr @ t(D[j]), t(G[j]), rtol=1e-8, atol=1e-10)


def test_paper_rms_rescales_a_snapshot_to_unit_rms_gradients():
    per_sample = RNG.normal(size=(5, N)) * 3.0
    g = t(np.abs(per_sample).mean(0))
    scaled = rms_normalised(g, float((per_sample ** 2).sum()), per_sample.size)
    factor = np.sqrt(per_sample.size / (per_sample ** 2).sum())
    assert np.allclose(scaled.numpy(), np.abs(per_sample * factor).mean(0))
    assert np.sqrt(((per_sample * factor) ** 2).mean()) == pytest.approx(1.0)


def test_dplr_combination_normalises_each_term_at_the_refresh():
    # rec = p1 L1 / L1(t_ref) + p2 L2 / L2(t_ref): 2 right after a snapshot when p1 = p2 = 1
    M = lowrank_metric(t(G), t(D), "gram_inverse")
    l1, l2 = fisher_lowrank_loss(t(DELTA), t(G), M), fisher_diag_loss(t(DELTA), t(G).mean(0))
    assert (normalised(l1, l1.item()) + normalised(l2, l2.item())).item() == pytest.approx(2.0, rel=1e-9)
    assert normalised(torch.tensor(0.0), 0.0).item() == 0.0  # no 0/0 when the reference is zero


def test_kl_head_loss_is_kl_of_fp_to_quantized():
    p, y = t(RNG.normal(size=(3, 5))), t(RNG.normal(size=(3, 5)))
    ps, ys = torch.softmax(p, -1), torch.softmax(y, -1)
    plain = np.mean([sum(ys[b, c].item() * np.log(ys[b, c].item() / ps[b, c].item()) for c in range(5))
                     for b in range(3)])
    assert kl_logits_loss(p, y).item() == pytest.approx(plain, rel=1e-9)


def test_lowrank_metric_survives_collinear_and_zero_snapshots():
    g = torch.rand(1, 50)
    Gc = torch.cat([g, g * 1.0000001, g * 2])  # collinear: a bare inverse is singular
    for Dc in (Gc.clone(), torch.zeros_like(Gc)):
        M = lowrank_metric(Gc, Dc, "gram_inverse")
        assert torch.isfinite(M).all()
        assert torch.linalg.eigvalsh(M).min() > 0  # positive definite
