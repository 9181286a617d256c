"""Block reconstruction: losses by hand, snapshot schedule, AdaRound, resume and determinism."""

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitq
import vitq.reconstruction as recon
from vitq.losses import (brecq_fisher_loss, fisher_diag_loss, fisher_lowrank_loss, kl_logits_loss, lowrank_metric,
                         lp_loss, normalised)
from vitq.quantizers import AdaRoundQuantizer, UniformQuantizer
from vitq.reconstruction import ReconConfig, snapshot_iterations

# ----------------------------------------------------------------------------- losses by hand
P = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
Y = torch.tensor([[0.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
D_ABS = (P - Y).abs()  # [[1, 0, 2], [1, 2, 0]]


def test_lp_loss_sums_dim1_and_averages_the_rest():
    # 2-D: sum over dim 1 then mean over the batch: ((1+0+4) + (1+4+0)) / 2 = 5
    assert lp_loss(P, Y, 2.0).item() == pytest.approx(5.0)
    assert lp_loss(P, Y, 1.0).item() == pytest.approx(3.0)


def test_brecq_loss_is_squared_gradient_weighted():
    g = torch.tensor([[1.0, 1.0, 0.5], [2.0, 0.0, 1.0]])
    # mean(Δ² g²) = (1*1 + 0 + 4*0.25 + 1*4 + 4*0 + 0) / 6 = 6/6
    assert brecq_fisher_loss(D_ABS, g).item() == pytest.approx(1.0)


def test_fisher_diag_loss_is_linear_in_gradient():
    g_bar = torch.tensor([2.0, 1.0, 0.5])
    # mean(Δ² ḡ) = (1*2 + 0 + 4*0.5 + 1*2 + 4*1 + 0) / 6 = 10/6
    assert fisher_diag_loss(D_ABS, g_bar).item() == pytest.approx(10 / 6)


def test_fisher_lowrank_gram_inverse_by_hand():
    G = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    D = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    M = lowrank_metric(G, D, "gram_inverse", ridge=0.0)  # (D D^T)^-1 = diag(1, 1/4)
    assert torch.allclose(M, torch.diag(torch.tensor([1.0, 0.25], dtype=torch.float64)))
    # a_b = Δ_b G^T: sample 0: [1+2, 0] = [3, 0]; sample 1: [1+0, 2] = [1, 2]
    # a^T M a: 9 and 1 + 4/4 = 2 -> mean 5.5
    assert fisher_lowrank_loss(D_ABS, G, M, "gram_inverse").item() == pytest.approx(5.5)


def test_fisher_lowrank_identity_and_secant_by_hand():
    G = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    # identity: mean_{b,j} (mean_n Δ g_j)^2: sample 0: (3/3)^2, 0; sample 1: (1/3)^2, (2/3)^2
    expected = (1 + 0 + 1 / 9 + 4 / 9) / 4
    assert fisher_lowrank_loss(D_ABS, G, lowrank_metric(G, G, "identity"), "identity").item() == pytest.approx(expected)
    D = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    M = lowrank_metric(G, D, "secant", ridge=0.0)  # D G^T = diag(2, 1)
    assert torch.allclose(M, torch.diag(torch.tensor([0.5, 1.0], dtype=torch.float64)))


def test_lowrank_metric_survives_collinear_and_zero_snapshots():
    g = torch.rand(1, 50)
    G = torch.cat([g, g * 1.0000001, g * 2])  # collinear: a bare inverse is singular
    for D in (G.clone(), torch.zeros_like(G)):
        M = lowrank_metric(G, D, "gram_inverse")
        assert torch.isfinite(M).all()
        assert torch.linalg.eigvalsh(M).min() > 0  # positive definite


def test_kl_head_loss_and_normaliser():
    p = torch.tensor([[0.0, 1.0]])
    assert kl_logits_loss(p, p).item() == pytest.approx(0.0, abs=1e-7)
    y = torch.tensor([[1.0, 0.0]])
    ps, ys = torch.softmax(p, -1), torch.softmax(y, -1)
    assert kl_logits_loss(p, y).item() == pytest.approx((ys * (ys / ps).log()).sum().item(), rel=1e-5)
    assert normalised(torch.tensor(0.0), 0.0).item() == 0.0  # no 0/0


# ----------------------------------------------------------------------------- schedule and AdaRound
@pytest.mark.parametrize("iters, k", [(20000, 5), (20000, 15), (20000, 3), (500, 7), (10, 15)])
def test_snapshot_schedule_takes_exactly_k(iters, k):
    its = snapshot_iterations(iters, k, "q")
    assert len(its) == min(k, iters) and its[0] == 0 and max(its) < iters
    assert snapshot_iterations(iters, k, "qf") == list(range(min(k, iters)))


def test_adaround_starts_at_the_float_weight_and_hardens_to_the_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 10) * 0.1
    base = UniformQuantizer(4, granularity="channel", axis=0)
    base.observe(w)
    base.init_from_minmax()
    ada = AdaRoundQuantizer(base, w)
    s, z = base.scale, base.zero_point
    code = w / s + z
    inside = (code >= 0) & (code <= 15)
    assert inside.float().mean() > 0.8
    # soft start = float weight wherever the weight is inside the clip range
    assert torch.allclose(ada(w)[inside], w[inside], atol=1e-3 * s.max().item() + 1e-4)
    ada.soft = False
    expected = (torch.clamp(torch.floor(w / s) + (ada.alpha >= 0).float() + z, 0, 15) - z) * s
    assert torch.allclose(ada(w), expected)
    hard = ada.hard_weight(w)
    assert torch.allclose(base(hard), hard, atol=1e-6)  # on the grid: nearest rounding keeps it
    # a weight far outside the range is clamped (the official hard value is not)
    big = w.clone()
    big[0, 0] = 10.0
    assert ada.hard_weight(big)[0, 0] <= base(big)[0, 0] + 1e-6


# ----------------------------------------------------------------------------- the engine
def tiny_model():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()
    m.pretrained_cfg = {"vitq_arch_kwargs": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                                 num_classes=10)}
    return m


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    return torch.randn(48, 3, 32, 32)


QUICK = dict(w_bits=3, a_bits=3, calib_size=16, optim_size=48, iters=40, eq_n=16, rank=3, progress=False,
             device="cpu")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_reconstruction_improves_on_calibration(data):
    fp = tiny_model()
    ref = fp(data)
    calib_only = vitq.quantize(copy.deepcopy(fp), data, "mse", **{k: v for k, v in QUICK.items()
                                                                   if k not in ("optim_size", "iters", "rank")})
    fimaq = vitq.quantize(copy.deepcopy(fp), data, "fimaq", **{**QUICK, "iters": 150})
    assert rel_err(fimaq(data), ref) < rel_err(calib_only(data), ref)


@pytest.mark.parametrize("recipe", ["qdrop", "brecq", "fimaq-diag", "fimaq-lowrank", "fimaq"])
def test_every_reconstruction_recipe_runs_and_stays_finite(recipe, data):
    report = {}
    q = vitq.quantize(tiny_model(), data, recipe, report=report, **QUICK)
    assert torch.isfinite(q(data)).all()
    blocks = report["reconstruction"]["blocks"]
    assert [b["block"] for b in blocks] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    if recipe.startswith("fimaq"):
        assert [b["snapshots"] for b in blocks] == [3, 3, 3, 0]  # k per block, none for the head
    if recipe == "brecq":
        assert blocks[0]["fallback"] is not None and blocks[1]["fallback"] is None


def test_weights_end_on_the_grid(data):
    q = vitq.quantize(tiny_model(), data, "fimaq", **QUICK)
    lin = q.blocks[0].mlp.fc1
    assert isinstance(lin.w_quantizer, UniformQuantizer)
    assert torch.equal(lin.w_quantizer(lin.weight), lin.weight) or torch.allclose(
        lin.w_quantizer(lin.weight), lin.weight, atol=1e-7)


def test_same_seed_same_model(data):
    a = vitq.quantize(tiny_model(), data, "fimaq", seed=5, **QUICK)
    b = vitq.quantize(tiny_model(), data, "fimaq", seed=5, **QUICK)
    assert torch.equal(a(data), b(data))


def kill_on_third_block(monkeypatch):
    """Make the third reconstruct_block call raise KeyboardInterrupt (a Ctrl-C mid-run); returns the undo."""
    real = recon.reconstruct_block
    calls = {"n": 0}

    def dies_on_third_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recon, "reconstruct_block", dies_on_third_block)
    return lambda: monkeypatch.setattr(recon, "reconstruct_block", real)


