"""ONNX export: exact QDQ graphs against the fake-quant logits in onnxruntime, the integer and
weight-only profiles (read from onnxruntime's optimised graph), targets, bad input, atomic writes."""

from __future__ import annotations

import builtins
import json
import os
import stat

import numpy as np
import pytest
import torch
from conftest import tiny_swin, tiny_vit

import vitq
from vitq.cli import main
from vitq.errors import VitqError
from vitq.export import folder as folder_module
from vitq.export import onnx_file
from vitq.export.onnx_graph import require_onnx
from vitq.export.onnx_plans import activation_storage
from vitq.quantizers import IntegerView
from vitq.report import cpu_features

pytest.importorskip("onnxruntime")

CALIB = dict(calib_size=16, progress=False, device="cpu")
RECON = {"iters": 2, "optim_size": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(24, 3, 32, 32)


def _export(q, tmp_path, name, images, **kw) -> dict:
    out = vitq.export(q, tmp_path / name, "onnx", check_images=images[:8], **kw)
    return json.loads((out / "export.json").read_text())


def _ort_logits(folder, x, level: str = "basic") -> np.ndarray:
    """onnxruntime's logits: ``basic`` runs the graph's own arithmetic, ``all`` its fused integer kernels."""
    return onnx_file.onnx_logits(onnx_file.ort_session(folder / "model.onnx", threads=1, level=level), x)


def _assert_reproduces(got: np.ndarray, ref: np.ndarray) -> None:
    """onnxruntime's logits are vitq's: most images to float precision; the rest differ by single codes.

    The graph is the fake-quant arithmetic op for op, but onnxruntime's LayerNorm / GELU / softmax round
    differently from PyTorch's in the last bit, so a value on a rounding boundary may get the next code;
    fused integer kernels also requantize in their own order of operations. One code is one step of
    one element: small against the logits, and rare.
    """
    per_image = np.abs(got - ref).max(axis=1)
    assert np.median(per_image) <= 1e-5, per_image
    assert per_image.max() <= 0.05 * np.abs(ref).max(), per_image
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


# ----------------------------------------------------------------------------- exact profile

@pytest.mark.parametrize("recipe,bits", [
    ("minmax", 8),   # native uint8 QDQ everywhere
    ("minmax", 4),   # uint4 QDQ; post-softmax range excludes 0 -> Max/Min + uint8
    ("repq", 4),     # log-sqrt2 post-softmax decomposition, LayerNorm fold, uint4
    ("mse", 3),      # 3-bit (clip + uint8), token-wise / per-head-and-token arithmetic grids
])
def test_exact_profile_matches_the_fake_quant_logits(recipe, bits, images, tmp_path):
    q = vitq.quantize(tiny_vit(), images, recipe, w_bits=bits, a_bits=bits, **CALIB)
    report = _export(q, tmp_path, "m", images)
    with torch.no_grad():
        ref = q(images).numpy()
    for level in ("basic", "all"):  # the graph's own arithmetic, then onnxruntime's fused kernels
        _assert_reproduces(_ort_logits(tmp_path / "m", images, level), ref)  # not the export's check images
    assert report["check"]["max_abs_logit_diff"] <= 0.05 * report["check"]["max_abs_logit"]
    assert report["opset"] == 21 and report["quantizers"]["weight"] == 10
    weight_types = {k for k in report["storage"] if k.startswith("weight:")}
    assert weight_types == ({"weight:uint8"} if bits == 8 else {"weight:uint4"})  # integer codes, never float


def test_exact_profile_on_swin_and_a_reconstructed_dfq_model(images, tmp_path):
    swin = vitq.quantize(tiny_swin(), images, "minmax", w_bits=4, a_bits=4, **CALIB)
    dfq = vitq.quantize(tiny_vit(), images, "fimaq+dfq", w_bits=4, a_bits=4, reconstruction=RECON, **CALIB)
    for name, q in (("swin", swin), ("dfq", dfq)):
        _export(q, tmp_path, name, images)
        with torch.no_grad():
            ref = q(images).numpy()
        _assert_reproduces(_ort_logits(tmp_path / name, images), ref)


def test_exact_profile_carries_the_bias_correction(images, tmp_path):
    """Calibration's bias correction reaches the graph's biases: onnxruntime reproduces the corrected
    logits, which differ from the uncorrected ones by far more than the tolerance."""
    q = vitq.quantize(tiny_vit(), images, "mse", w_bits=4, a_bits=4, calibration={"eq_n": 16, "bias_correction": True},
                      **CALIB)
    _export(q, tmp_path, "m", images)
    with torch.no_grad():
        ref = q(images).numpy()
        for m in q.modules():
            if getattr(m, "bias_correction", None) is not None:
                m.bias_correction = None
        uncorrected = q(images).numpy()
    got = _ort_logits(tmp_path / "m", images)
    _assert_reproduces(got, ref)
    assert np.abs(uncorrected - ref).max() > 0.2 * np.abs(ref).max()  # (the tolerance is 0.05 of it)
    assert np.median(np.abs(got - uncorrected).max(axis=1)) > 1e-3


def test_weights_are_stored_as_codes_so_the_file_is_small(images, tmp_path):
    q8 = vitq.quantize(tiny_vit(), images, "minmax", w_bits=8, a_bits=8, **CALIB)
    q4 = vitq.quantize(tiny_vit(), images, "minmax", w_bits=4, a_bits=4, **CALIB)
    fp32 = sum(p.numel() * 4 for p in tiny_vit().parameters())
    b8, b4 = (_export(q, tmp_path, n, images)["file_bytes"] for n, q in (("w8", q8), ("w4", q4)))
    assert b4 < b8 < 0.45 * fp32  # 8-bit codes are a quarter of FP32, 4-bit ones an eighth, plus the float rest


def test_storage_for_a_zero_point_outside_the_codes():
    # a 4-bit post-softmax grid whose range excludes 0: z = -107, codes 0..15 -> offsets 107..122
    view = IntegerView(kind="uniform", bits=4, scale=torch.tensor([0.001]), zero_point=torch.tensor([-107.0]),
                       qmin=0, qmax=15, axis=None)
    storage, zq, clip = activation_storage(view)
    assert clip and storage == "uint8" and 0 <= int(zq[0]) and 107 + int(zq[0]) >= 0 and 122 + int(zq[0]) <= 255
    inside = IntegerView(kind="uniform", bits=4, scale=torch.tensor([0.1]), zero_point=torch.tensor([7.0]),
                         qmin=0, qmax=15, axis=None)
    assert activation_storage(inside) == ("uint4", np.array([7]), False)


# ----------------------------------------------------------------------------- integer profiles

def _cpu_has_int8_dot_product() -> bool:
    features = cpu_features()
    return not features or bool({"avx512_vnni", "avx_vnni", "amx_int8"} & features)  # unreadable: assume so


@pytest.fixture(scope="module")
def w8a8_int8_target(images):
    return vitq.quantize(tiny_vit(), images, "qdrop", w_bits=8, a_bits=8, target="ort-int8", reconstruction=RECON,
                         **CALIB)


def _check_int8_export(q, tmp_path, images, profile: str, weights: str) -> None:
    assert vitq.recipe_of(q).target == "ort-int8"
    report = _export(q, tmp_path, profile, images, profile=profile)
    assert (report["recipe"], report["target"], report["profile"]) == ("qdrop", "ort-int8", profile)
    kernels = report["integer_kernels"]
    # every Linear of the blocks and both attention matmuls of each block become integer kernels
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) >= 12
    assert report["integer_matmul_share"] >= 0.8
    assert report["storage"][f"weight:{weights}"] == 10
    with torch.no_grad():
        ref = q(images).numpy()
    for level in ("basic", "all"):
        _assert_reproduces(_ort_logits(tmp_path / profile, images, level), ref)


