"""Calibration recipes, the RepQ-ViT fold, the API and quantized-model files, on tiny models."""

import copy

import pytest
import torch

import conftest
import vitq
from vitq.adapters import QuantSpec, prepare
from vitq.calibration import _grid, fake_quant, reparam_layernorm
from vitq.errors import VitqError
from vitq.qmodules import QuantMode, set_mode


def tiny_vit(seed=0):
    m = conftest.tiny_vit(seed)
    m.pretrained_cfg.update({"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 32, 32)})
    # non-trivial LayerNorm affines, so the fold has something to move
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.data = 1 + 0.3 * torch.randn_like(mod.weight)
            mod.bias.data = 0.2 * torch.randn_like(mod.bias)
    return m


tiny_swin = conftest.tiny_swin


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(32, 3, 32, 32)


def test_reparam_fold_preserves_float_output(images):
    fp = tiny_vit()
    model = copy.deepcopy(fp)
    prepare(model, QuantSpec(w_bits=4, a_bits=4))
    ref = fp(images)
    for blk in model.blocks:
        for norm, lin in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
            s_c = torch.rand(48) * 0.1 + 0.01
            z_c = torch.randint(0, 16, (48,)).float()
            reparam_layernorm(norm, lin, s_c, z_c)
    set_mode(model, QuantMode.FLOAT)
    assert (model(images) - ref).abs().max().item() < 1e-5


def test_fold_turns_per_channel_into_per_tensor_quantization():
    norm = torch.nn.LayerNorm(16)
    norm.weight.data, norm.bias.data = torch.rand(16) + 0.5, torch.randn(16)
    lin = torch.nn.Linear(16, 8)
    from vitq.qmodules import QuantLinear
    qlin = QuantLinear.from_float(lin, None, None)
    x = norm(torch.randn(64, 16))
    s_c, z_c = torch.rand(16) * 0.05 + 0.01, torch.randint(2, 14, (16,)).float()
    per_channel = fake_quant(x, s_c, z_c, 15)
    s, z, r, b = reparam_layernorm(norm, qlin, s_c, z_c)
    x_new = norm(torch.randn(1, 16)) * 0 + (x / r - b)  # what the folded LN now emits for the same input
    per_tensor = fake_quant(x_new, s, z, 15)
    # the linear sees the same values: W' x'_q == W x_q
    assert torch.allclose(per_tensor * r + r * b, per_channel, atol=1e-5)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "repq"])
def test_every_recipe_is_close_to_float_at_8_bits(method, images):
    fp = tiny_vit()
    q = vitq.quantize(copy.deepcopy(fp), images, method, w_bits=8, a_bits=8, calib_size=32, progress=False,
                      device="cpu")
    assert rel_err(q(images), fp(images)) < 0.06


def test_mse_search_beats_minmax_at_4_bits(images):
    fp = tiny_vit()
    ref = fp(images)
    errs = {}
    for method in ("minmax", "mse"):
        q = vitq.quantize(copy.deepcopy(fp), images, method, w_bits=4, a_bits=4, calib_size=32, progress=False,
                          device="cpu")
        errs[method] = rel_err(q(images), ref)
    assert errs["mse"] < 0.9 * errs["minmax"], errs


def test_lower_bits_are_worse(images):
    fp = tiny_vit()
    ref = fp(images)
    e = [rel_err(vitq.quantize(copy.deepcopy(fp), images, "mse", w_bits=b, a_bits=b, calib_size=32, progress=False,
                               device="cpu", calibration={"eq_n": 32})(images), ref) for b in (8, 4, 3)]
    assert e[0] < e[1] < e[2]


def test_six_bit_zero_points_follow_the_data():
    # a post-GELU-like range [-0.17, 4]: the zero point must sit near 3, outside the official 24..39 window
    lo, hi = torch.tensor([-0.17]), torch.tensor([4.0])
    scales, zps = _grid(lo * 0.5, hi * 0.5, lo, hi, bits=6, eq_n=128)
    assert zps.min() < 24
    err = torch.stack([(fake_quant(torch.tensor([-0.17, 0.0, 4.0]), scales[0, c], zps[0, c], 63)
                        - torch.tensor([-0.17, 0.0, 4.0])).abs().max() for c in range(scales.shape[1])])
    assert err.min() < 0.05


