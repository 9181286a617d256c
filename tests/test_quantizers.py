"""Quantizer closed forms, shapes, gradients, QDrop and state-dict round trips."""

from __future__ import annotations

import pytest
import torch

import vitq
from conftest import per_channel_weight_grid, tiny_vit
from vitq.adapters import prepare
from vitq.errors import VitqError
from vitq.qmodules import QuantLinear, QuantMatMul, QuantMode, set_mode
from vitq.quantizers import LogQuantizer, UniformQuantizer, round_ste


def _asym(bits: int, scale: float, zp: float, shape=(1,)) -> UniformQuantizer:
    q = UniformQuantizer(bits)
    q.set_params(torch.full(shape, scale), torch.full(shape, zp))
    return q


def test_round_ste_value_and_gradient() -> None:
    x = torch.tensor([0.2, 1.7, -2.6], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, -3.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_asymmetric_closed_form_exact() -> None:
    # 2 bits: codes 0..3, s = 0.5, z = 1 -> representable values -0.5, 0, 0.5, 1.0
    q = _asym(2, 0.5, 1.0)
    x = torch.tensor([-1.0, -0.4, 0.1, 0.7, 2.0])
    # x/s = -2, -0.8, 0.2, 1.4, 4 -> round+z = -1, 0, 1, 2, 5 -> clamp 0, 0, 1, 2, 3 -> minus z
    assert torch.equal(q(x), torch.tensor([-0.5, -0.5, 0.0, 0.5, 1.0]))
    assert q.quant_range() == (0, 3)


def test_asymmetric_minmax_init() -> None:
    q = UniformQuantizer(2)
    q.observe(torch.tensor([0.5, 2.0]))
    q.observe(torch.tensor([-1.0, 0.0]))  # running min/max: [-1, 2]
    q.init_from_minmax()
    assert q.is_calibrated
    assert torch.allclose(q.scale, torch.tensor([1.0]))  # (2 - -1) / 3
    assert torch.equal(q.zero_point, torch.tensor([1.0]))  # -round(-1 / 1)
    # The extremes are exactly representable.
    assert torch.equal(q(torch.tensor([-1.0, 2.0, 0.4])), torch.tensor([-1.0, 2.0, 0.0]))


def test_symmetric_range_and_values() -> None:
    q = UniformQuantizer(3, symmetric=True)
    assert q.quant_range() == (-4, 3)
    q.set_params(0.5)
    x = torch.tensor([-10.0, -1.9, 0.26, 1.2, 10.0])
    # round(x/s) = -20, -4, 1, 2, 20 -> clamp to [-4, 3]
    assert torch.equal(q(x), torch.tensor([-2.0, -2.0, 0.5, 1.0, 1.5]))
    q2 = UniformQuantizer(8, symmetric=True)
    q2.observe(torch.tensor([-3.0, 1.0]))
    q2.init_from_minmax()
    assert torch.allclose(q2.scale, torch.tensor([3.0 / 128]))
    assert torch.equal(q2.zero_point, torch.zeros(1))


def test_granularity_shapes_and_values() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    qc = UniformQuantizer(4, granularity="channel", axis=0)
    qc.observe(w)
    qc.init_from_minmax()
    assert qc.scale.shape == (6, 1) and qc.zero_point.shape == (6, 1)
    assert torch.allclose(qc.scale, (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 15)

    a = torch.randn(2, 3, 5, 4)
    qh = UniformQuantizer(4, granularity="head")
    qh.observe(a)
    qh.init_from_minmax()
    assert qh.scale.shape == (1, 3, 1, 1)
    assert torch.allclose(qh.max_val.flatten(), a.amax(dim=(0, 2, 3)))
    assert qh(a).shape == a.shape

    t = torch.randn(2, 5, 8)
    qt = UniformQuantizer(4, granularity="token")
    qt.observe(t)
    qt.init_from_minmax()
    assert qt.scale.shape == (1, 5, 1)
    assert torch.allclose(qt.min_val.flatten(), t.amin(dim=(0, 2)))

    qtens = UniformQuantizer(4)
    qtens.observe(t)
    qtens.init_from_minmax()
    assert qtens.scale.shape == (1,)


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5])
def test_bits_validation_message(bits) -> None:
    with pytest.raises(VitqError) as err:
        UniformQuantizer(bits)
    assert str(err.value) == f"bits must be between 2 and 8 (or 16/32 for off), got {bits}"
    assert "\n" not in str(err.value)
    with pytest.raises(VitqError):
        LogQuantizer(bits)


@pytest.mark.parametrize("bits", [None, 16, 32])
def test_off_bits_is_identity(bits) -> None:
    q = UniformQuantizer(bits)
    x = torch.randn(3, 4)
    assert not q.enabled and q.is_calibrated
    assert q(x) is x
    assert LogQuantizer(bits)(x) is x


def test_uncalibrated_forward_raises() -> None:
    with pytest.raises(RuntimeError, match="not calibrated"):
        UniformQuantizer(4)(torch.randn(3))
    with pytest.raises(RuntimeError, match="not calibrated"):
        LogQuantizer(4)(torch.rand(3))