def test_int8_profile_runs_on_integer_kernels(w8a8_int8_target, images, tmp_path):
    # uint8 weights: onnxruntime's u8u8 kernels, exact on every CPU
    _check_int8_export(w8a8_int8_target, tmp_path, images, "int8", "uint8")


# int8 weights for onnxruntime's u8s8 kernels: on a CPU without VNNI / AMX-INT8 they add byte pairs in
# saturating int16 (AVX2's vpmaddubsw) and the logits come out wrong (seen on an AVX2 AMD EPYC: median
# per-image max error 0.0196 against logits of at most 0.196, what an emulation of that kernel gives,
# benchmarks/avx2_saturation.py): an xfail there, by design.
@pytest.mark.xfail(not _cpu_has_int8_dot_product(), strict=True,
                   reason="u8s8 kernels saturate on CPUs without VNNI (the int8-vnni profile's documented limit)")
def test_int8_vnni_profile_stores_signed_weights(w8a8_int8_target, images, tmp_path):
    _check_int8_export(w8a8_int8_target, tmp_path, images, "int8-vnni", "int8")


def test_int8_profile_refuses_what_integer_kernels_cannot_take(images, tmp_path):
    per_head = vitq.quantize(tiny_vit(), images, "minmax", w_bits=8, a_bits=8, **CALIB)
    with pytest.raises(VitqError, match="--target ort-int8"):
        vitq.export(per_head, tmp_path / "x", "onnx", profile="int8")
    log = vitq.quantize(tiny_vit(), images, "repq", w_bits=8, a_bits=8, **CALIB)
    with pytest.raises(VitqError, match="logsqrt2 grid"):
        vitq.export(log, tmp_path / "x", "onnx", profile="int8")
    assert not (tmp_path / "x").exists()