def test_token_wise_scales_and_save_load_round_trip(images, tmp_path):
    fp = tiny_vit()
    q = vitq.quantize(copy.deepcopy(fp), images, "mse", w_bits=4, a_bits=4, calib_size=16, progress=False,
                      device="cpu", calibration={"eq_n": 16})
    assert tuple(q.blocks[0].attn.qkv.a_quantizer.scale.shape) == (1, 17, 1)      # per token
    assert tuple(q.blocks[0].attn.matmul1.a_quantizer.scale.shape) == (1, 3, 17, 1)  # per head and query
    assert tuple(q.blocks[0].attn.matmul2.b_quantizer.scale.shape) == (1, 3, 1, 16)  # per head-dim channel
    out = q(images)
    vitq.save_quantized(q, tmp_path / "m")
    again = vitq.load_model(str(tmp_path / "m"))
    assert torch.equal(again(images), out)
    assert vitq.recipe_of(again).name == "mse"


def test_swin_and_fold_of_bias_free_reduction(tmp_path):
    fp = tiny_swin()
    x = torch.randn(8, 3, 32, 32)
    q = vitq.quantize(copy.deepcopy(fp), x, "mse", w_bits=8, a_bits=8, calib_size=8, progress=False, device="cpu",
                      calibration={"eq_n": 16})
    assert "layers.1.downsample.reduction" in q.vitq_config["folded_layers"]
    assert rel_err(q(x), fp(x)) < 0.1
    out = q(x)
    vitq.save_quantized(q, tmp_path / "swin", architecture={"timm_name": "swin_tiny_patch4_window7_224",
                                                            "arch_kwargs": conftest.TINY_SWIN})
    assert torch.equal(vitq.load_quantized(tmp_path / "swin")(x), out)


def test_nan_activations_are_a_clear_error():
    fp = tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    fp.blocks[0].norm1.weight.data[0] = float("nan")
    with pytest.raises(VitqError, match="NaN/Inf"):
        vitq.quantize(fp, x, "minmax", calib_size=4, progress=False, device="cpu")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(recipe="nope"), "unknown recipe"),
    (dict(w_bits=1), "between 2 and 8"),
    (dict(a_bits=9), "between 2 and 8"),
    (dict(calib_size=100), "holds only 4"),
])
def test_bad_arguments(kwargs, needle):
    recipe = kwargs.pop("recipe", "mse")
    with pytest.raises(VitqError, match=needle):
        vitq.quantize(tiny_vit(), torch.randn(4, 3, 32, 32), recipe, progress=False, device="cpu", **kwargs)


def test_calibration_is_deterministic(images):
    fp = tiny_vit()
    kw = dict(calib_size=16, seed=3, progress=False, device="cpu", calibration={"eq_n": 16})
    a = vitq.quantize(copy.deepcopy(fp), images, "mse", **kw)
    b = vitq.quantize(copy.deepcopy(fp), images, "mse", **kw)
    assert torch.equal(a(images), b(images))


def test_mse_search_stops_at_a_fixed_point(images, monkeypatch):
    """A coordinate-descent round that moves nothing ends the search: with the search converged,
    8 and 30 allowed rounds give the same parameters for the same number of candidate sweeps
    (without the stop, 30 rounds would score almost four times as many)."""
    import vitq.calibration.mse_search as mse_search

    calls: list[int] = []
    real = mse_search.split_candidates
    monkeypatch.setattr(mse_search, "split_candidates", lambda n, score: calls.append(n) or real(n, score))
    fp = tiny_vit()
    outs, counts = [], []
    for rounds in (8, 30):
        calls.clear()
        m = vitq.quantize(copy.deepcopy(fp), images, "mse", calib_size=16, seed=3, progress=False, device="cpu",
                          calibration={"eq_n": 16, "search_rounds": rounds})
        outs.append(m(images))
        counts.append(len(calls))
    assert torch.equal(outs[0], outs[1])
    assert counts[0] == counts[1]
    calls.clear()
    vitq.quantize(copy.deepcopy(fp), images, "mse", calib_size=16, seed=3, progress=False, device="cpu",
                  calibration={"eq_n": 16, "search_rounds": 0})
    assert counts[0] > len(calls)  # and it did run rounds beyond the first sweeps


