"""The fast fake-quantization kernels against the reference path, the engine's NaN check and the cost model."""

import copy

import pytest
import torch

import vitq
from conftest import tiny_vit
from vitq.quantizers import AdaRoundQuantizer, LogQuantizer, UniformQuantizer
from vitq.quantizers import kernels
from vitq.quantizers.kernels import compiled_kernels, reference_kernels
from vitq.reconstruction import ReconConfig
from vitq.qmodules import QuantModule
from vitq.reconstruction.cost import SNAP_RATIO, estimate_reconstruction
from vitq.errors import VitqError


def calibrated(shape, symmetric=False, granularity="tensor", bits=3, offset=0.0):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 2 + offset
    q = UniformQuantizer(bits, symmetric=symmetric, granularity=granularity)
    q.observe(x * 0.6)  # a range narrower than the data: some values clip
    q.init_from_minmax()
    return q, x


def run(q, x, reference, seed=3):
    q = copy.deepcopy(q)
    q.scale.requires_grad_(True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with reference_kernels(reference):
        y = q(x)
        g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        (y * g).sum().backward()
    return y.detach(), x.grad, q.scale.grad


@pytest.mark.parametrize("symmetric, granularity, shape, keep", [
    (False, "tensor", (4, 9, 16), 1.0), (False, "tensor", (4, 9, 16), 0.5), (True, "tensor", (4, 9, 16), 0.5),
    (False, "token", (4, 9, 16), 0.5), (False, "head", (2, 3, 9, 8), 0.7)])
def test_fast_fake_quant_equals_the_reference(symmetric, granularity, shape, keep):
    q, x = calibrated(shape, symmetric, granularity, offset=0.3)
    q.train()
    q.set_qdrop(keep)
    y_ref, gx_ref, gs_ref = run(q, x, True)
    y_fast, gx_fast, gs_fast = run(q, x, False)
    assert torch.equal(y_fast, y_ref)  # same values, same QDrop draws
    assert torch.allclose(gx_fast, gx_ref, rtol=1e-6, atol=1e-7)
    assert gs_fast.shape == q.scale.shape
    assert torch.allclose(gs_fast, gs_ref, rtol=1e-4, atol=1e-5)
    # the gradient really is the STE: clipped elements that were kept get none
    if keep == 1.0:
        assert (gx_fast == 0).any() and (gx_fast != 0).any()


def test_fast_fake_quant_without_gradients_and_in_eval_equals_the_reference():
    q, x = calibrated((4, 9, 16), offset=-0.5)
    with torch.no_grad():
        a = q(x)
        with reference_kernels():
            b = q(x)
    assert torch.equal(a, b)
    assert not x.requires_grad and not a.requires_grad


def test_qdrop_select_of_other_quantizers_is_unchanged():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 9, 9)
    q = LogQuantizer(3, base="2")
    q.observe(x)
    q.init_from_minmax()
    q.train()
    q.set_qdrop(0.5)
    torch.manual_seed(5)
    a = q(x)
    torch.manual_seed(5)
    with reference_kernels():
        b = q(x)
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_reconstruction_is_the_same_on_both_kernel_paths():
    data = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    opts = dict(w_bits=3, a_bits=3, calib_size=16, calibration={"eq_n": 16}, progress=False, device="cpu",
                reconstruction={"optim_size": 32, "iters": 5, "rank": 2})
    outs = []
    for ref in (True, False):
        model = tiny_vit()
        with reference_kernels(ref):
            vitq.quantize(model, data, "fimaq", **opts)
            outs.append(model(data[:8]).detach())
    # gradients differ in the last bits only: after 5 Adam steps per block every logit agrees
    # to 1e-4 of the logits' size (a rounding variable near its decision boundary may still flip)
    close = ((outs[0] - outs[1]).abs() <= 1e-4 * outs[0].abs().max()).float().mean()
    assert close == 1.0, float(close)


def test_a_nan_loss_is_caught_within_log_every_iterations(monkeypatch):
    data = torch.randn(16, 3, 32, 32)
    from vitq.reconstruction import block as block_mod

    real = block_mod.lp_loss
    calls = {"n": 0}

    def poisoned(p, y, power=2.0):
        calls["n"] += 1
        return real(p, y, power) * (float("nan") if calls["n"] > 12 else 1.0)

    monkeypatch.setattr(block_mod, "lp_loss", poisoned)
    with pytest.raises(VitqError, match="NaN/Inf by iteration 15"):
        vitq.quantize(tiny_vit(), data, "qdrop", w_bits=4, a_bits=4, calib_size=8, calibration={"eq_n": 8},
                      progress=False, device="cpu", reconstruction={"optim_size": 16, "iters": 40, "log_every": 5})


