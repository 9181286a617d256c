"""Shared fixtures: small synthetic image folders and tiny timm models built offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}

# The tiny models every test file uses (random weights, built offline, eval mode).
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
TINY_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                 num_classes=10)


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-block timm VisionTransformer (or ``VisionTransformerDistilled`` with ``distilled=True``)
    for 32x32 inputs, whose pretrained_cfg lets a quantized copy be saved and rebuilt."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    distilled = overrides.pop("distilled", False)
    kwargs = {**TINY_VIT, **overrides}
    torch.manual_seed(seed)
    model = (VisionTransformerDistilled if distilled else VisionTransformer)(**kwargs).eval()
    if not distilled:
        model.pretrained_cfg = {"vitq_arch_kwargs": dict(kwargs)}
    return model


def tiny_swin(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-stage timm SwinTransformer (with patch merging) for 32x32 inputs."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    return SwinTransformer(**{**TINY_SWIN, **overrides}).eval()


def write_colour_tree(root: Path, per_class: int = 4, size: int = 32) -> Path:
    """ROOT/<colour>/<n>.png: solid-colour images with a little noise, classes sorted by name."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def colour_tree(tmp_path: Path) -> Path:
    """An ImageNet-style folder with train/ and val/ splits of three colour classes."""
    write_colour_tree(tmp_path / "colours" / "train")
    write_colour_tree(tmp_path / "colours" / "val")
    return tmp_path / "colours"


@pytest.fixture
def tiny_vit_dir(tmp_path: Path) -> Path:
    """A vitq model folder (config.json + model.safetensors) holding a tiny random ViT."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=3)
    torch.manual_seed(0)
    model = VisionTransformer(**kwargs)
    folder = tmp_path / "tiny_vit"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"arch_kwargs": kwargs, "mean": [0.5] * 3, "std": [0.5] * 3}))
    return folder


def minmax_calibrate(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Calibrate every quantizer of a prepared model at its observed min/max over ``x``."""
    from vitq.qmodules import QuantMode, iter_quantizers, set_mode

    set_mode(model, QuantMode.OBSERVE)
    model(x)
    for _, q in iter_quantizers(model):
        q.init_from_minmax()
    set_mode(model, QuantMode.QUANT)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def per_channel_weight_grid(bits: int = 4) -> tuple[torch.Tensor, "torch.nn.Module"]:
    """A small random weight (6, 10) and a per-output-channel uniform quantizer calibrated on it."""
    from vitq.quantizers import UniformQuantizer

    torch.manual_seed(0)
    w = torch.randn(6, 10) * 0.1
    base = UniformQuantizer(bits, granularity="channel", axis=0)
    base.observe(w)
    base.init_from_minmax()
    return w, base