def test_compiled_mse_search_picks_what_the_eager_one_picks(images):
    """The search's fused kernels through torch.compile: the same grids chosen (the sums run in
    another order, so only a near tie could differ; this tiny model has none)."""
    fp = tiny_vit()
    kw = dict(calib_size=32, seed=3, progress=False, device="cpu", calibration={"eq_n": 16})
    runs = {}
    for setting in ("off", "on"):
        r = vitq.quantize_with_summary(copy.deepcopy(fp), images, "mse",
                                       **{**kw, "calibration": {**kw["calibration"], "compile_kernels": setting}})
        runs[setting] = (r.calibration["kernels"], dict(r.model.state_dict()), r.model(images))
    assert runs["off"][0] == "eager" and runs["on"][0] == "compiled"
    for key, value in runs["off"][1].items():
        assert torch.equal(value, runs["on"][1][key]), key
    assert torch.equal(runs["off"][2], runs["on"][2])
    # auto compiles only a search long enough to repay the compilation
    from vitq.calibration import CalibConfig
    assert not CalibConfig().compiles(128) and CalibConfig().compiles(512)
    assert not CalibConfig(method="repq").compiles(512) and not CalibConfig(compile_kernels="off").compiles(512)
    with pytest.raises(VitqError, match="compile_kernels must be one of"):
        CalibConfig(compile_kernels="yes")


@pytest.mark.parametrize("fine_grid,centred", [(0, False), (16, False), (0, True)])
def test_linear_mse_search_ends_where_neither_quantizer_can_improve_alone(monkeypatch, fine_grid, centred):
    """The coordinate descent stops once a step repeats its own last choice: there the weight rows
    are the best candidates for the chosen input grid and the input grid the best for the chosen
    weights, each checked here against every coarse candidate on the layer-output error (a refined
    choice can only beat them). The data is such that the one-level descent takes two rounds, so a
    search that stopped a step early would show. With bias correction (``centred``) the error is the
    one left after each output's mean error is added back, computed here the plain way."""
    from vitq.calibration import mse_search
    from vitq.calibration.config import CalibConfig
    from vitq.qmodules import QuantLinear
    from vitq.quantizers import UniformQuantizer

    bits, qmax = 4, 15
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(24, 32)
    with torch.no_grad():
        lin.weight.normal_(generator=g)
    x = torch.randn(300, 24, generator=g) * torch.linspace(0.2, 3.0, 24)  # channels of different ranges
    x[:, 3] += 4.0  # a skewed channel
    x[::17, 5] *= 8  # and a few outliers
    steps = []
    real = mse_search._activation_output_scorer
    monkeypatch.setattr(mse_search, "_activation_output_scorer", lambda *a: steps.append(1) or real(*a))
    ql = QuantLinear.from_float(lin, UniformQuantizer(bits, granularity="channel", axis=0), UniformQuantizer(bits))
    cfg = CalibConfig(eq_n=32, search_rounds=50, max_search_tokens=None, fine_grid=fine_grid,
                      bias_correction=centred)
    mse_search.search_linear_mse(ql, x, cfg, torch.Generator().manual_seed(1))
    # activation steps: the last repeats the one before, which ends the search
    assert len(steps) == 2 if (fine_grid, centred) == (0, False) else 1 <= len(steps) < 50
    ql.eval()

    def sq_err(out: torch.Tensor) -> torch.Tensor:  # per output, over the rows
        diff = ref - out
        return (diff - diff.mean(0) if centred else diff).pow(2).sum(0)

    with torch.no_grad():
        w = lin.weight.detach()
        w_hat, x_hat, ref = ql.w_quantizer(w), ql.a_quantizer(x), x @ w.t()
        chosen = sq_err(x_hat @ w_hat.t())
        a_s, a_z = mse_search._tensor_candidates(x, bits, cfg.eq_n)
        act = torch.stack([sq_err(fake_quant(x, a_s[c], a_z[c], qmax) @ w_hat.t()).sum() for c in range(len(a_s))])
        assert chosen.sum() <= act.min() * (1 + 1e-5)
        w_s, w_z = mse_search._row_candidates(w, bits, cfg.eq_n)
        rows = torch.stack([sq_err(x_hat @ fake_quant(w, w_s[:, c:c + 1], w_z[:, c:c + 1], qmax).t())
                            for c in range(w_s.shape[1])])  # (candidates, rows)
        assert torch.all(chosen <= rows.min(0).values * (1 + 1e-5))
        if centred:  # the plain objective would have chosen otherwise: the centring is not a no-op
            plain = torch.stack([(ref - x_hat @ fake_quant(w, w_s[:, c:c + 1], w_z[:, c:c + 1], qmax).t()).pow(2).sum(0)
                                 for c in range(w_s.shape[1])])
            assert not torch.equal(plain.argmin(0), rows.argmin(0))