def test_killed_run_resumes_to_the_same_result(data, tmp_path, monkeypatch):
    uninterrupted = vitq.quantize(tiny_model(), data, "fimaq", **QUICK)(data)
    undo = kill_on_third_block(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        vitq.quantize(tiny_model(), data, "fimaq", work_dir=tmp_path, **QUICK)
    saved = torch.load(tmp_path / "reconstruction.pt", weights_only=False)
    assert [b["block"] for b in saved["blocks"]] == ["patch_embed", "blocks.0"]
    undo()
    report = {}
    resumed = vitq.quantize(tiny_model(), data, "fimaq", work_dir=tmp_path, report=report, **QUICK)
    assert torch.equal(resumed(data), uninterrupted)


def test_resume_refuses_other_settings(data, tmp_path):
    vitq.quantize(tiny_model(), data, "qdrop", work_dir=tmp_path, **QUICK)
    with pytest.raises(vitq.VitqError, match="other settings"):
        vitq.quantize(tiny_model(), data, "qdrop", work_dir=tmp_path, **{**QUICK, "iters": 41})


def test_bad_reconstruction_options():
    with pytest.raises(vitq.VitqError, match="loss must be one of"):
        ReconConfig(loss="nope")
    with pytest.raises(vitq.VitqError, match="no reconstruction stage"):
        vitq.get_recipe("mse", iters=10)
    with pytest.raises(vitq.VitqError, match="alpha"):
        vitq.get_recipe("fimaq", alpha=1.5)


def test_dfq_interval_is_learned_and_saved(data, tmp_path):
    from vitq.aiqvit import DynamicFocusingQuantizer

    calibrated = vitq.quantize(tiny_model(), data, "mse", w_bits=3, a_bits=3, calib_size=16, eq_n=16,
                               softmax_quantizer="dfq", progress=False, device="cpu")
    start = calibrated.blocks[0].attn.matmul2.a_quantizer
    assert isinstance(start, DynamicFocusingQuantizer)
    q = vitq.quantize(tiny_model(), data, "fimaq+dfq", **QUICK)
    dfq = q.blocks[0].attn.matmul2.a_quantizer
    moved = (dfq.b1 - start.b1).abs().max() + (dfq.b2 - start.b2).abs().max()
    assert moved > 1e-5  # the bounds were trained, not left at their calibration
    assert 0 <= dfq.b1.min() and dfq.b2.max() <= 1 and (dfq.b1 < dfq.b2).all()
    assert not dfq.b1.requires_grad and not dfq.training
    vitq.save_quantized(q, tmp_path / "m")
    assert torch.equal(vitq.load_model(str(tmp_path / "m"))(data), q(data))


AIQ_QUICK = {**QUICK, "aiq_candidates": (0, 4, 8), "aiq_search_iters": 5}


@pytest.mark.parametrize("recipe, extra", [
    ("aiqvit", {}),
    ("aiqvit", {"aiq_lrc_mode": "side", "aiq_rank_policy": "energy"}),
    ("fimaq+aiq", {"aiq_rank_policy": "fixed", "aiq_fixed_rank": 4}),
])
def test_aiqvit_recipes_run_report_ranks_and_reload(recipe, extra, data, tmp_path):
    from vitq.aiqvit import lowrank_modules

    report = {}
    q = vitq.quantize(tiny_model(), data, recipe, report=report, **{**AIQ_QUICK, **extra})
    ranks = report["reconstruction"]["blocks"][1]["lrc_ranks"]
    assert set(ranks) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    assert all(r in (0, 4, 8) for r in ranks.values())
    if extra.get("aiq_rank_policy") == "fixed":
        assert set(ranks.values()) == {4}
    side = extra.get("aiq_lrc_mode") == "side"
    # merged compensation is folded into the weights; side branches stay and are saved
    assert bool(lowrank_modules(q)) == (side and any(ranks.values()))
    out = q(data)
    assert torch.isfinite(out).all()
    vitq.save_quantized(q, tmp_path / "m")
    assert torch.equal(vitq.load_model(str(tmp_path / "m"))(data), out)


def test_aiqvit_curriculum_and_lrc_resume_to_the_same_result(data, tmp_path, monkeypatch):
    kw = {**AIQ_QUICK, "aiq_rank_policy": "fixed", "aiq_fixed_rank": 4}
    uninterrupted = vitq.quantize(tiny_model(), data, "fimaq+aiq", **kw)(data)
    undo = kill_on_third_block(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        vitq.quantize(tiny_model(), data, "fimaq+aiq", work_dir=tmp_path, **kw)
    undo()
    resumed = vitq.quantize(tiny_model(), data, "fimaq+aiq", work_dir=tmp_path, **kw)(data)
    assert torch.equal(resumed, uninterrupted)


def test_aiq_options_need_an_aiq_recipe():
    with pytest.raises(vitq.VitqError, match="no AIQViT stage"):
        vitq.get_recipe("fimaq", aiq_lrc_mode="side")


@pytest.mark.parametrize("warmup, trained_before_arch", [(0.0, False), (0.5, True)])
def test_rank_search_warmup_trains_factors_before_the_architecture_steps(warmup, trained_before_arch, data,
                                                                         monkeypatch):
    # With B = 0 all candidate ranks give the same output, so alpha can only compare them after
    # the factors moved: the warm-up must train A, B before the first architecture step.
    import vitq.aiqvit_reconstruction as aiq_recon

    seen = []
    real_step = aiq_recon.first_order_darts_step

    def spy(weight_loss, val_loss, weight_opt, arch_opt, lowranks, *args, **kwargs):
        if not seen:
            seen.append(max(float(lr.B.abs().max()) for lr in lowranks))
        return real_step(weight_loss, val_loss, weight_opt, arch_opt, lowranks, *args, **kwargs)

    monkeypatch.setattr(aiq_recon, "first_order_darts_step", spy)
    vitq.quantize(tiny_model(), data, "aiqvit", **{**AIQ_QUICK, "aiq_search_iters": 4, "aiq_search_warmup": warmup})
    assert (seen[0] > 0) == trained_before_arch
