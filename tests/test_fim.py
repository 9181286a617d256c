"""vitq.reconstruction.fim (behind benchmarks/fim.py): the exact empirical FIM against explicit per-image
outer products, the engine matrices against the engine's own loss terms, and the rank statistics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit
from vitq.adapters import forward_after
from vitq.losses import fisher_lr_loss
from vitq.reconstruction.config import ReconConfig
from vitq.reconstruction.fim import (best_nonneg_combination, best_rank_k, best_scale, empirical_fim, engine_matrices,
                                     engine_state, output_gradients, quadratic_losses, rankdata, relative_frobenius,
                                     spearman)
from vitq.reconstruction.fisher import _take_snapshot, fisher_terms

T = 20.0


@pytest.fixture(scope="module")
def setup():
    """A tiny ViT, blocks.0's input, a perturbed target output and random soft targets."""
    model = tiny_vit(0)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32)
    captured = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    with torch.no_grad():
        model(images)
    hook.remove()
    x = captured["x"]
    with torch.no_grad():
        y_fp = model.blocks[0](x) + 0.05 * torch.randn(8, 17, 48)  # so the output error is not 0
    targets = torch.softmax(torch.randn(8, 10) * 3 / T, -1)
    return model, x, y_fp, targets


def test_fim_matches_explicit_per_image_outer_products(setup):
    model, x, y_fp, targets = setup
    block = model.blocks[0]
    select = torch.arange(48)  # the class token
    got = output_gradients(model, "blocks.0", block, x, y_fp, targets, T, select, batch_size=3)  # ragged batches
    brute = torch.zeros(48, 48, dtype=torch.float64)
    magnitude = torch.zeros(48, 48, dtype=torch.float64)  # mean |g_a| |g_b|: what an entry's rounding scales with
    for i in range(len(x)):  # one image at a time, its own KL, plain autograd
        out = block(x[i:i + 1]).detach().requires_grad_(True)
        kl = F.kl_div(torch.log_softmax(forward_after(model, "blocks.0", out) / T, -1), targets[i:i + 1],
                      reduction="sum")
        (g,) = torch.autograd.grad(kl, out)
        g = g[0, 0].double()
        assert torch.allclose(got.grads[i].double(), g, rtol=1e-4, atol=1e-10)
        brute += torch.outer(g, g)
        magnitude += torch.outer(g.abs(), g.abs())
    brute /= len(x)
    magnitude /= len(x)
    assert brute.abs().max() > 0
    # the gradients agree to float32 rounding, so an entry agrees to that rounding of the terms it sums,
    # not of the sum: entries whose terms cancel (one here is 1e-4 of the largest) differ by more than
    # 1e-4 of themselves on some CPUs (2e-4 seen on an AVX-512 Xeon), by ~7e-7 of their terms
    assert ((empirical_fim(got.grads) - brute).abs() <= 1e-5 * magnitude + 1e-14).all()


def test_snapshot_vectors_are_the_engines_at_per_image_scale(setup):
    model, x, y_fp, targets = setup
    cfg = ReconConfig(capture_batch_size=4, temperature=T)
    g, d, _ = _take_snapshot(model, "blocks.0", model.blocks[0], x, y_fp, targets, cfg, torch.device("cpu"), None)
    got = output_gradients(model, "blocks.0", model.blocks[0], x, y_fp, targets, T, torch.arange(48), 4,
                           keep=torch.tensor([1, 6]))
    # the engine differentiates the batch-mean KL: its gradients are the per-image ones / batch size
    assert torch.allclose(got.g, g * cfg.capture_batch_size, rtol=1e-5, atol=1e-12)
    assert torch.allclose(got.d, d, rtol=1e-6)
    assert torch.allclose(got.delta, (model.blocks[0](x[[1, 6]]) - y_fp[[1, 6]]).abs().reshape(2, -1), atol=1e-6)


def test_engine_matrices_reproduce_the_engine_loss_terms_on_the_selected_coordinates():
    torch.manual_seed(0)
    k, N = 3, 40
    select = torch.tensor([2, 5, 11, 30])
    G, D = torch.rand(k, N), torch.rand(k, N)
    cfg = ReconConfig()
    state = engine_state(G, D, cfg)
    delta_ref = torch.rand(6, N)
    mats = engine_matrices(state, select, N, cfg, delta_ref)
    delta = torch.zeros(5, N)
    delta[:, select] = torch.rand(5, len(select))  # errors only on the selected coordinates
    terms = fisher_terms(delta, state, cfg, 1.0, 1.0)
    refs = fisher_terms(delta_ref, state, cfg, 1.0, 1.0)
    sub = delta[:, select].double()
    quad = {key: float(torch.einsum("bi,ij,bj->b", sub, A, sub).mean()) for key, A in mats.items()}
    assert quad["diag"] == pytest.approx(float(terms["diag"]), rel=1e-6)
    assert quad["lowrank"] == pytest.approx(float(terms["lowrank"]), rel=1e-5)
    assert quad["lowrank_identity"] == pytest.approx(float(fisher_lr_loss(delta, G)), rel=1e-5)
    p1, p2 = cfg.weights
    expected = p1 * float(terms["lowrank"]) / float(refs["lowrank"]) + p2 * float(terms["diag"]) / float(refs["diag"])
    assert quad["dplr"] == pytest.approx(expected, rel=1e-5)


def test_spearman_against_a_hand_checked_example():
    # b's ranks with the tie averaged: [1, 2, 3.5, 5, 3.5]; rank deviations a: [-2,-1,0,1,2],
    # b: [-2,-1,0.5,2,0.5]: covariance sum 8, squares 10 and 9.5, so rho = 8 / sqrt(95)
    assert rankdata([5, 6, 7, 8, 7]).tolist() == [1, 2, 3.5, 5, 3.5]
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), rel=1e-12)
    assert spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)   # monotone, not linear
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))


def test_scaling_rank_k_combination_and_quadratic_forms():
    torch.manual_seed(0)
    V = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    Fm = (V * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)) @ V.t()
    assert relative_frobenius(Fm, 0.5 * Fm, best_scale(Fm, 0.5 * Fm)) == pytest.approx(0.0, abs=1e-12)
    assert relative_frobenius(Fm, best_rank_k(Fm, 2)) == pytest.approx(math.sqrt(1.26 / 35.26), rel=1e-9)
    A, B = torch.diag(torch.rand(6, dtype=torch.float64)), torch.rand(6, 6, dtype=torch.float64)
    weights, fit = best_nonneg_combination(2 * A + 3 * B, [A, B])
    assert weights == pytest.approx([2.0, 3.0], rel=1e-8)
    weights, _ = best_nonneg_combination(2 * A - 3 * B, [A, B])  # a negative weight is not allowed
    assert min(weights) >= 0
    deltas = torch.randn(4, 3, 6, dtype=torch.float64)
    loop = [np.mean([float(deltas[c, n] @ Fm @ deltas[c, n]) for n in range(3)]) for c in range(4)]
    assert quadratic_losses(deltas, Fm).tolist() == pytest.approx(loop, rel=1e-12)