def test_centred_scorers_equal_the_plain_error_after_bias_correction():
    """The search's scorers with ``centred``: differences between candidates equal those of the plain
    formula ``||(Y - Y_hat) - mean_rows(Y - Y_hat)||^2`` (the scorers drop candidate-independent terms)."""
    from vitq.calibration import mse_search

    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.gelu(torch.randn(500, 12, generator=g) * 2)
    qmax = 15
    for out_features in (8, 20):  # through the (in x in) Gram matrix and directly
        w = torch.randn(out_features, 12, generator=g)
        w_hat = fake_quant(w, torch.full((out_features, 1), 0.3), torch.full((out_features, 1), 8.0), qmax)
        score = mse_search._activation_output_scorer(x, w, w_hat, qmax, centred=True)
        cands = [(0.05 + 0.04 * i, float(z)) for i in range(6) for z in (0, 1, 3)]
        got = torch.stack([score(torch.tensor(s), torch.tensor(z)) for s, z in cands]).double()

        def plain(s, z):
            diff = (x @ w.t() - fake_quant(x, torch.tensor(s), torch.tensor(z), qmax) @ w_hat.t()).double()
            return (diff - diff.mean(0)).pow(2).sum()

        ref = torch.stack([plain(s, z) for s, z in cands])
        assert ((got - got[0]) - (ref - ref[0])).abs().max() <= 1e-5 * ref.max()
        assert (ref - ref[0]).abs().max() > 1e-2 * ref.max()  # the candidates do differ
    x_hat = fake_quant(x, torch.tensor(0.2), torch.tensor(1.0), qmax)
    w = torch.randn(6, 12, generator=g)
    rows = mse_search._row_output_scorer(x, x_hat, w, qmax, centred=True)
    s_rows = [torch.full((6,), 0.1 + 0.05 * i) for i in range(5)]
    z_rows = torch.full((6,), 7.0)
    got = torch.stack([rows(s, z_rows) for s in s_rows]).double()  # (candidates, rows)

    def plain_rows(s):
        diff = (x @ w.t() - x_hat @ fake_quant(w, s[:, None], z_rows[:, None], qmax).t()).double()
        return (diff - diff.mean(0)).pow(2).sum(0)

    ref = torch.stack([plain_rows(s) for s in s_rows])
    assert ((got - got[0]) - (ref - ref[0])).abs().max() <= 1e-5 * ref.max()
    assert (ref - ref[0]).abs().max() > 1e-2 * ref.max()