@pytest.fixture
def one_thread():
    # the floors of a tiny model are a millisecond: with two OpenMP threads and another process on
    # a core, a barrier wait can stretch one 30x, so this test times with one thread
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_cost_estimate_covers_every_block_and_scales_with_iterations(one_thread):
    def cfg(iters: int) -> ReconConfig:  # eager kernels: the compiled path would compile for seconds here
        return ReconConfig(iters=iters, rank=2, optim_size=32, batch_size=8, compile_kernels="off")

    model = tiny_vit()
    images = torch.randn(32, 3, 32, 32)
    flags = [p.requires_grad for p in model.parameters()]
    short = estimate_reconstruction(model, images, cfg(100))
    assert set(short.per_block) == {"patch_embed", "blocks.0", "blocks.1", "head"}
    assert all(f["iteration_s"] > 0 for f in short.floors.values())
    assert short.floors["head"]["snapshot_s"] == 0 and short.floors["blocks.0"]["snapshot_s"] > 0
    assert [p.requires_grad for p in model.parameters()] == flags
    # the engine's iteration ratio is measured on the inner block with the largest floor ...
    assert short.ratio_block == max(("blocks.0", "blocks.1", "patch_embed"),
                                    key=lambda n: short.floors[n]["iteration_s"])
    assert short.iter_ratio > 1.0  # fake quantization, QDrop and the optimiser cost more than the float step
    assert short.snap_ratio > 1.0  # a snapshot also runs the quantized block, which its floor does not
    assert not any(isinstance(m, QuantModule) for m in model.modules())  # ... on a copy
    long = estimate_reconstruction(model, images, cfg(1000), iter_ratio=short.iter_ratio)
    assert long.seconds > 3 * short.seconds  # iterations dominate; floors are timed anew, so not exactly 10x
    assert "about" in long.describe()
    # ... or given, and then the estimate is the formula itself
    given = estimate_reconstruction(model, images, cfg(100), iter_ratio=2.5)
    assert given.ratio_block is None and given.iter_ratio == 2.5
    expected = sum(100 * 2.5 * f["iteration_s"] + 2 * SNAP_RATIO * f["snapshot_s"] for f in given.floors.values())
    assert given.seconds == pytest.approx(expected, rel=1e-12)


def test_fast_fake_quant_scale_gradient_alone_equals_the_reference():
    # the block's first quantizer sees an input that needs no gradient: only the scale's factor is built
    q, x = calibrated((4, 9, 16), offset=0.3)
    q.train()
    q.set_qdrop(0.5)
    grads = []
    for ref in (True, False):
        qc = copy.deepcopy(q)
        qc.scale.requires_grad_(True)
        torch.manual_seed(3)
        with reference_kernels(ref):
            (qc(x) * torch.linspace(-1, 1, x.numel()).reshape(x.shape)).sum().backward()
        grads.append(qc.scale.grad)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-5) and grads[0].abs().item() > 0


def adaround_run(reference, compiled=False, weight_grad=False, beta=7.3):
    """(soft weight, alpha gradient, weight gradient, regulariser) of AdaRound on one path."""
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    base = UniformQuantizer(3, granularity="channel")
    base.observe(w * 0.7)  # some weights clip
    base.init_from_minmax()
    q = AdaRoundQuantizer(base, w)
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha) * 2)  # offsets away from their start, some saturated
    w = w.clone().requires_grad_(weight_grad)
    with reference_kernels(reference), compiled_kernels(compiled):
        y = q(w)
        loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + 0.3 * q.round_loss(beta)
        loss.backward()
        reg = q.round_loss(beta).detach()
    return y.detach(), q.alpha.grad, w.grad, reg


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fast_adaround_equals_the_reference(weight_grad):
    ref, fast = adaround_run(True, weight_grad=weight_grad), adaround_run(False, weight_grad=weight_grad)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[3], ref[3])
    assert torch.allclose(fast[1], ref[1], rtol=1e-5, atol=1e-6)
    assert (ref[1] == 0).any() and (ref[1] != 0).any()  # clipped / saturated offsets get no gradient
    if weight_grad:  # the straight-through path to a weight that is itself learned (merged LRC)
        assert torch.equal(fast[2], ref[2]) and (ref[2] == 0).any() and (ref[2] == 1).all() == False  # noqa: E712
    else:
        assert fast[2] is None


