"""Rotated linear inputs (vitq.rotation): orthogonality, an unchanged float model, what it buys on
outlier channels, the RepQ fold left out, saving, packed and ONNX export, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TINY_SWIN, tiny_swin, tiny_vit

import vitq
from vitq.adapters import QuantSpec, prepare
from vitq.cli import main
from vitq.errors import VitqError
from vitq.qmodules import QuantLinear, QuantMode, quant_modules, set_mode
from vitq.rotation import (hadamard_matrix, hadamard_order_supported, make_rotation, random_orthogonal,
                           rotate_attention_operands, rotate_linear_inputs)

CALIB = dict(calib_size=16, progress=False, device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(32, 3, 32, 32)


@pytest.mark.parametrize("d", [1, 2, 48, 96, 192, 320, 384, 768, 1536, 3072])
def test_hadamard_rotations_are_orthogonal_and_spread_every_channel(d):
    r = hadamard_matrix(d, torch.Generator().manual_seed(d))
    assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-10)
    # every entry has the same magnitude: one channel's outlier lands on all channels equally
    assert torch.allclose(r.abs(), torch.full_like(r, d ** -0.5))


@pytest.mark.parametrize("kind,d", [("hadamard", 48), ("hadamard", 768), ("hadamard", 320), ("orthogonal", 30)])
def test_rotation_module_applies_its_matrix_and_inverse(kind, d):
    rot = make_rotation(kind, d, torch.Generator().manual_seed(1))
    dense = rot.dense()
    assert torch.allclose(dense @ dense.T, torch.eye(d), atol=1e-5)
    if kind == "hadamard":  # the factored form is the dense matrix of the same draw
        assert rot.factored and torch.allclose(dense, hadamard_matrix(d, torch.Generator().manual_seed(1)).float(),
                                               atol=1e-6)
    x = torch.randn(2, 5, d)
    assert torch.allclose(rot(x), x @ dense, atol=1e-5)
    assert torch.allclose(rot.inverse(rot(x)), x, atol=1e-5)


def test_unsupported_hadamard_order_names_the_fix():
    assert not hadamard_order_supported(100)
    with pytest.raises(VitqError, match="rotation='orthogonal'"):
        hadamard_matrix(100, torch.Generator())
    q = random_orthogonal(100, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(100, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_leaves_the_float_model_unchanged(build, kind, images):
    model = build()
    with torch.no_grad():
        ref = model(images[:4])
    prepare(model, QuantSpec(w_bits=4, a_bits=4))
    names = rotate_linear_inputs(model, kind, seed=0)
    linears = [n for n, m in quant_modules(model) if isinstance(m, QuantLinear) and m.a_quantizer is not None]
    assert names == linears and len(names) >= 8
    matmuls = rotate_attention_operands(model, kind, seed=0)
    assert len(matmuls) == 2 * len([n for n in names if n.endswith("qkv")])
    set_mode(model, QuantMode.FLOAT)
    with torch.no_grad():
        assert torch.allclose(model(images[:4]), ref, atol=1e-4)
    # the quantizers see other operands than the float model has, whose products are the same
    blk = model.get_submodule(matmuls[0].rsplit(".", 1)[0])
    seen = {}
    def record(mod, args, name):
        seen.setdefault(name, (args, mod.layer_inputs(*args)))  # returns None: the inputs stay as they are

    hooks = [getattr(blk, m).register_forward_pre_hook(lambda mod, args, m=m: record(mod, args, m))
             for m in ("matmul1", "matmul2")]
    with torch.no_grad():
        model(images[:2])
    for h in hooks:
        h.remove()
    (q, kt), (q_r, kt_r) = seen["matmul1"]
    assert not torch.allclose(q_r, q, atol=1e-3) and torch.allclose(q_r @ kt_r, q @ kt, atol=1e-4)
    (attn, v), (_, v_r) = seen["matmul2"]
    r = blk.matmul2.operand_rotation.dense()
    assert not torch.allclose(v_r, v, atol=1e-3) and torch.allclose((attn @ v_r) @ r.t(), attn @ v, atol=1e-5)
    with pytest.raises(VitqError, match="rotated already"):
        rotate_linear_inputs(model, kind, seed=0)
    with pytest.raises(VitqError, match="rotated already"):
        rotate_attention_operands(model, kind, seed=0)


def test_rotation_cuts_the_error_of_outlier_channels(images):
    # a few huge LayerNorm channels whose weight columns are small (as in trained ViTs): one per-tensor
    # activation scale spends its codes on them and rounds the informative channels away; rotated, every
    # channel carries the same share of the outliers. Measured on the layers they feed.
    base = tiny_vit()
    with torch.no_grad():
        for blk in base.blocks:
            for norm, linear in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
                norm.weight[:3] *= 40.0
                norm.bias[:3] *= 40.0
                linear.weight[:, :3] /= 40.0
    err = {}
    for kind in ("none", "hadamard"):
        q = vitq.quantize(copy.deepcopy(base), images, "minmax", w_bits=8, a_bits=6, rotation=kind, **CALIB)
        for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc1"):
            layer = q.get_submodule(name)
            seen = []
            handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            with torch.no_grad():
                q(images)
            handle.remove()
            with torch.no_grad():
                set_mode(layer, QuantMode.FLOAT)
                ref = layer(seen[0])
                set_mode(layer, QuantMode.QUANT)
                err[kind, name] = float((layer(seen[0]) - ref).norm() / ref.norm())
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc1"):
        assert err["hadamard", name] < 0.5 * err["none", name], err


def test_mse_recipe_folds_only_unrotated_layers(images):
    plain = vitq.quantize_with_summary(tiny_vit(), images, "mse", w_bits=4, a_bits=4, calibration={"eq_n": 16},
                                       **CALIB)
    rotated = vitq.quantize_with_summary(tiny_vit(), images, "mse", w_bits=4, a_bits=4, rotation="hadamard",
                                         calibration={"eq_n": 16}, **CALIB)
    assert plain.calibration["folded_layers"] and not plain.calibration["rotated_layers"]
    # the fold's per-channel scales belong to the LayerNorm's channels, which a rotated layer no longer sees
    assert rotated.calibration["folded_layers"] == []
    assert "blocks.0.attn.qkv" in rotated.calibration["rotated_layers"]
    assert vitq.recipe_of(rotated.model).rotation == "hadamard"


def test_rotated_model_saves_packs_and_exports(images, tmp_path):
    q = vitq.quantize(tiny_swin(), images, "minmax", w_bits=4, a_bits=4, rotation="hadamard",
                      rotate_attention=True, **CALIB)
    assert q.layers[0].blocks[0].attn.matmul2.operand_rotation is not None
    arch = {"timm_name": "swin_tiny_patch4_window7_224", "arch_kwargs": TINY_SWIN}
    with torch.no_grad():
        ref = q(images[:8])
    vitq.save_quantized(q, tmp_path / "fq", architecture=arch)
    with torch.no_grad():
        assert torch.allclose(vitq.load_model(str(tmp_path / "fq"))(images[:8]), ref, atol=1e-5)
    packed = vitq.export(q, tmp_path / "packed", format="packed", architecture=arch)
    with torch.no_grad():
        assert torch.allclose(vitq.load_model(str(packed))(images[:8]), ref, atol=1e-5)
    pytest.importorskip("onnxruntime")
    from vitq.export import onnx_file

    out = vitq.export(q, tmp_path / "onnx", "onnx", check_images=images[:8])
    got = onnx_file.onnx_logits(onnx_file.ort_session(out / "model.onnx", threads=1, level="basic"), images[8:16])
    with torch.no_grad():
        want = q(images[8:16]).numpy()
    assert np.median(np.abs(got - want).max(axis=1)) <= 1e-4


def test_rotation_presets_rotate():
    assert vitq.get_recipe("mse+rot").rotation == "hadamard"
    fimaq = vitq.get_recipe("fimaq-diag+rot")
    assert fimaq.rotation == "hadamard" and fimaq.reconstruction.loss == vitq.get_recipe("fimaq-diag").reconstruction.loss
    assert vitq.get_recipe("mse").rotation == "none"
    dplr = vitq.get_recipe("fimaq+rot+log")
    assert (dplr.rotation, dplr.softmax_quantizer) == ("hadamard", "log")
    assert dplr.reconstruction.loss == vitq.get_recipe("fimaq").reconstruction.loss == "fimaq_dplr"


def test_bad_rotation_is_one_line(tiny_vit_dir, colour_tree, tmp_path, capsys):
    with pytest.raises(VitqError, match="unknown rotation 'householder'"):
        vitq.get_recipe("mse", rotation="householder")
    with pytest.raises(VitqError, match="rotate_attention needs a rotation"):
        vitq.get_recipe("mse", rotate_attention=True)
    code = main(["quantize", "--model", str(tiny_vit_dir), "--data", str(colour_tree), "--recipe", "minmax",
                 "--rotation", "householder", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "rotation" in err
