"""AIQViT method package: DFQ, low-rank compensation, rank search, curriculum, config, extension."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from vitq.errors import VitqError
from vitq.methods.aiqvit import (
    DFQ_EPS,
    AIQConfig,
    DynamicFocusingQuantizer,
    LowRankDelta,
    LowRankFactors,
    SideBranch,
    arch_parameters,
    attach_lowrank,
    candidate_ranks,
    compensated_weight,
    curriculum_order,
    curriculum_pool_size,
    detach_lowrank,
    energy_rank,
    find_lowrank,
    first_order_darts_step,
    fold_merged,
    lowrank_modules,
    lowrank_overhead,
    lowrank_parameters,
    make_arch_optimizer,
    restore_side_branches,
    sample_batch,
)
from vitq.qmodules import QuantLinear, QuantMatMul, QuantMode, iter_quantizers, quant_modules, set_mode
from vitq.quantizers import SOFTMAX_QUANTIZERS, AdaRoundQuantizer, UniformQuantizer


def _softmax_maps(B: int = 2, H: int = 3, N: int = 16, D: int = 8, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    P = (torch.randn(B, H, N, N, generator=g, dtype=dtype) * 2).softmax(-1)
    V = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    return P, V


def _peaky_maps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where a few rows attend almost only to token 0 (the case DFQ's clipping is for)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, 32, 32, generator=g)
    spikes = torch.rand(4, 3, 32, generator=g) < 0.02
    logits[..., 0] += spikes * 12
    return logits.softmax(-1), torch.randn(4, 3, 32, 8, generator=g)


def _minmax(q: UniformQuantizer, x: torch.Tensor) -> None:
    q.reset_observer()
    q.observe(x)
    q.init_from_minmax()


def _qlinear(d_out: int = 12, d_in: int = 16, bits: int = 3, act_bits: int | None = None, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
    wq = UniformQuantizer(bits, granularity="channel", axis=0)
    _minmax(wq, lin.weight.detach())
    aq = None
    if act_bits is not None:
        aq = UniformQuantizer(act_bits)
        _minmax(aq, torch.randn(64, d_in, generator=g))
    layer = QuantLinear.from_float(lin, wq, aq)
    layer.mode = QuantMode.QUANT
    return layer


def _randomise_b(lowrank: LowRankFactors, seed: int = 0, std: float = 0.05) -> None:
    with torch.no_grad():
        lowrank.B.normal_(0, std, generator=torch.Generator().manual_seed(seed))


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
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 15


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
        dfq.project_()
        assert 0.0 <= float(dfq.b1.detach()) < float(dfq.b2.detach()) <= 1.0
    # zero mode: below b1 is an exact 0, the interval keeps 2^k - 1 levels
    z = DynamicFocusingQuantizer(3, below="zero")
    z.set_bounds(0.1, 0.7)
    out = z(torch.tensor([0.0, 0.05, 0.1, 0.7, 0.9]))
    assert torch.equal(out[:2], torch.zeros(2)) and torch.allclose(out[2:], torch.tensor([0.1, 0.7, 0.7]))
    assert len(torch.unique(z(torch.linspace(0.1, 0.7, 1000)))) == 7


def test_dfq_init_from_clips_peaky_attention() -> None:
    P, V = _peaky_maps()
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
    assert [name for name, _ in iter_quantizers(mm)] == ["a_quantizer"]   # quant modules list it
    # QDrop through the interface: training mode with keep probability 0 returns the float input
    q = mm.a_quantizer.train()
    q.set_qdrop(0.0)
    assert torch.equal(q(P), P)
    with pytest.raises(VitqError):
        DynamicFocusingQuantizer(9)
    with pytest.raises(RuntimeError):
        DynamicFocusingQuantizer(4)(P)


def test_dfq_trainable_parameters_projection_after_a_bad_step_and_freeze() -> None:
    P, V = _softmax_maps(dtype=torch.float32)
    dfq = DynamicFocusingQuantizer(3)
    dfq.set_bounds(0.05, 0.4)
    groups = dfq.trainable_parameters()
    assert list(groups) == ["interval"] and groups["interval"][0] is dfq.b1 and groups["interval"][1] is dfq.b2
    assert DynamicFocusingQuantizer(None).trainable_parameters() == {}
    for p in groups["interval"]:
        p.requires_grad_(True)
    # a far too large step drives b1 below 0 and above b2: project_ repairs the interval
    opt = torch.optim.SGD(groups["interval"], lr=100.0)
    ((dfq(P) @ V - P @ V).pow(2).sum() + 10 * dfq.b1.sum() - 10 * dfq.b2.sum()).backward()
    opt.step()
    assert not (0.0 <= float(dfq.b1.detach()) < float(dfq.b2.detach()) <= 1.0)
    dfq.project_()
    lo, hi = float(dfq.b1.detach()), float(dfq.b2.detach())
    assert 0.0 <= lo and lo + DFQ_EPS <= hi + 1e-9 and hi <= 1.0
    assert torch.isfinite(dfq(P)).all()
    dfq.train()
    dfq.set_qdrop(0.5)
    dfq.freeze_()
    assert not dfq.training and dfq.drop_prob == 1.0
    assert not dfq.b1.requires_grad and not dfq.b2.requires_grad


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("below", ["clip", "zero"])
def test_dfq_calibrate_itself_picks_the_init_from_bounds(granularity: str, below: str) -> None:
    P, V = _peaky_maps(seed=2)
    for init, ref_V in (("output", V), ("self", None)):
        old = DynamicFocusingQuantizer(3, granularity=granularity, below=below)
        old.init_from(P, ref_V)
        new = DynamicFocusingQuantizer(3, granularity=granularity, below=below, init=init)
        assert new.calibrates_itself
        new.calibrate_itself(P, partner=V)
        assert torch.equal(new.b1, old.b1) and torch.equal(new.b2, old.b2) and new.is_calibrated
    # "output" with no partner measures the self error instead
    lone = DynamicFocusingQuantizer(3, granularity=granularity, below=below)
    lone.calibrate_itself(P)
    ref = DynamicFocusingQuantizer(3, granularity=granularity, below=below)
    ref.init_from(P)
    assert torch.equal(lone.b1, ref.b1) and torch.equal(lone.b2, ref.b2)
    mm = DynamicFocusingQuantizer(3, granularity=granularity, below=below, init="minmax")
    mm.calibrate_itself(P, partner=V)
    dims = (0, 2, 3) if granularity == "head" else (0, 1, 2, 3)
    assert torch.allclose(mm.b1.reshape(-1), P.amin(dim=dims).reshape(-1))
    assert torch.allclose(mm.b2.reshape(-1), P.amax(dim=dims).reshape(-1))


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("below", ["clip", "zero"])
def test_dfq_integer_view_and_codes_reproduce_forward(granularity: str, below: str) -> None:
    P, _ = _softmax_maps(dtype=torch.float32, seed=3)
    dfq = DynamicFocusingQuantizer(4, granularity=granularity, below=below, num_heads=3)
    dfq.calibrate_itself(P)
    view = dfq.integer_view()
    assert view.kind == "dfq" and view.bits == 4 and (view.qmin, view.qmax) == (0, 15) and not view.signed
    assert view.axis == (1 if granularity == "head" else None)
    assert view.extra["below"] == below
    assert torch.equal(view.extra["b1"], dfq.b1.detach()) and torch.equal(view.extra["b2"], dfq.b2.detach())
    codes = dfq.codes(P)
    assert codes.dtype == torch.int32 and int(codes.min()) >= view.qmin and int(codes.max()) <= view.qmax
    deq = (codes.float() - view.zero_point) * view.scale
    if below == "zero":
        deq = torch.where(codes == 0, torch.zeros_like(deq), deq)
    else:
        assert all(torch.equal(a, b) for a, b in zip(dfq.to_affine(), (view.scale, view.zero_point)))
    assert torch.allclose(deq, dfq(P), atol=1e-6, rtol=0)


def test_dfq_registered_softmax_factory_and_its_options() -> None:
    make = SOFTMAX_QUANTIZERS["dfq"]
    q = make(4, "tensor", 3, {})
    assert isinstance(q, DynamicFocusingQuantizer)
    assert (q.granularity, q.below, q.init, tuple(q.b1.shape)) == ("layer", "clip", "output", (1,))
    q = make(4, "head", 3, {"granularity": "head", "below": "zero", "init": "self"})
    assert (q.granularity, q.below, q.init, tuple(q.b1.shape)) == ("head", "zero", "self", (1, 3, 1, 1))
    for bad in ({"granularity": "token"}, {"below": "half"}, {"init": "percentile"}, {"granularity_": "head"}):
        with pytest.raises(VitqError) as exc:
            make(4, "tensor", 3, bad)
        assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- low-rank compensation: merged

def test_merged_lrc_at_init_leaves_tiny_vit_logits_unchanged_and_folds_exactly() -> None:
    import vitq
    from conftest import tiny_vit

    model = tiny_vit()
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
    assert isinstance(lr, LowRankDelta) and layer.w_quantizer is ada and find_lowrank(layer) is lr
    assert parametrize.is_parametrized(layer, "weight") and isinstance(layer, QuantLinear)
    y = layer(x)
    assert torch.equal(y, ref)
    assert torch.allclose(layer.parametrizations.weight.original, layer.weight.detach())  # B = 0: W0 + BA = W0
    y.pow(2).sum().backward()
    assert lr.B.grad is not None and float(lr.B.grad.abs().sum()) > 0   # AdaRound's STE lets gradients reach B
    # with B != 0 the gradient reaches A too, and AdaRound's own alphas still learn
    _randomise_b(lr)
    lr.A.grad = lr.B.grad = ada.alpha.grad = None
    layer(x).pow(2).sum().backward()
    assert float(lr.A.grad.abs().sum()) > 0 and float(lr.B.grad.abs().sum()) > 0
    assert float(ada.alpha.grad.abs().sum()) > 0


def test_merged_lrc_follows_the_quant_mode_so_the_float_path_is_the_teacher() -> None:
    layer = _qlinear()
    x = torch.randn(5, 16)
    w0 = layer.weight.detach().clone()
    lr = attach_lowrank(layer, "merged", rank=4)
    assert lr.mode == QuantMode.QUANT                        # starts in the layer's mode
    _randomise_b(lr)
    set_mode(layer, QuantMode.FLOAT)
    assert lr.mode == QuantMode.FLOAT
    assert torch.equal(layer(x), F.linear(x, w0, layer.bias))
    set_mode(layer, QuantMode.QUANT)
    assert torch.allclose(layer(x), F.linear(x, layer.w_quantizer(w0 + lr.delta()), layer.bias), atol=1e-6)


@pytest.mark.parametrize("adaround", [False, True])
def test_merged_fold_keeps_the_output_and_leaves_no_parametrization(adaround: bool) -> None:
    layer = _qlinear(act_bits=4)
    if adaround:
        layer.w_quantizer = AdaRoundQuantizer(layer.w_quantizer, layer.weight)
        layer.w_quantizer.set_hard()
    keys_before = set(layer.state_dict())
    weight_param = layer.weight
    w0 = layer.weight.detach().clone()
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(2))
    lr = attach_lowrank(layer, "merged", candidates=[0, 2, 4], generator=torch.Generator().manual_seed(1))
    _randomise_b(lr, std=0.2)
    with torch.no_grad():
        lr.alpha.copy_(torch.tensor([0.0, 3.0, 0.0]))
    lr.discretise()
    assert lr.rank == 2
    with torch.no_grad():
        before = layer(x)
        merged_w = w0 + lr.delta()
    assert any(k.startswith("parametrizations.weight.") for k in layer.state_dict())
    set_mode(layer, QuantMode.FLOAT)                         # fold applies the delta whatever the mode
    fold_merged(layer)
    set_mode(layer, QuantMode.QUANT)
    assert not parametrize.is_parametrized(layer) and type(layer) is QuantLinear
    assert layer.weight is weight_param and isinstance(layer.weight, nn.Parameter)
    assert torch.allclose(layer.weight.detach(), merged_w, atol=1e-6)
    assert set(layer.state_dict()) == keys_before and find_lowrank(layer) is None
    with torch.no_grad():
        assert torch.allclose(layer(x), before, atol=1e-5, rtol=0)
    # fold=False restores the original weight exactly
    lr = attach_lowrank(layer, "merged", rank=3)
    _randomise_b(lr)
    w1 = layer.parametrizations.weight.original.detach().clone()
    detach_lowrank(layer, fold=False)
    assert torch.equal(layer.weight.detach(), w1) and not parametrize.is_parametrized(layer)


# --------------------------------------------------------------------------- low-rank compensation: side branch

def test_side_branch_rank0_full_rank_and_monotone() -> None:
    layer = _qlinear()
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    base = layer(x)
    w0 = layer.weight.detach().clone()
    side = attach_lowrank(layer, "side", rank=0)
    assert isinstance(side, SideBranch) and layer.side is side
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
        attach_lowrank(layer, "side", rank=r)
        errs.append(float((w0 - compensated_weight(layer)).detach().norm()))
        detach_lowrank(layer, fold=False)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5
    # 8-bit factors: close to, but not exactly, the FP branch
    attach_lowrank(layer, "side", rank=4)
    y_fp = layer(x).detach()
    detach_lowrank(layer, fold=False)
    attach_lowrank(layer, "side", rank=4, factor_bits=8)
    y8 = layer(x).detach()
    assert not torch.equal(y8, y_fp) and float((y8 - y_fp).abs().max()) < 0.05 * float(y_fp.abs().max())
    detach_lowrank(layer, fold=False)
    assert find_lowrank(layer) is None and layer.side is None


def test_side_branch_svd_init_sees_the_nearest_rounding_error_under_adaround() -> None:
    layer = _qlinear()
    w0 = layer.weight.detach().clone()
    nearest = layer.w_quantizer(w0).detach()
    layer.w_quantizer = AdaRoundQuantizer(layer.w_quantizer, layer.weight)  # soft start: reproduces W
    side = attach_lowrank(layer, "side", rank=12)
    assert torch.allclose(nearest + side.delta().detach(), w0, atol=1e-5)


def test_side_branch_uses_the_layers_quantized_input_under_qdrop() -> None:
    layer = _qlinear(act_bits=4)
    side = attach_lowrank(layer, "side", rank=3)
    aq = layer.a_quantizer.train()
    aq.set_qdrop(0.5)
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
    layer = _qlinear(act_bits=4)
    x = torch.randn(5, 16)
    plain = layer(x)
    attach_lowrank(layer, "side", rank=4)
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), y) and twin.side is not layer.side and find_lowrank(twin) is twin.side
    detach_lowrank(twin, fold=False)
    assert torch.equal(twin(x), plain) and torch.equal(layer(x), y)


def _two_layer_model(seed: int = 0) -> nn.Sequential:
    return nn.Sequential(_qlinear(12, 16, act_bits=4, seed=seed), _qlinear(8, 12, act_bits=4, seed=seed + 1))


def test_deepcopy_of_a_model_with_both_forms_gives_identical_outputs() -> None:
    model = _two_layer_model()
    merged = attach_lowrank(model[0], "merged", rank=4, generator=torch.Generator().manual_seed(0))
    side = attach_lowrank(model[1], "side", rank=3)
    _randomise_b(merged)
    _randomise_b(side, seed=1)
    x = torch.randn(6, 16)
    with torch.no_grad():
        y = model(x)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x), y)
    assert [n for n, _ in lowrank_modules(twin)] == ["0", "1"]
    twin_merged, twin_side = find_lowrank(twin[0]), find_lowrank(twin[1])
    assert twin_merged is not merged and twin_side is not side
    assert twin[0].parametrizations.weight.original is not model[0].parametrizations.weight.original
    # the copy is independent: changing or folding it leaves the original alone
    _randomise_b(twin_merged, seed=5)
    fold_merged(twin[0])
    with torch.no_grad():
        assert torch.equal(model(x), y)
    assert parametrize.is_parametrized(model[0], "weight")


def test_side_branch_state_dict_round_trip_through_restore_side_branches() -> None:
    model = _two_layer_model()
    for name, rank in (("0", 3), ("1", 2)):
        _randomise_b(attach_lowrank(model[int(name)], "side", rank=rank, factor_bits=8), seed=rank)
    x = torch.randn(6, 16)
    with torch.no_grad():
        y = model(x)
    state = model.state_dict()
    fresh = _two_layer_model(seed=10)                        # other weights: the state dict brings them
    rng = torch.get_rng_state()
    restore_side_branches(fresh, {"0": 3, "1": 2}, factor_bits=8)
    assert torch.equal(torch.get_rng_state(), rng)           # loading leaves the global RNG alone
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    assert {n: m.rank for n, m in lowrank_modules(fresh)} == {"0": 3, "1": 2}
    with pytest.raises(VitqError):
        restore_side_branches(fresh, {"2": 3}, None)


def test_lowrank_overhead() -> None:
    assert lowrank_overhead(384, 1152, 32, tokens=197, mode="merged") == {"params": 0, "flops": 0, "weight_bits": 0}
    side = lowrank_overhead(384, 1152, 32, tokens=197)
    assert side["params"] == 32 * (384 + 1152)
    assert side["flops"] == 2 * 197 * 32 * (384 + 1152)
    assert side["weight_bits"] == 16 * side["params"]
    assert lowrank_overhead(384, 1152, 32, factor_bits=8)["weight_bits"] == 8 * side["params"] + 16 * (32 + 1152)
    assert lowrank_overhead(384, 1152, 0)["params"] == 0


def test_attach_errors_are_one_line() -> None:
    layer = _qlinear()
    attach_lowrank(layer, "merged", rank=2)
    cases = [lambda: attach_lowrank(layer, "side", rank=2),                      # already compensated
             lambda: attach_lowrank(_qlinear(), "both"),
             lambda: attach_lowrank(_qlinear(), "merged", init="svd"),
             lambda: attach_lowrank(_qlinear(), "merged", factor_bits=8),
             lambda: attach_lowrank(nn.Linear(4, 4), "side")]
    for case in cases:
        with pytest.raises(VitqError) as exc:
            case()
        assert "\n" not in str(exc.value)


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
    assert lowrank_parameters(layer) == [lr.A, lr.B]
    w_opt = torch.optim.Adam(lowrank_parameters(layer), lr=1e-2)
    a_opt = make_arch_optimizer(arch_parameters(layer))
    loss = lambda: F.mse_loss(layer(x), y)  # noqa: E731
    ref = float(loss().detach())
    for _ in range(20):
        out = first_order_darts_step(loss, loss, w_opt, a_opt, [lr], size_penalty=1e3, ref_loss=ref)
    assert math.isfinite(out["arch_loss"])
    assert float(lr.B.detach().abs().sum()) > 0                # the weight steps moved the factors
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
    assert cfg.lrc_mode == "merged" and cfg.rank_policy == "search"
    assert cfg.search_iters == 300 and cfg.search_split == 0.8 and cfg.size_penalty == 0.01
    assert cfg.arch_betas == (0.5, 0.999) and cfg.curriculum_start == 0.3
    assert not {"dfq", "dfq_granularity", "dfq_below"} & set(cfg.to_dict())   # DFQ is the recipe's softmax quantizer
    assert AIQConfig(lrc_mode="residual").lrc_mode == "side"
    assert AIQConfig.for_bits(6).search_iters == 100
    assert cfg.rank_candidates(48, 144) == [0, 10, 20]
    for bad in (dict(lrc_roles=("qkv", "attn")), dict(lrc_mode="both"), dict(factor_bits=4), dict(search_split=1.0),
                dict(lrc_init="svd"), dict(curriculum_start=0.0), dict(tau=0.0), dict(search_warmup=1.0)):
        with pytest.raises(VitqError) as exc:
            AIQConfig(**bad)
        assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- extension (hooks driven by hand)

class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = _qlinear(24, 16, act_bits=4, seed=1)
        self.fc2 = _qlinear(16, 24, act_bits=4, seed=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def _extension_context(block_model: nn.Module):
    from vitq.reconstruction import BlockContext, ReconConfig

    block = block_model.blocks[0]
    g = torch.Generator().manual_seed(0)
    x_fp = torch.randn(40, 5, 16, generator=g)
    set_mode(block_model, QuantMode.FLOAT)
    with torch.no_grad():
        y_fp = block(x_fp)
    set_mode(block_model, QuantMode.QUANT)
    cfg = ReconConfig(loss="mse", iters=20, batch_size=8, capture_batch_size=16)
    return BlockContext(block_model, "blocks.0", block, x_fp, x_fp.clone(), y_fp, cfg, torch.device("cpu"), g)


@pytest.mark.parametrize("mode", ["merged", "side"])
def test_extension_hooks_search_train_and_finalize(mode: str) -> None:
    from vitq.methods.aiqvit import AIQViTExtension

    model = nn.Module()
    model.blocks = nn.ModuleList([_Block()])
    ctx = _extension_context(model)
    cfg = AIQConfig(lrc_mode=mode, candidates=(0, 2, 4, 8), search_iters=8, lrc_lr=1e-3)
    ext = cfg.make_extension()
    assert isinstance(ext, AIQViTExtension) and ext.cfg is cfg
    groups = ext.begin_block(ctx)
    assert [n for n, _ in lowrank_modules(model)] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert all(not lr.searching for _, lr in lowrank_modules(model))           # searched and discretised
    assert groups and groups[0]["lr"] == cfg.lrc_lr
    opt = torch.optim.Adam(groups)
    for it in range(ctx.cfg.iters):
        idx = ext.sample(it, len(ctx.x_fp), ctx.cfg.batch_size, ctx.gen)
        assert idx is not None and len(idx) == ctx.cfg.batch_size
        xb, yb = ctx.batch(idx)
        opt.zero_grad()
        F.mse_loss(ctx.block(xb), yb).backward()
        opt.step()
    summary = ext.end_block(ctx)
    assert set(summary["lrc_ranks"]) == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"} and summary["curriculum"]
    assert not any(p.requires_grad for p in lowrank_parameters(model))
    x = ctx.x_fp[:4]
    with torch.no_grad():
        before = model.blocks[0](x)
    # a resumed run re-creates the finished block's modules, so the state saved after it loads
    fresh = nn.Module()
    fresh.blocks = nn.ModuleList([_Block()])
    ext.restore_block(fresh, "blocks.0", fresh.blocks[0], summary)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.blocks[0](x), before)
    final = ext.finalize(model)
    with torch.no_grad():
        assert torch.allclose(model.blocks[0](x), before, atol=1e-5)
    if mode == "merged":
        assert final == {} and lowrank_modules(model) == []
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
    else:
        assert final == {"lrc_side_ranks": summary["lrc_ranks"]}
