"""The recipes beyond FIMA-Q: the global loss term and end-to-end refinement (issue 15)."""

from __future__ import annotations

import copy

import pytest
import torch

import vitq
from conftest import tiny_swin, tiny_vit
from vitq.losses import kl_logits_loss
from vitq.adapters import prepare
from vitq.qmodules import QuantMode, iter_quantizers, set_mode
from vitq.reconstruction.global_loss import penultimate_after, penultimate_features
from vitq.reconstruction.refine import RefineConfig

CALIB = dict(w_bits=3, a_bits=3, calib_size=16, calibration={"eq_n": 16}, progress=False, device="cpu")
RECON = {"optim_size": 48, "iters": 30, "rank": 2}


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    return torch.randn(48, 3, 32, 32)


# ----------------------------------------------------------------------------- global term
@pytest.mark.parametrize("build, block", [(tiny_vit, "blocks.0"), (lambda: tiny_vit(distilled=True), "blocks.1"),
                                          (tiny_swin, "layers.1.downsample")])
def test_penultimate_feature_after_a_block_is_the_classifier_input(build, block, data):
    model = build()
    prepare(model, vitq.get_recipe("mse").quant_spec())
    set_mode(model, QuantMode.FLOAT)
    seen = []
    head = model.get_classifier()
    heads = head if isinstance(head, tuple) else (head,)
    hooks = [h.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(len(a[0]), -1))) for h in heads]
    captured = {}
    src = model.get_submodule(block)
    grab = src.register_forward_hook(lambda _m, _a, out: captured.setdefault("y", out))
    with torch.no_grad():
        model(data[:8])
    for h in hooks + [grab]:
        h.remove()
    expected = torch.cat(seen, 1)
    with torch.no_grad():
        after = penultimate_after(model, block, captured["y"])
        whole = penultimate_features(model, data[:8], 3, torch.device("cpu"), torch.device("cpu"))
    assert after.shape == expected.shape == whole.shape
    assert torch.allclose(after, expected, atol=1e-5) and torch.allclose(whole, expected, atol=1e-5)


def test_the_global_term_is_logged_and_changes_the_result(data):
    plain = vitq.quantize_with_summary(tiny_vit(), data, "fimaq-diag", **CALIB, reconstruction=RECON)
    glob = vitq.quantize_with_summary(tiny_vit(), data, "fimaq-diag", **CALIB,
                                      reconstruction={**RECON, "global_weight": 1.0, "global_every": 2})
    blocks = glob.reconstruction["blocks"]
    # every block but the head (whose KL loss is already global) has the term, normalised to 1 at first
    assert [b["final_global_loss"] is not None for b in blocks] == [True, True, True, False]
    assert all(abs(b["history"]["global"][0] - 1.0) < 1e-5 for b in blocks[:3])
    assert "global" not in plain.reconstruction["blocks"][0]["history"]
    with torch.no_grad():
        assert not torch.equal(plain.model(data), glob.model(data))


def test_bad_global_and_refine_options():
    with pytest.raises(vitq.VitqError, match="global_weight"):
        vitq.get_recipe("qdrop", reconstruction={"global_weight": -1.0})
    with pytest.raises(vitq.VitqError, match="global_every"):
        vitq.get_recipe("qdrop", reconstruction={"global_every": 0})
    with pytest.raises(vitq.VitqError, match="refine rounding"):
        RefineConfig(rounding="round")
    with pytest.raises(vitq.VitqError, match="must be positive"):
        RefineConfig(optim_size=0)
    with pytest.raises(vitq.VitqError, match="unknown refine option"):
        vitq.get_recipe("mse", refine={"steps": 3})
    # any recipe can take the stage, and the presets carry it
    assert vitq.get_recipe("mse", refine={"iters": 7}).refine.iters == 7
    assert vitq.get_recipe("fimaq+refine").refine is not None
    assert vitq.get_recipe("fimaq+global").reconstruction.global_weight > 0


# ----------------------------------------------------------------------------- refinement
def _kl_to_float(model, fp_logits, data):
    with torch.no_grad():
        return float(kl_logits_loss(model(data), fp_logits))