def test_compiled_kernels_give_the_eager_values_and_gradients():
    q, x = calibrated((4, 9, 16), offset=0.3, granularity="token")
    q.train()
    q.set_qdrop(0.5)
    eager = run(q, x, False)
    with compiled_kernels():
        compiled = run(q, x, False)
        assert kernels.compile_status() == "compiled"
    assert torch.equal(compiled[0], eager[0])  # same QDrop draws (eager), same values
    assert torch.allclose(compiled[1], eager[1], rtol=1e-6, atol=1e-7)
    assert torch.allclose(compiled[2], eager[2], rtol=1e-4, atol=1e-5)
    ada_eager, ada_compiled = adaround_run(False), adaround_run(False, compiled=True)
    assert torch.equal(ada_compiled[0], ada_eager[0])
    assert torch.allclose(ada_compiled[1], ada_eager[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(ada_compiled[3], ada_eager[3], rtol=1e-6)


def forget_compilations(monkeypatch) -> None:
    """Every fused kernel compiles afresh (and no earlier failure is remembered) within the test."""
    monkeypatch.setattr(kernels, "_COMPILE_FAILED", None)
    for fused in vars(kernels).values():
        if isinstance(fused, kernels._Fused):
            monkeypatch.setattr(fused, "compiled", None)


def test_a_failing_compiler_warns_once_and_runs_eagerly(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return call

    forget_compilations(monkeypatch)
    monkeypatch.setattr(torch, "compile", broken)
    q, x = calibrated((4, 9, 16), offset=0.3)
    q.train()
    q.set_qdrop(0.5)
    eager = run(q, x, False)
    with compiled_kernels(), pytest.warns(RuntimeWarning, match=r"No working C\+\+ compiler found\); running them eagerly") as rec:
        fallback = run(q, x, False)
        again = run(q, x, False)
    assert len(rec) == 1
    assert kernels.compile_status().startswith("eager (torch.compile failed: InvalidCxxCompiler")
    for a, b, c in zip(eager, fallback, again):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_run_summary_says_how_the_kernels_ran(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    data = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    opts = dict(w_bits=4, a_bits=4, calib_size=8, calibration={"eq_n": 8}, progress=False, device="cpu")
    eager = vitq.quantize_with_summary(tiny_vit(), data, "qdrop", reconstruction={
        "optim_size": 16, "iters": 2, "compile_kernels": "off"}, **opts)
    assert {b["kernels"] for b in eager.reconstruction["blocks"]} == {"eager"}
    forget_compilations(monkeypatch)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="running them eagerly"):
        failed = vitq.quantize_with_summary(tiny_vit(), data, "qdrop", reconstruction={
            "optim_size": 16, "iters": 2, "compile_kernels": "on"}, **opts)
    assert all(b["kernels"].startswith("eager (torch.compile failed: InvalidCxxCompiler")
               for b in failed.reconstruction["blocks"])


@pytest.mark.parametrize("keep", [0.0, 0.25, 0.5, 0.9])
def test_qdrop_coins_keep_the_asked_share(keep):
    x = torch.empty(64, 65, 48)
    torch.manual_seed(0)
    m = kernels.keep_mask(x, keep)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    # 199,680 coins: the binomial standard deviation of the share is at most 0.0012
    assert abs(m.mean().item() - keep) < 0.005
    torch.manual_seed(1)
    assert keep == 0.0 or not torch.equal(m, kernels.keep_mask(x, keep))


def test_qdrop_coins_use_every_bit_and_keep_everything_at_one():
    torch.manual_seed(0)
    draws = kernels.random_int16_like(torch.empty(4096, 64))
    bits = torch.stack([(draws.to(torch.int32) >> b) & 1 for b in range(16)])
    share = bits.float().mean(dim=(1, 2))
    assert (share - 0.5).abs().max() < 0.01, share  # random_() alone leaves every fourth sign bit 0
    assert kernels.qdrop_keep(torch.empty(3, 4), 1.0) is None
    assert kernels.qdrop_keep(torch.empty(3, 4), 1.0 - 1e-6) is None  # rounds to 1 at 16 bits
    torch.manual_seed(0)
    keep = kernels.qdrop_keep(torch.empty(3, 4), 0.5)
    torch.manual_seed(0)
    assert keep.dtype == torch.uint8 and torch.equal(keep.bool(), kernels.random_int16_like(torch.empty(3, 4)) < 0)


def test_float_draws_give_the_stream_of_older_runs():
    x = torch.randn(8, 17, 24)
    torch.manual_seed(5)
    old = (torch.rand_like(x) < 0.5).to(x.dtype)
    torch.manual_seed(5)
    with kernels.float_draws():
        assert torch.equal(kernels.keep_mask(x, 0.5), old)
    torch.manual_seed(5)
    assert not torch.equal(kernels.keep_mask(x, 0.5), old)


def test_input_qdrop_mask_keeps_the_asked_share_from_its_generator():
    shape = (32, 65, 48)
    m = kernels.keep_where(shape, 0.5, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == shape
    assert abs(m.float().mean().item() - 0.5) < 0.005
    assert torch.equal(m, kernels.keep_where(shape, 0.5, torch.Generator().manual_seed(0)))
    assert kernels.keep_where(shape, 1.0, torch.Generator()).all()
    assert not kernels.keep_where(shape, 0.0, torch.Generator()).any()
    with kernels.float_draws():  # the older stream
        old = kernels.keep_where(shape, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(old, torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5)


def test_broadcasts_into_agrees_with_torch():
    """The in-place fast path's shape check answers what torch.broadcast_shapes would."""
    target = torch.Size([4, 3, 5])
    for shape in [(), (1,), (5,), (3, 1), (3, 5), (4, 1, 1), (4, 3, 5), (1, 4, 3, 5), (2, 1, 1), (3,), (7, 5)]:
        try:
            fits = torch.broadcast_shapes(target, shape) == target
        except RuntimeError:
            fits = False
        assert kernels._broadcasts_into(torch.Size(shape), target) == fits, shape
