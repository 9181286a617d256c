"""Block reconstruction: snapshot schedule and gradients, AdaRound, the engine, resume and determinism.

(The losses themselves are checked against the official formulas in test_losses.py.)
"""

import collections
import copy
import json
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitq
import vitq.reconstruction.engine as engine
from conftest import per_channel_weight_grid, tiny_swin, tiny_vit
from vitq.qmodules import QuantMode, set_mode
from vitq.quantizers import AdaRoundQuantizer, LogQuantizer, UniformQuantizer
from vitq.reconstruction import ReconConfig, snapshot_iterations

# ----------------------------------------------------------------------------- schedule and AdaRound
@pytest.mark.parametrize("iters, k", [(20000, 5), (20000, 15), (20000, 3), (500, 7), (10, 15)])
def test_snapshot_schedule_takes_exactly_k(iters, k):
    its = snapshot_iterations(iters, k, "q")
    assert len(its) == min(k, iters) and its[0] == 0 and max(its) < iters
    assert snapshot_iterations(iters, k, "qf") == list(range(min(k, iters)))


def test_adaround_starts_at_the_float_weight_and_hardens_to_the_grid():
    w, base = per_channel_weight_grid(4)
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
tiny_model = tiny_vit


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    return torch.randn(48, 3, 32, 32)


CALIB_QUICK = dict(w_bits=3, a_bits=3, calib_size=16, calibration={"eq_n": 16}, progress=False, device="cpu")
RECON_QUICK = {"optim_size": 48, "iters": 40, "rank": 3}
QUICK = {**CALIB_QUICK, "reconstruction": RECON_QUICK}


def quick(**recon):
    """QUICK with some reconstruction settings changed."""
    return {**CALIB_QUICK, "reconstruction": {**RECON_QUICK, **recon}}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_reconstruction_improves_on_calibration(data):
    fp = tiny_model()
    ref = fp(data)
    calib_only = vitq.quantize(copy.deepcopy(fp), data, "mse", **CALIB_QUICK)
    fimaq = vitq.quantize_with_summary(copy.deepcopy(fp), data, "fimaq", **quick(iters=150))
    assert rel_err(fimaq.model(data), ref) < rel_err(calib_only(data), ref)
    # the per-block report: output error before and after, and the loss curve every log_every iterations
    blocks = fimaq.reconstruction["blocks"]
    assert blocks[1]["output_mse_fp_input"] < blocks[1]["output_mse_calibrated"]
    history = blocks[1]["history"]
    assert history["iteration"] == list(range(0, 150, 10)) + [149] and len(history["rec"]) == 16


def test_first_block_iters_gives_only_the_first_transformer_block_its_own_budget(data):
    from vitq.reconstruction import checkpoint

    result = vitq.quantize_with_summary(tiny_model(), data, "fimaq", **quick(iters=20, first_block_iters=50))
    blocks = result.reconstruction["blocks"]
    assert [b["block"] for b in blocks] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert [b["history"]["iteration"][-1] for b in blocks] == [19, 49, 19, 19]
    assert [b["snapshots"] for b in blocks] == [3, 3, 3, 0]  # k snapshots whatever the budget
    # the same budget as every other block is the same run as the default, bit for bit
    same = vitq.quantize(tiny_model(), data, "fimaq", **quick(iters=20, first_block_iters=20))
    default = vitq.quantize(tiny_model(), data, "fimaq", **quick(iters=20))
    assert torch.equal(same(data), default(data)) and not torch.equal(result.model(data), default(data))
    # old checkpoints keep their key; a set value enters it; nonsense is one line
    assert "first_block_iters" not in checkpoint.recon_settings(ReconConfig())
    assert checkpoint.recon_settings(ReconConfig(first_block_iters=7))["first_block_iters"] == 7
    with pytest.raises(vitq.VitqError, match="first_block_iters must be positive"):
        ReconConfig(first_block_iters=0)


@pytest.mark.parametrize("recipe", ["qdrop", "brecq", "fimaq-diag", "fimaq-lowrank", "fimaq-dplr-lowrank", "fimaq"])
def test_every_reconstruction_recipe_runs_and_stays_finite(recipe, data):
    result = vitq.quantize_with_summary(tiny_model(), data, recipe, **QUICK)
    assert torch.isfinite(result.model(data)).all()
    assert set(result.stages) == {"calibration", "reconstruction"}
    blocks = result.reconstruction["blocks"]
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
    real = engine.reconstruct_block
    calls = {"n": 0}

    def dies_on_third_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "reconstruct_block", dies_on_third_block)
    return lambda: monkeypatch.setattr(engine, "reconstruct_block", real)