def test_search_workspaces_give_the_same_scores_bit_for_bit_and_stay_one_buffer():
    """The eager search kernels write each candidate into one buffer (glibc's heap fragmented under
    a fresh input-sized tensor per candidate): the scores are exactly those of fresh tensors, and the
    buffer is the one every candidate reuses."""
    from vitq.calibration import mse_search
    from vitq.quantizers import kernels

    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.gelu(torch.randn(300, 12, generator=g) * 2)
    qmax = 7
    buf = kernels.workspace_for(x)
    assert buf is not None and buf.shape == x.shape  # eager here: the compiled kernels need none
    with kernels.compiled_kernels():
        assert kernels.workspace_for(x) is None
    cands = [(torch.tensor(0.05 + 0.03 * i), torch.tensor(float(z))) for i in range(5) for z in (0, 2)]
    for s, z in cands:
        fresh = ((kernels.fake_quant_values(x, s, z, 0, qmax) - x) ** 2).sum()
        got = kernels.quant_sq_error(x, s, z, 0, qmax, out=buf)
        assert torch.equal(got, fresh)
        assert torch.equal(kernels.quant_error(x, s, z, 0, qmax, out=buf), kernels.quant_error(x, s, z, 0, qmax))
        assert kernels.quant_error(x, s, z, 0, qmax, out=buf).data_ptr() == buf.data_ptr()
    # a buffer that does not fit (another shape or dtype) is not used: a new tensor, the same numbers
    wrong = torch.empty(5, 12)
    assert torch.equal(kernels.quant_error(x, *cands[3], 0, qmax, out=wrong), kernels.quant_error(x, *cands[3], 0, qmax))
    for out_features in (8, 20):  # through the (in x in) Gram matrix and directly
        w = torch.randn(out_features, 12, generator=g)
        w_hat = fake_quant(w, torch.full((out_features, 1), 0.3), torch.full((out_features, 1), 4.0), qmax)
        score = mse_search._activation_output_scorer(x, w, w_hat, qmax)
        r = x @ (w - w_hat).t()
        for s, z in cands:
            e = kernels.quant_error(x, s, z, 0, qmax)
            if out_features >= 12:
                gram, rw = w_hat.t() @ w_hat, r @ w_hat
                fresh = ((e @ gram) * e).sum() - 2 * (rw * e).sum()
            else:
                fresh = (r - e @ w_hat.t()).pow(2).sum()
            assert torch.equal(score(s, z), fresh)