def test_ste_gradient_wrt_scale() -> None:
    # 3 bits: codes 0..7, s = 0.5, z = 2; one scale per element so each gradient is separate.
    x = torch.tensor([-2.0, -0.4, 0.1, 0.7, 1.3, 5.0])
    q = _asym(3, 0.5, 2.0, shape=(6,))
    q.scale.requires_grad_(True)
    x_hat = q(x)
    # x/s = -4, -0.8, 0.2, 1.4, 2.6, 10 -> codes (clamped) 0, 1, 2, 3, 5, 7
    assert torch.allclose(x_hat, torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.5, 2.5]))
    x_hat.sum().backward()
    # inside: round(x/s) - x/s; low clip: qmin - z = -2; high clip: qmax - z = 5
    expected = torch.tensor([-2.0, -1 + 0.8, 0 - 0.2, 1 - 1.4, 3 - 2.6, 5.0])
    assert torch.allclose(q.scale.grad, expected, atol=1e-6)


def test_scale_frozen_by_default() -> None:
    assert not UniformQuantizer(4).scale.requires_grad


def test_qdrop_probabilities() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000)
    q = _asym(2, 0.5, 1.0)
    x_hat = q(x)
    assert not torch.equal(x_hat, x)
    q.train()
    q.drop_prob = 0.0
    assert torch.equal(q(x), x)
    q.drop_prob = 1.0
    assert torch.equal(q(x), x_hat)
    q.drop_prob = 0.5
    mixed = q(x)
    from_q = (mixed == x_hat) & (mixed != x)
    from_x = (mixed == x) & (mixed != x_hat)
    assert 0.35 < from_q.float().mean() < 0.65 and 0.35 < from_x.float().mean() < 0.65
    q.eval()  # QDrop is training-only
    assert torch.equal(q(x), x_hat)


def test_state_dict_round_trip_with_tokenwise_scale() -> None:
    src = UniformQuantizer(4, granularity="tensor")
    src.observe(torch.randn(2, 5, 8))
    src.init_from_minmax()
    # Token-wise expansion after calibration: one scale per token position.
    src.set_params(src.scale.detach().expand(1, 5, 1) * torch.linspace(0.5, 1.5, 5).view(1, 5, 1), src.zero_point)
    sd = src.state_dict()
    assert sd["scale"].shape == (1, 5, 1)

    dst = UniformQuantizer(4, granularity="tensor")
    assert not dst.is_calibrated
    dst.load_state_dict(sd)
    assert dst.is_calibrated
    assert dst.scale.shape == (1, 5, 1) and isinstance(dst.scale, torch.nn.Parameter)
    for k in ("scale", "zero_point", "min_val", "max_val"):
        assert torch.equal(getattr(dst, k), sd[k])
    x = torch.randn(3, 5, 8)
    assert torch.equal(dst(x), src(x))


def test_log2_quantizer_hand_values() -> None:
    q = LogQuantizer(3, base="2")  # codes 0..7, code 7 -> 0
    q.set_params(1.0)
    x = torch.tensor([1.0, 0.5, 0.3, 0.02, 0.01, 0.0, 2.0])
    # -log2(x) = 0, 1, 1.74, 5.64, 6.64, inf, -1 -> codes 0, 1, 2, 6, 7, 7, 0
    expected = torch.tensor([1.0, 0.5, 0.25, 2.0 ** -6, 0.0, 0.0, 1.0])
    out = q(x)
    assert torch.allclose(out, expected) and torch.isfinite(out).all()


def test_logsqrt2_quantizer_hand_values_and_minmax() -> None:
    q = LogQuantizer(3, base="sqrt2")
    q.observe(torch.tensor([0.1, 0.8]))
    q.init_from_minmax()
    assert torch.allclose(q.scale, torch.tensor([0.8]))
    x = torch.tensor([0.8, 0.24, 0.0])
    # -2*log2(x/0.8) = 0, 3.47 -> codes 0, 3 -> 0.8 * 2^(-1.5); 0 -> 0
    expected = torch.tensor([0.8, 0.8 * 2 ** -1.5, 0.0])
    assert torch.allclose(q(x), expected)


def test_log_quantizer_gradient_is_finite_at_zero() -> None:
    q = LogQuantizer(4)
    q.set_params(1.0)
    x = torch.tensor([0.0, 0.3, 1.0], requires_grad=True)
    q(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_quant_linear_and_matmul_modes() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    ql = QuantLinear.from_float(lin, UniformQuantizer(2, granularity="channel", axis=0), UniformQuantizer(2))
    assert ql.weight is lin.weight and ql.bias is lin.bias
    x = torch.randn(3, 8)
    assert torch.equal(ql(x), lin(x))  # FLOAT by default
    set_mode(ql, QuantMode.OBSERVE)
    assert torch.equal(ql(x), lin(x))
    assert ql.w_quantizer.min_val.shape == (4, 1)
    ql.w_quantizer.init_from_minmax()
    ql.a_quantizer.init_from_minmax()
    set_mode(ql, "quant")
    expected = torch.nn.functional.linear(ql.a_quantizer(x), ql.w_quantizer(lin.weight), lin.bias)
    assert torch.equal(ql(x), expected) and not torch.allclose(ql(x), lin(x), atol=1e-3)

    mm = QuantMatMul(UniformQuantizer(4, granularity="head"), None)
    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 4, 5)
    mm.mode = QuantMode.OBSERVE
    assert torch.equal(mm(a, b), a @ b)
    mm.a_quantizer.init_from_minmax()
    mm.mode = QuantMode.QUANT
    assert torch.allclose(mm(a, b), mm.a_quantizer(a) @ b)
    assert mm.a_quantizer.scale.shape == (1, 3, 1, 1)


