"""AIQViT components: DFQ, low-rank compensation, rank search, curriculum, config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitq
from vitq.aiqvit import (
    AIQConfig,
    DynamicFocusingQuantizer,
    LowRankFactors,
    MergedLowRank,
    arch_parameters,
    attach_lowrank,
    candidate_ranks,
    curriculum_order,
    curriculum_pool_size,
    detach_lowrank,
    energy_rank,
    find_lowrank,
    first_order_darts_step,
    lowrank_modules,
    lowrank_overhead,
    lowrank_parameters,
    make_arch_optimizer,
    project_dfq_,
    sample_batch,
)
from vitq.calibration import init_minmax
from vitq.errors import VitqError
from vitq.qmodules import QuantLinear, QuantMatMul, QuantMode, quant_modules
from vitq.quantizers import AdaRoundQuantizer, UniformQuantizer


def _softmax_maps(B: int = 2, H: int = 3, N: int = 16, D: int = 8, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    P = (torch.randn(B, H, N, N, generator=g, dtype=dtype) * 2).softmax(-1)
    V = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    return P, V


def _qlinear(d_out: int = 12, d_in: int = 16, bits: int = 3, act_bits: int | None = None, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
    wq = UniformQuantizer(bits, granularity="channel", axis=0)
    init_minmax(wq, lin.weight.detach())
    aq = None
    if act_bits is not None:
        aq = UniformQuantizer(act_bits)
        init_minmax(aq, torch.randn(64, d_in, generator=g))
    layer = QuantLinear.from_float(lin, wq, aq)
    layer.mode = QuantMode.QUANT
    return layer


# --------------------------------------------------------------------------- DFQ

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dfq_on_unit_interval_equals_uniform_bit_for_bit(bits: int) -> None:
    x = torch.rand(4096, generator=torch.Generator().manual_seed(bits))
    dfq = DynamicFocusingQuantizer(bits)
    dfq.set_bounds(0.0, 1.0)
    uq = UniformQuantizer(bits)
    uq.set_params(1.0 / (2 ** bits - 1), 0.0)
    assert torch.equal(dfq(x), uq(x))


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("below", ["clip", "zero"])
def test_dfq_integer_matmul_matches_fake_quant(granularity: str, below: str) -> None:
    P, V = _softmax_maps()
    dfq = DynamicFocusingQuantizer(4, granularity=granularity, below=below)
    if granularity == "head":
        dfq.set_bounds(torch.tensor([0.01, 0.02, 0.005]), torch.tensor([0.6, 0.8, 0.45]))
        assert dfq.b1.shape == (1, 3, 1, 1)
    else:
        dfq.set_bounds(0.013, 0.7)
    ref = dfq(P) @ V
    out = dfq.integer_matmul(P, V)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    codes = dfq.codes(P)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) <= 15


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_dfq_to_affine_gives_same_uniform_quantizer(granularity: str) -> None:
    P, _ = _softmax_maps(seed=1)
    dfq = DynamicFocusingQuantizer(4, granularity=granularity)
    b1 = torch.tensor([0.02, 0.031, 0.0]) if granularity == "head" else 0.023
    b2 = torch.tensor([0.5, 0.9, 0.7]) if granularity == "head" else 0.66
    dfq.set_bounds(b1, b2)
    old_b1, old_delta = dfq.b1.detach().clone(), dfq.delta().detach().clone()
    dfq.snap_zero_point_()
    scale, zp = dfq.to_affine()
    assert torch.allclose(zp, zp.round(), atol=1e-4)               # integer zero point after snapping
    assert torch.all((dfq.b1 - old_b1).abs() <= old_delta / 2 + 1e-7)
    assert torch.allclose(scale, old_delta)
    uq = UniformQuantizer(4, granularity="head" if granularity == "head" else "tensor",
                          axis=1 if granularity == "head" else None)
    uq.set_params(scale, zp)
    assert torch.allclose(uq(P), dfq(P), atol=1e-9, rtol=0)
    assert torch.allclose(dfq.to_uniform()(P), dfq(P), atol=1e-9, rtol=0)
    with pytest.raises(VitqError):
        z = DynamicFocusingQuantizer(4, below="zero")
        z.set_bounds(0.0, 1.0)
        z.to_affine()


def test_dfq_out_of_range_gradients_and_projection() -> None:
    dfq = DynamicFocusingQuantizer(3)
    dfq.set_bounds(0.2, 0.7)
    x = torch.tensor([0.0, 0.1, 0.19, 0.8, 0.95, 1.0])
    assert torch.equal(dfq(x), torch.tensor([0.2, 0.2, 0.2, 0.7, 0.7, 0.7]))
    # Outside the interval the output is exactly b1 (3 values) or b2 (3 values): dL/db = counts.
    dfq.b1.requires_grad_(True)
    dfq.b2.requires_grad_(True)
    dfq(x).sum().backward()
    assert torch.allclose(dfq.b1.grad, torch.tensor([3.0])) and torch.allclose(dfq.b2.grad, torch.tensor([3.0]))
    # Inside values also move both bounds (through Delta and the offset).
    dfq.b1.grad = dfq.b2.grad = None
    y = torch.linspace(0.22, 0.68, 17)
    (dfq(y) * torch.linspace(-1, 2, 17)).sum().backward()
    assert float(dfq.b1.grad.abs()) > 0 and float(dfq.b2.grad.abs()) > 0
    # projection keeps 0 <= b1 < b2 <= 1
    for lo, hi in ((-0.3, 1.5), (0.9, 0.5), (1.2, 1.3)):
        with torch.no_grad():
            dfq.b1.fill_(lo)
            dfq.b2.fill_(hi)
        project_dfq_(nn.Sequential(dfq))
        assert 0.0 <= float(dfq.b1.detach()) < float(dfq.b2.detach()) <= 1.0
    # zero mode: below b1 is an exact 0, the interval keeps 2^k - 1 levels
    z = DynamicFocusingQuantizer(3, below="zero")
    z.set_bounds(0.1, 0.7)
    out = z(torch.tensor([0.0, 0.05, 0.1, 0.7, 0.9]))
    assert torch.equal(out[:2], torch.zeros(2)) and torch.allclose(out[2:], torch.tensor([0.1, 0.7, 0.7]))
    assert len(torch.unique(z(torch.linspace(0.1, 0.7, 1000)))) == 7


def test_dfq_init_from_clips_peaky_attention() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 32, 32, generator=g)
    spikes = torch.rand(4, 3, 32, generator=g) < 0.02     # a few rows attend almost only to token 0
    logits[..., 0] += spikes * 12
    P = logits.softmax(-1)
    V = torch.randn(4, 3, 32, 8, generator=g)
    dfq = DynamicFocusingQuantizer(3)
    err = dfq.init_from(P, V)
    assert float(dfq.b1) == 0.0 and float(dfq.b2) < 0.99
    full = DynamicFocusingQuantizer(3)
    full.set_bounds(0.0, P.max())
    assert float(err) < float(((full(P) - P) @ V).pow(2).sum())
    assert torch.allclose(err, ((dfq(P) - P) @ V).pow(2).sum().reshape(1))
    per_head = DynamicFocusingQuantizer(3, granularity="head")
    per_head.init_from(P)
    assert per_head.b1.shape == (1, 3, 1, 1) and bool(per_head.initialized)


def test_dfq_in_matmul_slot_minmax_and_state_dict() -> None:
    P, V = _softmax_maps(dtype=torch.float32)
    mm = QuantMatMul(DynamicFocusingQuantizer(4, granularity="head"), None)
    mm.mode = QuantMode.OBSERVE
    assert torch.equal(mm(P, V), P @ V)
    mm.a_quantizer.init_from_minmax()
    assert mm.a_quantizer.is_calibrated and mm.a_quantizer.b1.shape == (1, 3, 1, 1)
    mm.mode = QuantMode.QUANT
    out = mm(P, V)
    fresh = QuantMatMul(DynamicFocusingQuantizer(4, granularity="head"), None)
    fresh.load_state_dict(mm.state_dict())
    fresh.mode = QuantMode.QUANT
    assert torch.equal(fresh(P, V), out)
    # QDrop: training mode with keep probability 0 returns the float input
    q = mm.a_quantizer.train()
    q.drop_prob = 0.0
    assert torch.equal(q(P), P)
    with pytest.raises(VitqError):
        DynamicFocusingQuantizer(9)
    with pytest.raises(RuntimeError):
        DynamicFocusingQuantizer(4)(P)


# --------------------------------------------------------------------------- low-rank compensation

def test_merged_lrc_at_init_leaves_tiny_vit_logits_unchanged_and_folds_exactly() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    x = torch.randn(16, 3, 32, 32)
    vitq.quantize(model, x, "minmax", w_bits=4, a_bits=4, calib_size=16, progress=False, device="cpu")
    keys_before = set(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    layers = [(n, m) for n, m in quant_modules(model) if isinstance(m, QuantLinear) and n.startswith("blocks.")]
    assert len(layers) == 8
    gen = torch.Generator().manual_seed(1)
    for _, m in layers:
        attach_lowrank(m, "merged", rank=8, generator=gen)
    assert len(lowrank_modules(model)) == 8
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        # a non-zero correction changes the logits; folding keeps them bit for bit
        for _, lr in lowrank_modules(model):
            lr.B.normal_(0, 0.02, generator=gen)
        moved = model(x)
    assert not torch.equal(moved, ref)
    for _, m in layers:
        detach_lowrank(m, fold=True)
    with torch.no_grad():
        assert torch.equal(model(x), moved)
    assert set(model.state_dict()) == keys_before           # no A/B tensors left


def test_merged_lrc_with_adaround_base_and_gradients() -> None:
    layer = _qlinear()
    ada = AdaRoundQuantizer(layer.w_quantizer, layer.weight)
    layer.w_quantizer = ada
    x = torch.randn(5, 16)
    ref = layer(x)
    lr = attach_lowrank(layer, "merged", rank=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(lr, MergedLowRank) and lr.base is ada
    y = layer(x)
    assert torch.equal(y, ref)
    y.pow(2).sum().backward()
    assert lr.B.grad is not None and float(lr.B.grad.abs().sum()) > 0   # STE lets gradients reach B
    assert torch.allclose(lr.merge(), layer.weight.detach())           # B = 0: W0 + BA = W0


def test_side_branch_rank0_full_rank_and_monotone() -> None:
    layer = _qlinear()
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    base = layer(x)
    w0 = layer.weight.detach().clone()
    side = attach_lowrank(layer, "side", rank=0)
    assert torch.equal(layer(x), base)                        # rank 0: no compensation, exactly
    detach_lowrank(layer, fold=False)
    # full rank with FP factors captures E entirely: the layer becomes the float layer
    for act_rms in (None, torch.rand(16, generator=torch.Generator().manual_seed(4)) + 0.1):
        attach_lowrank(layer, "side", rank=12, act_rms=act_rms)
        assert torch.allclose(layer(x), F.linear(x, w0, layer.bias), atol=1e-5)
        detach_lowrank(layer, fold=False)
    assert torch.equal(layer.weight.detach(), w0)
    # rank-r SVD init: weight error shrinks monotonically with r
    errs = []
    for r in (0, 1, 2, 4, 8, 12):
        side = attach_lowrank(layer, "side", rank=r)
        errs.append(float((w0 - side.effective_weight()).detach().norm()))
        detach_lowrank(layer, fold=False)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5
    # 8-bit factors: close to, but not exactly, the FP branch
    fp = attach_lowrank(layer, "side", rank=4)
    y_fp = layer(x).detach()
    detach_lowrank(layer, fold=False)
    attach_lowrank(layer, "side", rank=4, factor_bits=8)
    y8 = layer(x).detach()
    assert not torch.equal(y8, y_fp) and float((y8 - y_fp).abs().max()) < 0.05 * float(y_fp.abs().max())
    detach_lowrank(layer, fold=False)
    assert find_lowrank(layer) is None and fp._handles == []


def test_side_branch_uses_the_layers_quantized_input_under_qdrop() -> None:
    layer = _qlinear(act_bits=4)
    side = attach_lowrank(layer, "side", rank=3)
    aq = layer.a_quantizer.train()
    aq.drop_prob = 0.5
    seen = []
    aq.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(6, 16)
    y = layer(x)
    x_q = seen[-1]
    expected = F.linear(x_q, layer.w_quantizer(layer.weight), layer.bias) + side(x_q)
    assert torch.allclose(y, expected, atol=1e-6)
    layer.mode = QuantMode.FLOAT                               # teacher path: no branch
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_side_branch_survives_deepcopy_and_detaches_only_its_copy() -> None:
    import copy

    layer = _qlinear(act_bits=4)
    x = torch.randn(5, 16)
    plain = layer(x)
    attach_lowrank(layer, "side", rank=4)
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), y) and twin.lowrank._layer() is twin
    detach_lowrank(twin, fold=False)
    assert torch.equal(twin(x), plain) and torch.equal(layer(x), y)


def test_lowrank_overhead() -> None:
    assert lowrank_overhead(384, 1152, 32, tokens=197, mode="merged") == {"params": 0, "flops": 0, "weight_bits": 0}
    side = lowrank_overhead(384, 1152, 32, tokens=197)
    assert side["params"] == 32 * (384 + 1152)
    assert side["flops"] == 2 * 197 * 32 * (384 + 1152)
    assert side["weight_bits"] == 16 * side["params"]
    assert lowrank_overhead(384, 1152, 32, factor_bits=8)["weight_bits"] == 8 * side["params"] + 16 * (32 + 1152)
    assert lowrank_overhead(384, 1152, 0)["params"] == 0


# --------------------------------------------------------------------------- rank search

def test_nested_mask_discretise_and_cost() -> None:
    g = torch.Generator().manual_seed(0)
    lr = LowRankFactors(12, 10, candidates=[0, 2, 4, 6])
    with torch.no_grad():
        lr.A.normal_(generator=g)
        lr.B.normal_(generator=g)
    # uniform pi: m_j = share of candidates with r_k >= j
    assert torch.allclose(lr.mask(), torch.tensor([0.75, 0.75, 0.5, 0.5, 0.25, 0.25]))
    assert math.isclose(float(lr.expected_cost().detach()), 3 * 22 / 120, rel_tol=1e-6)
    with torch.no_grad():
        lr.alpha.copy_(torch.tensor([0.0, 0.0, 1e4, 0.0]))     # pi one-hot on r = 4
    assert torch.equal(lr.mask(), torch.tensor([1.0, 1, 1, 1, 0, 0]))
    want = lr.B.detach()[:, :4] @ lr.A.detach()[:4]
    assert torch.allclose(lr.delta(), want, atol=1e-6)
    assert lr.chosen_rank() == 4
    assert lr.discretise() == 4 and lr.rank == 4 and not lr.searching
    assert torch.allclose(lr.delta(), want, atol=1e-6)
    # independent supernet: one segment per candidate
    ind = LowRankFactors(12, 10, candidates=[0, 2, 4], supernet="independent")
    with torch.no_grad():
        ind.B.normal_(generator=g)
        ind.alpha.copy_(torch.tensor([0.0, 0.0, 1e4]))
    assert ind.rank == 6
    want = ind.B.detach()[:, 2:6] @ ind.A.detach()[2:6]
    assert torch.allclose(ind.delta(), want, atol=1e-6)
    ind.discretise()
    assert ind.rank == 4 and torch.allclose(ind.delta(), want, atol=1e-6)


def test_energy_rank_and_candidates() -> None:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=torch.float64))
    Vt, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([10.0, 5, 3, 1, 0.5, 0.1], dtype=torch.float64)
    E = U @ torch.diag(s) @ Vt.T                  # energies 100, 25, 9, ...: top-2 hold 92%
    assert energy_rank(E, [0, 1, 2, 3, 4]) == 2
    assert energy_rank(E, [0, 1, 3, 5]) == 3
    assert energy_rank(E, [0, 1], energy=0.7) == 1
    assert energy_rank(torch.zeros(5, 4), [0, 2]) == 0
    assert energy_rank(E, [0, 2], act_rms=torch.ones(12)) == 2
    assert candidate_ranks(192, 192) == [0, 10, 20, 40, 60, 80, 100]
    assert candidate_ranks(48, 144) == [0, 10, 20]
    assert candidate_ranks(192, 768, mode="relative") == [0, 8, 12, 24, 48, 96]


def test_darts_step_with_large_penalty_picks_rank_zero() -> None:
    layer = _qlinear(d_out=16, d_in=24, bits=2)
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = F.linear(x, layer.weight, layer.bias)
    lr = attach_lowrank(layer, "merged", candidates=[0, 2, 4, 8], generator=torch.Generator().manual_seed(0))
    assert lr.rank == 8 and arch_parameters(layer) == [lr.alpha]
    w_opt = torch.optim.Adam(lowrank_parameters(layer), lr=1e-2)
    a_opt = make_arch_optimizer(arch_parameters(layer))
    loss = lambda: F.mse_loss(layer(x), y)  # noqa: E731
    ref = float(loss().detach())
    for _ in range(20):
        out = first_order_darts_step(loss, loss, w_opt, a_opt, [lr], size_penalty=1e3, ref_loss=ref)
    assert math.isfinite(out["arch_loss"])
    assert lr.chosen_rank() == 0 and lr.discretise() == 0
    assert float(lr.delta().detach().abs().sum()) == 0.0


# --------------------------------------------------------------------------- curriculum

def test_curriculum_order_pool_and_batches() -> None:
    losses = torch.tensor([0.5, 0.1, 2.0, 0.3, 0.1])
    order = curriculum_order(losses)
    assert order.tolist() == [1, 4, 3, 0, 2]
    assert torch.all(losses[order][1:] >= losses[order][:-1])
    n, iters = 100, 1000
    assert curriculum_pool_size(0, iters, n) == 30
    for it in (500, 700, 999):
        assert curriculum_pool_size(it, iters, n) == 100
    for it in (100, 250, 400):
        assert curriculum_pool_size(it, iters, n) == math.ceil(n * (0.3 + 0.7 * it / 500) - 1e-9)
    sizes = [curriculum_pool_size(it, iters, n) for it in range(iters)]
    assert sizes == sorted(sizes)
    order = curriculum_order(torch.rand(n, generator=torch.Generator().manual_seed(0)))
    batch = sample_batch(order, curriculum_pool_size(0, iters, n), 16, torch.Generator().manual_seed(0))
    assert len(batch) == 16 and set(batch.tolist()) <= set(order[:30].tolist())
    assert len(set(batch.tolist())) == 16


# --------------------------------------------------------------------------- config

def test_config_defaults_aliases_and_errors() -> None:
    cfg = AIQConfig()
    assert cfg.lrc_mode == "merged" and cfg.rank_policy == "search" and cfg.dfq_granularity == "layer"
    assert cfg.search_iters == 300 and cfg.search_split == 0.8 and cfg.size_penalty == 0.01
    assert cfg.arch_betas == (0.5, 0.999) and cfg.curriculum_start == 0.3
    assert AIQConfig(lrc_mode="residual").lrc_mode == "side"
    assert AIQConfig.for_bits(6).search_iters == 100
    assert cfg.rank_candidates(48, 144) == [0, 10, 20]
    for bad in (dict(dfq_below="half"), dict(lrc_mode="both"), dict(factor_bits=4), dict(search_split=1.0),
                dict(lrc_init="svd"), dict(curriculum_start=0.0), dict(tau=0.0), dict(search_warmup=1.0)):
        with pytest.raises(VitqError) as exc:
            AIQConfig(**bad)
        assert "\n" not in str(exc.value)