def test_killed_run_resumes_to_the_same_result(data, tmp_path, monkeypatch):
    uninterrupted = vitq.quantize(tiny_model(), data, "fimaq", **QUICK)(data)
    undo = kill_on_third_block(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        vitq.quantize(tiny_model(), data, "fimaq", work_dir=tmp_path, **QUICK)
    saved = json.loads((tmp_path / "reconstruction.json").read_text())
    assert [b["block"] for b in saved["blocks"]] == ["patch_embed", "blocks.0"]
    undo()
    resumed = vitq.quantize_with_summary(tiny_model(), data, "fimaq", work_dir=tmp_path, **QUICK)
    assert torch.equal(resumed.model(data), uninterrupted)
    assert [b["block"] for b in resumed.reconstruction["blocks"]] == ["patch_embed", "blocks.0", "blocks.1", "head"]


def test_resume_refuses_another_model_other_images_other_settings_and_damage(data, tmp_path):
    vitq.quantize(tiny_model(), data, "qdrop", work_dir=tmp_path, **QUICK)
    with pytest.raises(vitq.VitqError, match="other settings"):
        vitq.quantize(tiny_model(), data, "qdrop", work_dir=tmp_path, **quick(iters=41))
    with pytest.raises(vitq.VitqError, match="another model"):  # same architecture, other weights
        vitq.quantize(tiny_model(seed=1), data, "qdrop", work_dir=tmp_path, **QUICK)
    with pytest.raises(vitq.VitqError, match="other optimisation images"):
        vitq.quantize(tiny_model(), data.flip(0), "qdrop", work_dir=tmp_path, **QUICK)
    # --restart discards the old run instead
    vitq.quantize(tiny_model(seed=1), data, "qdrop", work_dir=tmp_path, restart=True, **QUICK)
    state = tmp_path / "reconstruction.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(vitq.VitqError, match="damaged") as err:
        vitq.quantize(tiny_model(seed=1), data, "qdrop", work_dir=tmp_path, **QUICK)
    assert "\n" not in str(err.value) and "--restart" in str(err.value)


def test_bad_reconstruction_options():
    with pytest.raises(vitq.VitqError, match="loss must be one of"):
        ReconConfig(loss="nope")
    with pytest.raises(vitq.VitqError, match="no reconstruction stage"):
        vitq.get_recipe("mse", reconstruction={"iters": 10})
    with pytest.raises(vitq.VitqError, match="alpha"):
        vitq.get_recipe("fimaq", reconstruction={"alpha": 1.5})
    with pytest.raises(vitq.VitqError, match="unknown reconstruction option 'iter'"):
        vitq.get_recipe("fimaq", reconstruction={"iter": 10})


def test_reconstruction_leaves_the_global_rng_alone(data):
    model = tiny_model()  # (the builder seeds the RNG itself)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    vitq.quantize(model, data, "qdrop", **QUICK)
    assert torch.equal(torch.rand(3), expected)


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``item``, ``bool``, ``float``: a host sync on a
    GPU) and ops whose output size depends on values (``nonzero``: a sync too), except those of
    ``torch.optim``, whose step counters live on the CPU by design."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero,
                                   torch.ops.aten.masked_select):
            stack = traceback.extract_stack()
            if not any("torch/optim/" in f.filename for f in stack):
                self.reads.append(next((f"{f.filename}:{f.lineno}" for f in reversed(stack) if "/vitq/" in f.filename),
                                       "?"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe, stage", [("fimaq", "reconstruction"), ("fimaq+refine", "refine")])
def test_no_host_sync_per_optimisation_iteration(recipe, stage, data):
    """On a GPU every read of a device value into Python stalls the loop: an iteration reads none
    (losses are read every log_every iterations), so 4 and 12 iterations read the same number."""
    counts = []
    for iters in (4, 12):
        settings = quick(iters=4, log_every=1000)
        settings[stage] = {**settings.get(stage, {}), "iters": iters, "log_every": 1000}
        with ScalarReads() as mode:
            vitq.quantize(tiny_model(), data, recipe, **settings)
        counts.append(collections.Counter(mode.reads))
    assert counts[0] == counts[1], f"reads per iteration at: {counts[1] - counts[0]}"


def test_snapshot_gradient_equals_brute_force_gradient_through_the_whole_model(data):
    """A snapshot runs only the block and what follows it; its gradient at the block output must
    equal autograd through the whole model (prefix float, this block quantized, rest float)."""
    from vitq.reconstruction.fisher import _take_snapshot

    model = vitq.quantize(tiny_model(), data, "minmax", w_bits=4, a_bits=4, calib_size=48, progress=False)
    cfg = ReconConfig(capture_batch_size=16, temperature=4.0)
    set_mode(model, QuantMode.FLOAT)
    with torch.no_grad():
        targets = torch.softmax(model(data) / cfg.temperature, -1)
    name, block = "blocks.1", model.blocks[1]
    x_fp = engine.capture_block_input(model, name, block, data, 16, torch.device("cpu"), torch.device("cpu"))
    y_fp = torch.cat([block(x_fp[i:i + 16]) for i in range(0, len(x_fp), 16)]).detach()
    set_mode(block, QuantMode.QUANT)
    g, d, sq = _take_snapshot(model, name, block, x_fp, y_fp, targets, cfg, torch.device("cpu"), None)
    # brute force: the full forward with a hook keeping the block output's gradient, over the same
    # batches (the KL is a batch mean, as in the official code, so its gradient scales with 1/batch)
    kept = []

    def keep(_m, _i, out):
        out.retain_grad()
        kept.append(out)

    handle = block.register_forward_hook(keep)
    for i in range(0, len(data), 16):
        logits = model(data[i:i + 16])
        torch.nn.functional.kl_div(torch.log_softmax(logits / cfg.temperature, -1), targets[i:i + 16],
                                   reduction="batchmean").backward()
    handle.remove()
    grad = torch.cat([out.grad for out in kept])
    outs = torch.cat([out.detach() for out in kept])
    assert torch.allclose(g, grad.abs().reshape(len(data), -1).mean(0), rtol=1e-4, atol=1e-9)
    assert sq == pytest.approx(float(grad.pow(2).sum()), rel=1e-4)
    assert torch.allclose(d, (outs - y_fp).abs().reshape(len(data), -1).mean(0), atol=1e-6)


def test_paper_rms_form_leaves_the_diagonal_term_unchanged(data):
    from vitq.reconstruction.fisher import FisherState, refresh_snapshots

    out = {}
    for form in ("gram_inverse", "paper_rms"):
        model = vitq.quantize(tiny_model(), data, "minmax", w_bits=4, a_bits=4, calib_size=48, progress=False)
        cfg = ReconConfig(lowrank_form=form, capture_batch_size=16)
        set_mode(model, QuantMode.FLOAT)
        with torch.no_grad():
            targets = torch.softmax(model(data) / cfg.temperature, -1)
        block = model.blocks[0]
        x = engine.capture_block_input(model, "blocks.0", block, data, 16, torch.device("cpu"), torch.device("cpu"))
        with torch.no_grad():
            y = block(x)
        set_mode(block, QuantMode.QUANT)
        state = FisherState()
        refresh_snapshots(model, "blocks.0", block, x, x, y, targets, cfg, torch.device("cpu"),
                          torch.Generator().manual_seed(0), state)
        out[form] = state
    assert torch.equal(out["gram_inverse"].g_bar, out["paper_rms"].g_bar)
    assert not torch.allclose(out["gram_inverse"].G_mat, out["paper_rms"].G_mat)


def test_log_softmax_quantizers_get_qdrop_but_keep_their_scale(data, monkeypatch):
    """Decision (see vitq.reconstruction): log-domain quantizers are QDropped, their scale is not learned."""
    seen = []
    real = LogQuantizer.forward

    def spy(self, x):
        if self.training:
            seen.append(self.drop_prob)
        return real(self, x)

    monkeypatch.setattr(LogQuantizer, "forward", spy)
    calibrated = vitq.quantize(tiny_model(), data, "mse", softmax_quantizer="log2", **CALIB_QUICK)
    before = calibrated.blocks[0].attn.matmul2.a_quantizer.scale.detach().clone()
    q = vitq.quantize(tiny_model(), data, "fimaq", softmax_quantizer="log2", **QUICK)
    log_q = q.blocks[0].attn.matmul2.a_quantizer
    assert isinstance(log_q, LogQuantizer) and seen and set(seen) == {0.5}
    assert torch.equal(log_q.scale, before) and not log_q.training and log_q.drop_prob == 1.0


@pytest.mark.parametrize("family", ["swin", "deit_distilled"])
def test_reconstruction_of_other_families_saves_and_reloads_identically(family, data, tmp_path):
    if family == "swin":
        from conftest import TINY_SWIN as kwargs

        model, timm_name = tiny_swin(), "swin_tiny_patch4_window7_224"
    else:
        from conftest import TINY_VIT as kwargs

        model, timm_name = tiny_vit(distilled=True), "deit_tiny_distilled_patch16_224"
    result = vitq.quantize_with_summary(model, data, "fimaq", **quick(iters=10))
    names = [b["block"] for b in result.reconstruction["blocks"]]
    assert names[0] == "patch_embed" and names[-1] in ("head", "head+head_dist")
    if family == "swin":
        assert "layers.1.downsample" in names  # patch merging is a block of its own
    out = result.model(data)
    assert torch.isfinite(out).all()
    vitq.save_quantized(result.model, tmp_path / "m", architecture={"timm_name": timm_name, "arch_kwargs": kwargs})
    assert torch.equal(vitq.load_model(str(tmp_path / "m"))(data), out)


def test_dfq_interval_is_learned_and_saved(data, tmp_path):
    from vitq.methods.aiqvit import DynamicFocusingQuantizer

    calibrated = vitq.quantize(tiny_model(), data, "mse", softmax_quantizer="dfq", **CALIB_QUICK)
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


AIQ_SMALL = {"candidates": (0, 4, 8), "search_iters": 5}


def aiq_quick(**aiq):
    return {**QUICK, "aiq": {**AIQ_SMALL, **aiq}}


@pytest.mark.parametrize("recipe, extra", [
    ("aiqvit", {}),
    ("aiqvit", {"lrc_mode": "side", "rank_policy": "energy"}),
    ("fimaq+aiq", {"rank_policy": "fixed", "fixed_rank": 4}),
])
def test_aiqvit_recipes_run_report_ranks_and_reload(recipe, extra, data, tmp_path):
    from vitq.methods.aiqvit import lowrank_modules

    result = vitq.quantize_with_summary(tiny_model(), data, recipe, **aiq_quick(**extra))
    q = result.model
    ranks = result.reconstruction["blocks"][1]["lrc_ranks"]
    assert set(ranks) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    assert all(r in (0, 4, 8) for r in ranks.values())
    if extra.get("rank_policy") == "fixed":
        assert set(ranks.values()) == {4}
    side = extra.get("lrc_mode") == "side"
    # merged compensation is folded into the weights; side branches stay and are saved
    assert bool(lowrank_modules(q)) == (side and any(ranks.values()))
    out = q(data)
    assert torch.isfinite(out).all()
    vitq.save_quantized(q, tmp_path / "m")
    assert torch.equal(vitq.load_model(str(tmp_path / "m"))(data), out)


def test_aiqvit_curriculum_and_lrc_resume_to_the_same_result(data, tmp_path, monkeypatch):
    kw = aiq_quick(rank_policy="fixed", fixed_rank=4)
    uninterrupted = vitq.quantize(tiny_model(), data, "fimaq+aiq", **kw)(data)
    undo = kill_on_third_block(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        vitq.quantize(tiny_model(), data, "fimaq+aiq", work_dir=tmp_path, **kw)
    undo()
    resumed = vitq.quantize(tiny_model(), data, "fimaq+aiq", work_dir=tmp_path, **kw)(data)
    assert torch.equal(resumed, uninterrupted)


def test_aiq_options_need_an_aiq_recipe():
    with pytest.raises(vitq.VitqError, match="no aiq stage"):
        vitq.get_recipe("fimaq", aiq={"lrc_mode": "side"})


def test_dfq_options_reach_the_quantizer_of_fimaq_dfq(data):
    # the CLI's --dfq-granularity head on fimaq+dfq (issue: it was refused with "no AIQViT stage")
    q = vitq.quantize(tiny_model(), data, "fimaq+dfq", softmax_options={"granularity": "head"}, **quick(iters=5))
    assert q.blocks[0].attn.matmul2.a_quantizer.b1.numel() == 3  # one interval per head


@pytest.mark.parametrize("warmup, trained_before_arch", [(0.0, False), (0.5, True)])
def test_rank_search_warmup_trains_factors_before_the_architecture_steps(warmup, trained_before_arch, data,
                                                                         monkeypatch):
    # With B = 0 all candidate ranks give the same output, so alpha can only compare them after
    # the factors moved: the warm-up must train A, B before the first architecture step.
    import vitq.methods.aiqvit.extension as aiq_recon

    seen = []
    real_step = aiq_recon.first_order_darts_step

    def spy(weight_loss, val_loss, weight_opt, arch_opt, lowranks, *args, **kwargs):
        if not seen:
            seen.append(max(float(lr.B.abs().max()) for lr in lowranks))
        return real_step(weight_loss, val_loss, weight_opt, arch_opt, lowranks, *args, **kwargs)

    monkeypatch.setattr(aiq_recon, "first_order_darts_step", spy)
    vitq.quantize(tiny_model(), data, "aiqvit", **aiq_quick(search_iters=4, search_warmup=warmup))
    assert (seen[0] > 0) == trained_before_arch


def test_snapshot_images_average_over_a_fixed_strided_subset(data):
    """snapshot_images=m: every snapshot is the one taken over exactly those m images (no draw), and
    the default (all images) is what it was before the option existed, checkpoint key included."""
    from vitq.reconstruction import checkpoint
    from vitq.reconstruction.config import snapshot_subset
    from vitq.reconstruction.fisher import FisherState, refresh_snapshots

    assert snapshot_subset(10, 4).tolist() == [0, 2, 5, 7]
    assert snapshot_subset(10, None) is None and snapshot_subset(10, 10) is None
    model = vitq.quantize(tiny_model(), data, "minmax", w_bits=4, a_bits=4, calib_size=48, progress=False)
    set_mode(model, QuantMode.FLOAT)
    with torch.no_grad():
        targets = torch.softmax(model(data) / 20.0, -1)
    block = model.blocks[0]
    x = engine.capture_block_input(model, "blocks.0", block, data, 16, torch.device("cpu"), torch.device("cpu"))
    with torch.no_grad():
        y = block(x)
    set_mode(block, QuantMode.QUANT)
    m = len(x) // 3
    idx = snapshot_subset(len(x), m)
    states = {}
    for label, cfg, (xs, ys, ts) in (("subset", ReconConfig(capture_batch_size=16, snapshot_images=m), (x, y, targets)),
                                     ("by hand", ReconConfig(capture_batch_size=16), (x[idx], y[idx], targets[idx])),
                                     ("all", ReconConfig(capture_batch_size=16), (x, y, targets))):
        states[label] = FisherState()
        refresh_snapshots(model, "blocks.0", block, xs, xs, ys, ts, cfg, torch.device("cpu"),
                          torch.Generator().manual_seed(0), states[label])
    assert torch.allclose(states["subset"].g_bar, states["by hand"].g_bar, rtol=1e-5, atol=1e-10)
    assert torch.allclose(states["subset"].G_mat, states["by hand"].G_mat, rtol=1e-5, atol=1e-10)
    assert not torch.allclose(states["subset"].g_bar, states["all"].g_bar, rtol=1e-3)
    assert "snapshot_images" not in checkpoint.recon_settings(ReconConfig())
    assert checkpoint.recon_settings(ReconConfig(snapshot_images=64))["snapshot_images"] == 64
    with pytest.raises(vitq.VitqError, match="snapshot_images must be between 1 and optim_size"):
        ReconConfig(optim_size=128, snapshot_images=256)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_stepped_block_inputs_equal_capturing_the_whole_prefix(data, monkeypatch, family):
    """Each block's inputs come from the previous block's (that block and the glue after it, not
    the whole prefix again): the quantized model is the one full captures give, bit for bit."""
    build = tiny_vit if family == "vit" else tiny_swin
    x = data if family == "vit" else torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    stepped = []
    real = engine.step_block_input

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        stepped.append(out is not None)
        return out

    monkeypatch.setattr(engine, "step_block_input", counting)
    a = vitq.quantize(build(), x, "fimaq-diag", **quick(iters=6, rank=1))
    n_blocks = len(vitq.adapters.reconstruction_blocks(a))
    assert stepped and all(stepped) and len(stepped) == 2 * (n_blocks - 1)  # x_fp and x_q of every block after the first
    monkeypatch.setattr(engine, "step_block_input", lambda *args, **kwargs: None)
    b = vitq.quantize(build(), x, "fimaq-diag", **quick(iters=6, rank=1))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