def test_bias_correction_cancels_each_layers_mean_output_error(images, tmp_path):
    """With ``bias_correction`` every quantized Linear's output error on its calibration inputs has mean
    ~0 per output (without it: not); the float model is untouched; the model saves and reloads, packs
    and exports with the correction in it."""
    from vitq.qmodules import QuantLinear

    fp = tiny_vit()
    q = vitq.quantize(copy.deepcopy(fp), images, "mse", w_bits=3, a_bits=3, calib_size=32, progress=False,
                      device="cpu", calibration={"eq_n": 16, "bias_correction": True})
    linears = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear) and m.w_quantizer is not None}
    assert linears and all(m.bias_correction is not None for m in linears.values())
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, i, n=n: inputs.setdefault(n, i[0].detach()))
             for n, m in linears.items()]
    set_mode(q, QuantMode.FLOAT)
    with torch.no_grad():
        # the float model keeps its own biases (up to the RepQ fold's float rounding)
        assert (q(images) - fp(images)).abs().max() < 1e-5
    for h in hooks:
        h.remove()
    set_mode(q, QuantMode.QUANT)
    mean_err = {}
    with torch.no_grad():
        for n, m in linears.items():
            x = inputs[n]
            m.mode = QuantMode.FLOAT
            ref = m(x)
            m.mode = QuantMode.QUANT
            corrected = (ref - m(x)).reshape(-1, ref.shape[-1]).mean(0)
            saved, m.bias_correction = m.bias_correction, None
            uncorrected = (ref - m(x)).reshape(-1, ref.shape[-1]).mean(0)
            m.bias_correction = saved
            mean_err[n] = (corrected.abs().max().item(), uncorrected.abs().max().item())
    assert all(c < 1e-5 * (1 + u) for c, u in mean_err.values()), mean_err
    assert max(u for _, u in mean_err.values()) > 1e-2, mean_err
    with torch.no_grad():
        out = q(images)
    vitq.save_quantized(q, tmp_path / "m")
    again = vitq.load_model(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(again(images), out)
    packed = vitq.export(q, tmp_path / "packed", format="packed")
    with torch.no_grad():
        assert (vitq.load_model(str(packed))(images) - out).abs().max() <= 1e-5


def test_refined_search_lands_near_the_same_scale_whatever_the_coarse_grid():
    """With one level, which of the 8 (4-bit) scales wins depends on where the grid's points fall, so
    grids of 112 and 144 candidates pick scales a sizeable part of a grid step apart; the second, finer
    grid around each winner lands both within a small part of a step of each other, and never scores
    worse than the coarse winner."""
    from vitq.calibration import mse_search

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(4096, 64, generator=g) * 1.5)  # skewed, like an fc2 input
    bits, qmax = 4, 15
    chosen = {}
    for refine in (0, 16):
        for eq_n in (112, 144):
            s, z = mse_search._tensor_candidates(x, bits, eq_n)
            chosen[refine, eq_n] = mse_search._best_tensor_self(x, s, z, qmax, bits, (refine, 1))
    step = (x.amax() - x.amin()) / qmax / 7  # the coarse grids' scale step (7 or 9 scales over the range)
    gap = {r: (chosen[r, 112][0] - chosen[r, 144][0]).abs().item() for r in (0, 16)}
    assert gap[0] > 0.25 * step.item()  # the one-level choice moves with the grid ...
    assert gap[16] < 0.1 * step.item()  # ... the refined one hardly
    for eq_n in (112, 144):
        err = {r: (fake_quant(x, chosen[r, eq_n][0], chosen[r, eq_n][1], qmax) - x).pow(2).sum() for r in (0, 16)}
        assert err[16] <= err[0]


def test_fine_grid_is_checked():
    from vitq.calibration import CalibConfig
    with pytest.raises(VitqError, match="fine_grid must be 0"):
        CalibConfig(fine_grid=1)


def test_refined_grid_spans_the_asked_coarse_scales_and_keeps_the_winner():
    from vitq.calibration import mse_search

    lo, hi = torch.tensor([-1.0, 0.0]), torch.tensor([3.0, 5.0])
    scales, zps = mse_search._grid(lo * 0.3, hi * 0.3, lo, hi, bits=4, eq_n=128)  # 8 scales x 16 zero points
    coarse = scales.reshape(2, 8, 16)[..., 0]
    best = torch.tensor([3 * 16 + 4, 0 * 16 + 0])  # row 0: scale 3, zp 4; row 1: the narrowest scale, zp 0
    for span in (1, 2):
        fs, fz = mse_search._refined(scales, zps, best, bits=4, n_fine=9, span=span)
        assert torch.allclose(fs[0, :-1].min(), coarse[0, 3 - span]) and torch.allclose(fs[0, :-1].max(), coarse[0, 3 + span])
        assert torch.allclose(fs[1, :-1].min(), coarse[1, 0]) and torch.allclose(fs[1, :-1].max(), coarse[1, span])
        assert torch.equal(fs[:, -1], scales[[0, 1], best]) and torch.equal(fz[:, -1], zps[[0, 1], best])
        assert fz.min() >= 0 and fz.max() <= 15 and torch.equal(fz, fz.round())
        # the zero points keep the winner's lower clip within +- 2 codes
        clip = (zps[0, best[0]] * scales[0, best[0]])
        assert ((fz[0, :-1] * fs[0, :-1] - clip).abs() <= 2.5 * fs[0, :-1]).all()
