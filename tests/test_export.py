"""Packed integer checkpoints: bit packing, round trips to the fake-quant logits, size, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_SWIN, TINY_VIT, tiny_swin, tiny_vit

import vitq
from vitq.cli import main
from vitq.errors import VitqError
from vitq.export import PACKED_FORMAT, pack_codes, packed_nbytes, unpack_codes
from vitq.export import folder as folder_module

CALIB = dict(calib_size=16, progress=False, device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(48, 3, 32, 32)


def _logit_gap(folder: Path, qmodel: torch.nn.Module, x: torch.Tensor) -> float:
    loaded = vitq.load_model(str(folder))
    with torch.no_grad():
        return float((loaded(x) - qmodel(x)).abs().max())


# ----------------------------------------------------------------------------- bit packing

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [1, 3, 7, 9, 1001, 8 * 131072 + 5])  # the last crosses a packing chunk
def test_pack_round_trip_and_byte_count(bits, count):
    gen = torch.Generator().manual_seed(bits * 7919 + count)
    codes = torch.randint(0, 2 ** bits, (count,), generator=gen, dtype=torch.int32)
    stream = pack_codes(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == math.ceil(count * bits / 8) == packed_nbytes(count, bits)
    assert torch.equal(unpack_codes(stream, bits, count), codes)


def test_pack_bit_order_is_little_endian():
    # codes 1, 2, 3 at 2 bits: stream bits (LSB first) 1 0 | 0 1 | 1 1 -> byte 0b00111001
    assert pack_codes(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]
    # 3 bits across a byte boundary: 5 = 101, 6 = 011 (LSB first), 7 = 111 -> bits 101 011 11|1
    assert pack_codes(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]


def test_pack_refuses_codes_out_of_range_and_short_streams():
    with pytest.raises(ValueError, match="0, 7"):
        pack_codes(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="0, 3"):
        pack_codes(torch.tensor([-1]), 2)
    with pytest.raises(ValueError, match="bit width"):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 5)


# ----------------------------------------------------------------------------- round trips

def test_reconstructed_vit_round_trips_to_the_fake_quant_logits(images, tmp_path):
    # one search round: the mse calibration dominates the time, and one round already moves every grid
    q = vitq.quantize(tiny_vit(), images, "qdrop", w_bits=3, a_bits=3, calib_size=16,
                      calibration={"eq_n": 16, "search_rounds": 1}, reconstruction={"iters": 5, "optim_size": 48},
                      progress=False, device="cpu")
    out = vitq.export(q, tmp_path / "packed", format="packed")
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == PACKED_FORMAT and config["recipe"]["name"] == "qdrop"
    weights = config["packing"]["weights"]
    assert "blocks.0.attn.qkv.weight" in weights and "patch_embed.proj.weight" in weights
    assert all(meta["bits"] == 3 and meta["kind"] == "uniform" for meta in weights.values())
    assert _logit_gap(out, q, images[:8]) <= 1e-5
    loaded = vitq.load_model(str(out))
    assert vitq.recipe_of(loaded).name == "qdrop"
    # the rebuilt weights are the fake-quant weights (the grid points), not the float ones
    wq = q.blocks[0].mlp.fc1
    assert torch.allclose(loaded.blocks[0].mlp.fc1.weight, wq.w_quantizer(wq.weight), atol=1e-7)


@pytest.mark.parametrize("family", ["swin", "distilled"])
def test_swin_and_distilled_round_trip(family, images, tmp_path):
    if family == "swin":
        model, arch = tiny_swin(), {"timm_name": "swin_tiny_patch4_window7_224", "arch_kwargs": TINY_SWIN}
    else:
        model, arch = tiny_vit(distilled=True), {"timm_name": "deit_tiny_distilled_patch16_224",
                                                 "arch_kwargs": TINY_VIT}
    # repq folds LayerNorms into the next layers (Swin's bias-free PatchMerging reduction gains a bias)
    q = vitq.quantize(model, images, "repq", w_bits=4, a_bits=4, calibration={"eq_n": 16}, **CALIB)
    vitq.save_quantized(q, tmp_path / "fq", architecture=arch)
    # from the saved folder: the architecture comes from its config.json
    out = vitq.export(tmp_path / "fq", tmp_path / "packed")
    assert _logit_gap(out, q, images[:8]) <= 1e-5
    # from the model itself, with the architecture given as to save_quantized
    out2 = vitq.export(q, tmp_path / "packed2", architecture=arch)
    assert _logit_gap(out2, q, images[:8]) <= 1e-5
    if family == "distilled":
        assert "head_dist.weight" in json.loads((out / "config.json").read_text())["packing"]["weights"]


def test_aiqvit_side_branch_round_trips_with_float_factors(images, tmp_path):
    from vitq.methods.aiqvit import SideBranch

    q = vitq.quantize(tiny_vit(), images, "aiqvit", w_bits=3, a_bits=3, calib_size=16, calibration={"eq_n": 16},
                      aiq={"lrc_mode": "side", "rank_policy": "fixed", "fixed_rank": 4, "curriculum": False},
                      reconstruction={"iters": 3, "optim_size": 48}, progress=False, device="cpu")
    assert isinstance(q.blocks[0].mlp.fc1.side, SideBranch)
    out = vitq.export(q, tmp_path / "packed")
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    # the factors stay float; the layer's own weight is packed
    assert state["blocks.0.mlp.fc1.side.A"].dtype == torch.float32 and state["blocks.0.mlp.fc1.side.A"].shape[0] == 4
    assert "blocks.0.mlp.fc1.weight" not in state and "blocks.0.mlp.fc1.weight.codes" in state
    assert _logit_gap(out, q, images[:8]) <= 1e-5
    assert isinstance(vitq.load_model(str(out)).blocks[0].mlp.fc1.side, SideBranch)


def test_disabled_weight_quantizers_stay_float(images, tmp_path):
    # head and patch embedding at 16 bits: no weight quantizer, so their weights stay float
    q = vitq.quantize(tiny_vit(), images, "minmax", w_bits=4, a_bits=4, head_w_bits=16, head_a_bits=16,
                      patch_embed_w_bits=16, **CALIB)
    out = vitq.export(q, tmp_path / "packed")
    weights = json.loads((out / "config.json").read_text())["packing"]["weights"]
    assert "head.weight" not in weights and "patch_embed.proj.weight" not in weights
    assert "blocks.1.mlp.fc2.weight" in weights
    loaded = vitq.load_model(str(out))
    assert torch.equal(loaded.head.weight, q.head.weight)
    assert _logit_gap(out, q, images[:8]) <= 1e-5


def test_signed_grid_codes_are_offset_by_qmin(images, tmp_path):
    from safetensors.torch import load_file

    from vitq.quantizers import UniformQuantizer

    q = vitq.quantize(tiny_vit(), images, "minmax", w_bits=3, a_bits=3, **CALIB)
    layer = q.blocks[0].attn.proj
    sym = UniformQuantizer(3, symmetric=True, granularity="channel", axis=0)
    sym.observe(layer.weight.detach())
    sym.init_from_minmax()
    layer.w_quantizer = sym
    out = vitq.export(q, tmp_path / "packed")
    meta = json.loads((out / "config.json").read_text())["packing"]["weights"]["blocks.0.attn.proj.weight"]
    assert meta["signed"] and (meta["qmin"], meta["qmax"]) == (-4, 3)
    stored = unpack_codes(load_file(str(out / "model.safetensors"))["blocks.0.attn.proj.weight.codes"], 3,
                          meta["numel"]).reshape(meta["shape"])
    assert stored.min() >= 0 and stored.max() <= 7 and (stored == 0).any()  # the most negative code is used
    assert torch.equal((stored + meta["qmin"]).float() * sym.scale, sym(layer.weight.detach()))


# ----------------------------------------------------------------------------- size

@pytest.mark.parametrize("bits", [3, 4])
def test_packed_file_is_much_smaller_than_the_fake_quant_file(bits, images, tmp_path):
    q = vitq.quantize(tiny_vit(), images, "minmax", w_bits=bits, a_bits=bits, **CALIB)
    vitq.save_quantized(q, tmp_path / "fq")
    out = vitq.export(q, tmp_path / "packed")
    report = vitq.packed_size_report(out)
    assert json.loads((out / "export.json").read_text()) == report
    weights = json.loads((out / "config.json").read_text())["packing"]["weights"]
    # the formula, term by term: codes ceil(n b / 8); per output channel an fp32 scale and zero point
    # (+ one byte for each quantizer's `initialized` flag)
    assert report["codes_bytes"] == sum(math.ceil(m["numel"] * bits / 8) for m in weights.values())
    assert report["weight_qparams_bytes"] == sum(8 * m["shape"][0] + 1 for m in weights.values())
    assert report["total_bytes"] == (out / "model.safetensors").stat().st_size + (out / "config.json").stat().st_size
    fake = (tmp_path / "fq" / "model.safetensors").stat().st_size
    n = sum(m["numel"] for m in weights.values())
    # the fake-quant file holds the same float rest plus 4 n bytes of weights and the observer min/max;
    # the packed one holds n b / 8 bytes instead of 4 n, so it saves at least 4 n - n b / 8 bytes.
    assert fake - (out / "model.safetensors").stat().st_size >= 4 * n - n * bits / 8
    # The tiny ViT quantizes 65k of its 67k weights; its headers (safetensors + config.json, ~25 KB)
    # dominate the float rest, so its ratio is weaker than cifar10_vit's (~1/7 at W4): here < 1/3.
    assert report["total_bytes"] < fake / 3


# ----------------------------------------------------------------------------- bad input (Python)

def test_export_refuses_bad_input(images, tmp_path):
    with pytest.raises(VitqError, match="not quantized"):
        vitq.export(tiny_vit(), tmp_path / "a")
    q = vitq.quantize(tiny_vit(), images, "minmax", w_bits=4, a_bits=4, **CALIB)
    with pytest.raises(VitqError, match="unknown export format 'tflite': use packed, onnx"):
        vitq.export(q, tmp_path / "a", format="tflite")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(VitqError, match="exists and is not an empty folder or a previous vitq export"):
        vitq.export(q, busy)
    assert (busy / "notes.txt").read_text() == "keep me"
    vitq.save_quantized(q, tmp_path / "fq")  # a quantized (not packed) model folder is no export either
    with pytest.raises(VitqError, match="not an empty folder or a previous vitq export"):
        vitq.export(q, tmp_path / "fq")
    # an empty folder and a previous packed export are fine
    (tmp_path / "empty").mkdir()
    vitq.export(q, tmp_path / "empty")
    vitq.export(q, tmp_path / "empty")
    assert vitq.packed_size_report(tmp_path / "empty")["packed_weights"] > 0


def test_interrupted_export_leaves_no_partial_folder(images, tmp_path, monkeypatch):
    q = vitq.quantize(tiny_vit(), images, "minmax", w_bits=4, a_bits=4, **CALIB)
    first = vitq.export(q, tmp_path / "packed")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    real_write = folder_module.atomic_write_bytes

    def killed_at_config(path, write):
        if path.name == "config.json":
            raise KeyboardInterrupt
        real_write(path, write)

    monkeypatch.setattr(folder_module, "atomic_write_bytes", killed_at_config)
    for target in (tmp_path / "fresh", tmp_path / "packed"):
        with pytest.raises(KeyboardInterrupt):
            vitq.export(q, target)
    assert not (tmp_path / "fresh").exists()
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # no temporary siblings left


# ----------------------------------------------------------------------------- the CLI

def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("vitq: error:"), err
    return lines[0]


def test_cli_exports_a_quantize_run_folder(tiny_vit_dir, colour_tree, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _cli(["quantize", "--model", tiny_vit_dir, "--data", colour_tree, "--recipe", "minmax",
                         "--calib-size", "8", "--skip-fp-eval", "--device", "cpu", "--out", run, "--quiet"], capsys)
    assert code == 0, err
    out = tmp_path / "exports" / "w4"
    code, stdout, err = _cli(["export", run, "--format", "packed", "--out", out], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and "MB codes" in lines[0] and "of FP32" in lines[0]
    x = torch.randn(4, 3, 32, 32)
    fake = vitq.load_model(str(run))
    with torch.no_grad():
        assert float((vitq.load_model(str(out))(x) - fake(x)).abs().max()) <= 1e-5
    # the model/ folder works as well, and replaces the previous export
    code, _, err = _cli(["export", run / "model", "--out", out], capsys)
    assert code == 0, err
    # a packed export exports again to the same bytes (codes of dequantized weights are the same codes)
    code, _, err = _cli(["export", out, "--out", tmp_path / "again"], capsys)
    assert code == 0, err
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    for argv, needle in [
        (["export", run, "--format", "tflite", "--out", tmp_path / "x"], "unknown export format 'tflite'"),
        (["export", run, "--profile", "int8", "--out", tmp_path / "x"], "--profile applies to --format onnx only"),
        (["export", run, "--out", run], "exists and is not an empty folder or a previous vitq export"),
        (["export", run, "--out", run / "report.json"], "exists and is not an empty folder"),
        (["export", tiny_vit_dir, "--out", tmp_path / "x"], "float model, not a quantized one"),
        (["export", colour_tree, "--out", tmp_path / "x"], "not a vitq run or model folder"),
        (["export", tmp_path / "nowhere", "--out", tmp_path / "x"], "does not exist"),
        (["export", run / "report.json", "--out", tmp_path / "x"], "is not a folder"),
    ]:
        code, _, err = _cli(argv, capsys)
        assert code == 2
        assert needle in _one_error_line(err)
    assert not (tmp_path / "x").exists()