def test_int8_target_keeps_zero_points_inside_the_codes(images):
    q = vitq.quantize(tiny_vit(), images, "minmax", w_bits=4, a_bits=4, target="ort-int8", **CALIB)
    from vitq.qmodules import iter_quantizers

    for name, quantizer in iter_quantizers(q):
        view = quantizer.integer_view()
        assert view.scale.numel() == 1 or name.endswith("w_quantizer"), name
        assert float(view.zero_point.min()) >= view.qmin and float(view.zero_point.max()) <= view.qmax, name


def test_w4_profile_is_weight_only_on_matmulnbits(images, tmp_path):
    q = vitq.quantize(tiny_vit(), images, "qdrop", w_bits=4, target="ort-w4", reconstruction=RECON, **CALIB)
    assert vitq.recipe_of(q).a_bits == 32
    report = _export(q, tmp_path, "w4", images, profile="w4")
    assert report["integer_kernels"] == {"MatMulNBits": 9}  # 4 Linears x 2 blocks + the head
    with torch.no_grad():
        ref = q(images).numpy()
    for level in ("basic", "all"):  # MatMulNBits in fp32 (accuracy level 1) computes the same
        _assert_reproduces(_ort_logits(tmp_path / "w4", images, level), ref)
    # a W4A4 model exports weight-only too, its activation quantizers dropped (and listed)
    w4a4 = vitq.quantize(tiny_vit(), images, "minmax", w_bits=4, a_bits=4, **CALIB)
    dropped = _export(w4a4, tmp_path, "w4a4", images, profile="w4")["dropped"]
    assert len(dropped) == 17 and "blocks.0.attn.matmul2.a_quantizer" in dropped
    w8 = vitq.quantize(tiny_vit(), images, "minmax", w_bits=8, a_bits=8, **CALIB)
    with pytest.raises(VitqError, match="at most 4 bits"):
        vitq.export(w8, tmp_path / "x", "onnx", profile="w4")


def test_targets_refuse_conflicting_settings():
    with pytest.raises(VitqError, match="weight-only"):
        vitq.get_recipe("fimaq", target="ort-w4", a_bits=4)
    with pytest.raises(VitqError, match="log2 post-softmax quantizer has no integer kernel"):
        vitq.get_recipe("mse", target="ort-int8", softmax_quantizer="log2")
    with pytest.raises(VitqError, match="unknown target 'tpu'"):
        vitq.get_recipe("mse", target="tpu")
    r = vitq.get_recipe("repq", target="ort-int8")
    assert (r.softmax_quantizer, r.matmul_granularity, r.calibration.token_wise) == ("uniform", "tensor", False)


# ----------------------------------------------------------------------------- bad input, files

def test_bad_input_gives_one_line_errors(images, tmp_path, monkeypatch):
    q = vitq.quantize(tiny_vit(), images, "minmax", w_bits=4, a_bits=4, **CALIB)
    with pytest.raises(VitqError, match="opset 17 is too low.*--opset 21"):
        vitq.export(q, tmp_path / "x", "onnx", opset=17)
    with pytest.raises(VitqError, match="unknown ONNX profile 'int2'"):
        vitq.export(q, tmp_path / "x", "onnx", profile="int2")
    with pytest.raises(VitqError, match="not quantized"):
        vitq.export(tiny_vit(), tmp_path / "x", "onnx")
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(VitqError, match=r"onnxruntime is missing\): pip install 'vitq\[export\]'"):
        require_onnx()
    assert not (tmp_path / "x").exists()


def test_killed_export_leaves_nothing_and_files_follow_the_umask(images, tmp_path, monkeypatch):
    q = vitq.quantize(tiny_vit(), images, "minmax", w_bits=8, a_bits=8, **CALIB)
    old = os.umask(0o022)
    try:
        out = vitq.export(q, tmp_path / "onnx", "onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "model.onnx").stat().st_mode) == 0o644
    before = (out / "model.onnx").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_file, "kernel_report", killed)  # after model.onnx is written
    for target in (tmp_path / "fresh", tmp_path / "onnx"):
        with pytest.raises(KeyboardInterrupt):
            vitq.export(q, target, "onnx")
    assert not (tmp_path / "fresh").exists() and (out / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert folder_module.EXPORT_FORMATS[1] == json.loads((out / "export.json").read_text())["format"]


def test_cli_quantize_with_a_target_then_export(tiny_vit_dir, colour_tree, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["quantize", "--model", str(tiny_vit_dir), "--data", str(colour_tree), "--recipe", "mse",
                 "--w-bits", "8", "--a-bits", "8", "--target", "ort-int8", "--calib-size", "8", "--skip-fp-eval",
                 "--device", "cpu", "--out", str(run), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "target ort-int8: attention matmul operands per tensor" in out
    code = main(["export", str(run), "--format", "onnx", "--profile", "int8", "--out", str(tmp_path / "o")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and "MatMulIntegerToFloat" in line and "max |logit diff|" in line
    code = main(["export", str(run), "--format", "onnx", "--opset", "13", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "opset 13 is too low" in err[0]
