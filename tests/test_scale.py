"""For models larger than the proving ground: autocast, caches on disk, the per-rank memory formula."""

from __future__ import annotations

import os

import pytest
import torch

import vitq
from conftest import tiny_vit
from vitq.errors import VitqError
from vitq.reconstruction import ReconConfig
from vitq.reconstruction.capture import spill_to_disk
from vitq.reconstruction.memory import BYTES, reconstruction_memory

QUICK = dict(w_bits=4, a_bits=4, calib_size=16, calibration={"eq_n": 16}, progress=False, device="cpu")
RECON = {"optim_size": 32, "iters": 20, "rank": 2}


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(3)
    return torch.randn(32, 3, 32, 32)


def _fimaq(data, **recon):
    return vitq.quantize_with_summary(tiny_vit(), data, "fimaq", **QUICK, reconstruction={**RECON, **recon})


def test_bf16_autocast_runs_the_block_in_bf16_and_stays_close_to_float32(data, monkeypatch):
    seen = []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        if torch.is_autocast_enabled("cpu"):
            seen.append(real(x, w, b).dtype)
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    bf16 = _fimaq(data, autocast="bf16")
    monkeypatch.setattr(torch.nn.functional, "linear", real)
    fp32 = _fimaq(data)
    assert seen and set(seen) == {torch.bfloat16}  # the optimisation passes ran under autocast
    a, b = bf16.model(data), fp32.model(data)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert not torch.equal(a, b)
    ref = tiny_vit()(data)
    # the same quality of result: bf16's output error within 1.5x of float32's
    assert (a - ref).norm() < 1.5 * (b - ref).norm()
    for x, y in zip(bf16.reconstruction["blocks"], fp32.reconstruction["blocks"]):
        assert x["output_mse_fp_input"] <= 1.5 * y["output_mse_fp_input"] + 1e-6


def test_fp16_autocast_off_cuda_is_one_line(data):
    with pytest.raises(VitqError, match="fp16 autocast needs a CUDA device"):
        _fimaq(data, autocast="fp16")
    with pytest.raises(VitqError, match="autocast must be one of"):
        ReconConfig(autocast="int8")


def test_caches_on_disk_give_the_same_model_and_leave_no_files(data, tmp_path, monkeypatch):
    monkeypatch.setenv("VITQ_CACHE_DIR", str(tmp_path))
    spilled = []
    import vitq.reconstruction.capture as capture

    real = capture.spill_to_disk

    def counting(t):
        spilled.append(t.shape)
        return real(t)

    monkeypatch.setattr(capture, "spill_to_disk", counting)
    on_disk = _fimaq(data, cache_on_disk=True)
    in_memory = _fimaq(data)
    assert len(spilled) >= 3 * 4 - 1  # X_fp, X_q (not for the first block) and Y_fp of each of 4 blocks
    assert torch.equal(on_disk.model(data), in_memory.model(data))
    assert os.listdir(tmp_path) == []


def test_spilled_tensor_reads_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("VITQ_CACHE_DIR", str(tmp_path))
    t = torch.randn(7, 5, 3)
    m = spill_to_disk(t)
    assert torch.equal(m, t) and torch.equal(m[torch.tensor([4, 1])], t[torch.tensor([4, 1])])
    assert os.listdir(tmp_path) == []


def test_memory_formula_parts():
    model = tiny_vit()
    cfg = ReconConfig(optim_size=100, batch_size=8, rank=3, capture_batch_size=16)
    est = reconstruction_memory(model, cfg, image_shape=(3, 32, 32))
    tokens, dim = 17, 48  # 4 x 4 patches + the class token
    # a transformer block: X_fp and X_q in, Y_fp out, each (tokens, dim) per image
    block = est.per_block["blocks.0"]
    assert block["caches"] == 100 * 3 * tokens * dim * BYTES
    assert block["step"] > 8 * 2 * tokens * dim * BYTES and block["snapshot"] > 0
    assert est.parts["model"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * 4 for b in model.buffers())
    assert est.total_bytes == sum(est.parts[k] for k in ("model", "targets", "caches", "moment", "rounding"))
    on_disk = reconstruction_memory(model, cfg, image_shape=(3, 32, 32), cache="disk")
    assert on_disk.parts["caches"] == 0 and on_disk.total_bytes < est.total_bytes
    two = reconstruction_memory(model, cfg, image_shape=(3, 32, 32), world_size=2)
    assert two.per_block["blocks.0"]["capture"] > block["capture"]
    # more images: the caches grow in proportion
    big = reconstruction_memory(model, ReconConfig(optim_size=200, batch_size=8, rank=3, capture_batch_size=16),
                                image_shape=(3, 32, 32))
    assert big.per_block["blocks.0"]["caches"] == 2 * block["caches"]
    # snapshots over a subset copy its inputs, float outputs and targets during a refresh
    sub = reconstruction_memory(model, ReconConfig(optim_size=100, batch_size=8, rank=3, capture_batch_size=16,
                                                   snapshot_images=20), image_shape=(3, 32, 32))
    assert sub.per_block["blocks.0"]["rounding"] - block["rounding"] == 20 * (2 * tokens * dim + 10) * BYTES


def test_one_measured_footprint_serves_every_setting():
    from vitq.reconstruction.memory import measure_footprint

    model = tiny_vit()
    cfg = ReconConfig(optim_size=100, batch_size=8, rank=3, capture_batch_size=16)
    footprint = measure_footprint(model, (3, 32, 32), cfg.adaround, cfg.drop_prob)
    for world, cache in ((1, "memory"), (2, "disk")):
        fresh = reconstruction_memory(model, cfg, (3, 32, 32), world_size=world, cache=cache)
        reused = reconstruction_memory(None, cfg, (3, 32, 32), world_size=world, cache=cache, footprint=footprint)
        assert reused.total_bytes == fresh.total_bytes and reused.per_block == fresh.per_block
    # a footprint measured for other rounding settings is not reused silently
    with pytest.raises(ValueError, match="footprint"):
        reconstruction_memory(None, ReconConfig(adaround=False), (3, 32, 32), footprint=footprint)