# ----------------------------------------------------------------------------- the quantizer interface
def _dequant(view, codes):
    """Dequantize integer codes from an IntegerView the way an exporter would."""
    if view.kind == "uniform":
        return (codes.float() - view.zero_point) * view.scale
    x = view.scale * torch.pow(2.0, -codes.float() / view.extra["k"])
    return torch.where(codes >= view.qmax, torch.zeros_like(x), x)


@pytest.mark.parametrize("make", [
    lambda: UniformQuantizer(4, granularity="channel", axis=0),
    lambda: UniformQuantizer(3, symmetric=True, granularity="tensor"),
    lambda: UniformQuantizer(6, granularity="token", axis=1),
    lambda: LogQuantizer(4, base="sqrt2", granularity="head", axis=1),
    lambda: LogQuantizer(3, base="2"),
])
def test_integer_view_and_codes_reproduce_the_fake_quantized_tensor(make):
    torch.manual_seed(0)
    q = make()
    x = torch.rand(2, 3, 5, 4) if isinstance(q, LogQuantizer) else torch.randn(6, 5, 4)
    if q.granularity == "channel":
        x = torch.randn(6, 8)
    q.observe(x)
    q.init_from_minmax()
    view, codes = q.integer_view(), q.codes(x)
    assert codes.dtype == torch.int32 and view.qmin <= int(codes.min()) and int(codes.max()) <= view.qmax
    assert torch.allclose(_dequant(view, codes), q(x), atol=1e-6)


def test_adaround_is_a_quantizer_through_the_interface():
    from vitq.quantizers import AdaRoundQuantizer

    w, base = per_channel_weight_grid(4)
    ada = base.learned_rounding(w)
    assert isinstance(ada, AdaRoundQuantizer) and list(ada.trainable_parameters()) == ["rounding"]
    assert ada.round_loss(2.0) is not None and base.round_loss(2.0) is None
    with torch.no_grad():
        ada.alpha.add_(torch.randn_like(ada.alpha))  # some learned rounding
    ada.freeze_()
    assert not ada.soft and not ada.alpha.requires_grad
    weight, plain = ada.fold_into(w)
    assert plain is base and torch.equal(base(weight), weight)  # the folded weight sits on the grid
    view = ada.integer_view()
    assert torch.allclose(_dequant(view, ada.codes(w)), weight, atol=1e-6)
    # inside the grid the input gets a straight-through gradient (merged low-rank compensation needs it)
    w2 = w.clone().requires_grad_(True)
    ada(w2).sum().backward()
    assert w2.grad is not None and w2.grad.abs().sum() > 0


def test_trainable_groups_projection_and_qdrop_switch():
    q = UniformQuantizer(4)
    q.set_params(torch.tensor([0.1]), torch.tensor([3.0]))
    assert list(q.trainable_parameters()) == ["scale"]
    with torch.no_grad():
        q.scale.fill_(-1.0)  # a bad optimiser step
    q.project_()
    assert q.scale.item() > 0
    lq = LogQuantizer(4)
    lq.set_params(torch.tensor([1.0]))
    assert lq.trainable_parameters() == {}  # see LogQuantizer.trainable_parameters: no useful gradient
    q.train()
    q.set_qdrop(0.0)  # keep probability 0: the input passes through unquantized
    x = torch.randn(100)
    assert torch.equal(q(x), x)
    q.freeze_()
    assert not q.training and q.drop_prob == 1.0 and not q.scale.requires_grad


@pytest.mark.parametrize("bits, base", [(3, "2"), (4, "sqrt2"), (8, "sqrt2")])
def test_log_softmax_choice_picks_its_base_by_bits(bits: int, base: str) -> None:
    # base sqrt2's 2^b - 1 nonzero codes reach 2^-(2^b - 2)/2 of the scale: 1/8 at 3 bits, too coarse
    model = tiny_vit()
    prepare(model, vitq.get_recipe("fimaq-diag+rot+log", w_bits=bits, a_bits=bits).quant_spec())
    grids = [m.a_quantizer for name, m in model.named_modules() if name.endswith("matmul2")]
    assert grids and all(isinstance(q, LogQuantizer) and q.base == base and q.bits == bits for q in grids)
    # the other matmul operands stay uniform
    assert all(isinstance(m.b_quantizer, UniformQuantizer) for name, m in model.named_modules()
               if name.endswith("matmul2"))