@pytest.mark.parametrize("rounding", ["hard", "soft"])
def test_refinement_lowers_the_kl_and_keeps_or_learns_the_rounding(rounding, data, tmp_path):
    fp = tiny_vit()
    with torch.no_grad():
        fp_logits = fp(data)
    before = vitq.quantize_with_summary(copy.deepcopy(fp), data, "qdrop", **CALIB, reconstruction=RECON,
                                        work_dir=tmp_path)
    after = vitq.quantize_with_summary(copy.deepcopy(fp), data, "qdrop", **CALIB, reconstruction=RECON,
                                       work_dir=tmp_path,
                                       refine={"iters": 40, "optim_size": 48, "rounding": rounding,
                                               "act_lr": 1e-3})
    # the block stage was resumed, not run again: the refinement is not part of its run key
    assert [b["seconds"] for b in after.reconstruction["blocks"]] == \
        [b["seconds"] for b in before.reconstruction["blocks"]]
    assert set(after.stages) == {"calibration", "refinement_targets", "reconstruction", "refinement"}
    assert _kl_to_float(after.model, fp_logits, data) < _kl_to_float(before.model, fp_logits, data)
    flips = after.refinement["rounding_flips"]
    w_before = before.model.blocks[0].mlp.fc1.weight
    w_after = after.model.blocks[0].mlp.fc1.weight
    if rounding == "hard":
        assert flips == 0
        for (name, a), b in zip(after.model.named_parameters(), before.model.parameters()):
            if name.endswith("weight") and "norm" not in name:
                assert torch.equal(a, b), name  # the rounded weights did not move
    else:
        assert flips > 0 and not torch.equal(w_before, w_after)
    lin = after.model.blocks[0].mlp.fc1  # folded, back on the grid either way
    assert torch.allclose(lin.w_quantizer(lin.weight), lin.weight, atol=1e-7)
    assert not any(p.requires_grad for _, q in iter_quantizers(after.model) for p in q.parameters())


def test_refinement_straight_after_calibration_and_the_same_seed_gives_the_same_model(data):
    a = vitq.quantize_with_summary(tiny_vit(), data, "mse", **CALIB, refine={"iters": 15, "optim_size": 32,
                                                                              "rounding": "soft", "drop_prob": 0.5})
    b = vitq.quantize(tiny_vit(), data, "mse", **CALIB, refine={"iters": 15, "optim_size": 32,
                                                                "rounding": "soft", "drop_prob": 0.5})
    assert a.refinement["rounding_layers"] > 0  # learned rounding installed where none was
    with torch.no_grad():
        assert torch.equal(a.model(data), b(data))


def test_a_refined_model_saves_and_reloads_identically(data, tmp_path):
    q = vitq.quantize(tiny_swin(), data, "qdrop", **CALIB, reconstruction={**RECON, "iters": 10},
                      refine={"iters": 10, "optim_size": 32, "rounding": "soft"})
    from conftest import TINY_SWIN

    vitq.save_quantized(q, tmp_path / "m", architecture={"timm_name": "swin_tiny_patch4_window7_224",
                                                         "arch_kwargs": TINY_SWIN})
    back = vitq.load_model(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(q(data[:8]), back(data[:8]))


def test_refinement_learns_the_biases_only_when_asked(data):
    fp = tiny_vit()
    results = {}
    for learn in (False, True):
        calibrated = {}
        q = vitq.quantize(copy.deepcopy(fp), data, "mse", **CALIB,
                          refine={"iters": 10, "optim_size": 32, "learn_biases": learn, "bias_lr": 1e-2},
                          after_calibration=lambda m: calibrated.update(bias=m.blocks[0].mlp.fc1.bias.clone()))
        results[learn] = (calibrated["bias"], q.blocks[0].mlp.fc1.bias)
    assert torch.equal(*results[False])
    assert not torch.equal(*results[True])
    assert results[True][1].requires_grad == fp.blocks[0].mlp.fc1.bias.requires_grad  # the flag restored
