"""Every supported timm family on tiny random-weight models (offline, pretrained=False).

For each family: float-mode logits equal timm's, every Linear / attention matmul is quantized,
and every reconstruction block (fed through block_input_source) plus forward_after reproduces
the full forward.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

from conftest import TINY_SWIN, TINY_VIT, minmax_calibrate, rel_err
import vitq
from vitq.adapters import (QuantSpec, adapter_for, block_input_source, build_model, forward_after, is_head_block,
                           layer_role, prepare, prepare_for_state_dict, prev_layernorm, reconstruction_blocks)
from vitq.errors import VitqError
from vitq.qmodules import QuantLinear, QuantMatMul, QuantMode, iter_quantizers, quant_modules, set_mode

VIT_KW, SWIN_KW = TINY_VIT, TINY_SWIN
EVA_KW = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
              use_rot_pos_emb=True, ref_feat_shape=(8, 8), num_classes=10)
ATTENTIONS = (Attention, WindowAttention, EvaAttention)


def _loud_head(model: nn.Module) -> nn.Module:
    # timm initialises heads near zero (Eva: x0.001); O(1) logits make the 1e-5 checks meaningful.
    # Biases start at zero (EVA's separate q/v biases too): random ones make dropping them visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not p.any():
                p.normal_(std=0.1)
    for m in (getattr(model, "head", None), getattr(model, "head_dist", None), getattr(model.head, "fc", None)):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)
            nn.init.normal_(m.bias, std=0.1)
    return model.eval()


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return _loud_head(build())
    return make


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "vit": _seeded(lambda: VisionTransformer(**VIT_KW)),
    "deit3_layerscale": _seeded(lambda: VisionTransformer(**VIT_KW, init_values=0.5, no_embed_class=True)),
    "vit_reg_tokens": _seeded(lambda: VisionTransformer(**VIT_KW, reg_tokens=4)),
    "vit_avg_fc_norm": _seeded(lambda: VisionTransformer(**VIT_KW, global_pool="avg", fc_norm=True)),
    "vit_no_cls_avg": _seeded(lambda: VisionTransformer(**VIT_KW, class_token=False, global_pool="avg")),
    "deit_distilled": _seeded(lambda: VisionTransformerDistilled(**VIT_KW)),
    # LayerScale 1e-6 (timm's default) would make the blocks near-identities: too weak a test
    "deit3_small_timm": _seeded(lambda: timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=32,
                                                          depth=2, num_classes=10, init_values=0.5)),
    "swin": _seeded(lambda: SwinTransformer(**SWIN_KW)),
    "eva02": _seeded(lambda: Eva(**EVA_KW)),
    # SwiGLU with separate fc1_g / fc1_x and an inner norm, LayerScale, register tokens
    "eva02_scale_mlp": _seeded(lambda: Eva(**EVA_KW, scale_mlp=True, init_values=0.5, num_reg_tokens=2)),
    # separate q/k/v projections, plain GELU Mlp, no class token
    "eva_qkv_split": _seeded(lambda: Eva(**{**EVA_KW, "swiglu_mlp": False}, qkv_fused=False, class_token=False)),
    "eva02_tiny_timm": _seeded(lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=32,
                                                         depth=2, num_classes=10)),
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_float_mode_matches_timm(family: str, images: torch.Tensor) -> None:
    model = FAMILIES[family]()
    ref_model = copy.deepcopy(model)
    ref = ref_model(images)
    assert ref.abs().mean() > 0.1  # logits large enough for the absolute tolerance to mean something
    orig_keys = set(model.state_dict())
    prepare(model, QuantSpec(w_bits=4, a_bits=4))
    assert all(m.mode == QuantMode.FLOAT for _, m in quant_modules(model))
    assert torch.allclose(model(images), ref, atol=1e-5, rtol=1e-5)
    assert orig_keys <= set(model.state_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_every_linear_and_attention_matmul_is_quantized(family: str, images: torch.Tensor) -> None:
    model = FAMILIES[family]()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    n_attn = sum(type(m) in ATTENTIONS for m in model.modules())
    assert n_linear > 0 and n_attn > 0
    prepare(model, QuantSpec(w_bits=8, a_bits=8))
    assert not any(type(m) is nn.Linear or type(m) in ATTENTIONS for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear
    attns = [m for m in model.modules() if isinstance(getattr(m, "matmul1", None), QuantMatMul)
             and isinstance(getattr(m, "matmul2", None), QuantMatMul)]
    assert len(attns) == n_attn
    # Both matmuls and every Linear are really on the forward path: each quantizer observes something.
    set_mode(model, QuantMode.OBSERVE)
    model(images)
    unobserved = [n for n, q in iter_quantizers(model) if q.min_val.numel() == 0]
    assert not unobserved
    for name, _ in quant_modules(model):
        layer_role(name)  # every quant module has a role


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_blocks_and_forward_after_reproduce_the_forward(family: str, images: torch.Tensor) -> None:
    model = prepare(FAMILIES[family](), QuantSpec(w_bits=8, a_bits=8))
    minmax_calibrate(model, images)  # quantized mode: forward_after must run the quant modules too
    logits = model(images)
    blocks = reconstruction_blocks(model)
    assert blocks[0][0] == "patch_embed" and is_head_block(model, blocks[-1][0])
    assert [n for n, _ in blocks if is_head_block(model, n)] == [blocks[-1][0]]
    for name, block in blocks:
        source, from_output = block_input_source(model, name, block)
        seen: dict[str, torch.Tensor] = {}
        if from_output:
            handle = source.register_forward_hook(lambda _m, _i, out: seen.__setitem__("x", out))
        else:
            handle = source.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("x", inp[0]))
        out_handle = None
        if name != "head+head_dist":  # every other name is a real submodule: hook its output too
            out_handle = model.get_submodule(name).register_forward_hook(
                lambda _m, _i, out: seen.__setitem__("y", out))
        model(images)
        handle.remove()
        y = block(seen["x"])
        if out_handle is not None:
            out_handle.remove()
            assert torch.allclose(y, seen["y"], atol=1e-5, rtol=1e-5), name
        assert torch.allclose(forward_after(model, name, y), logits, atol=1e-5, rtol=1e-5), name


# --------------------------------------------------------------------------- Eva specifics

def test_eva_roles_and_layernorm_fold_targets() -> None:
    model = prepare(FAMILIES["eva02"]())
    assert type(model.blocks[0].mlp).__name__ == "GluMlp"  # EVA-02's packed SwiGLU
    assert {layer_role(n) for n, _ in quant_modules(model)} == {"patch_embed", "qkv", "matmul1", "matmul2", "proj",
                                                                 "fc1", "fc2", "head"}
    assert prev_layernorm(model, "blocks.1.attn.qkv") is model.blocks[1].norm1
    assert prev_layernorm(model, "blocks.0.mlp.fc1") is model.blocks[0].norm2
    assert prev_layernorm(model, "blocks.0.mlp.fc2") is None and prev_layernorm(model, "head") is None
    names = [n for n, _ in quant_modules(model)]
    assert names[:5] == ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.matmul1", "blocks.0.attn.matmul2",
                         "blocks.0.attn.proj"]

    swiglu = prepare(FAMILIES["eva02_scale_mlp"]())
    assert layer_role("blocks.0.mlp.fc1_g") == layer_role("blocks.0.mlp.fc1_x") == "fc1"
    for name in ("blocks.0.mlp.fc1_g", "blocks.0.mlp.fc1_x"):  # norm2 feeds both: no fold
        assert prev_layernorm(swiglu, name) is None

    split = prepare(FAMILIES["eva_qkv_split"]())
    for p in ("q_proj", "k_proj", "v_proj"):
        assert layer_role(f"blocks.0.attn.{p}") == "qkv"
        assert prev_layernorm(split, f"blocks.0.attn.{p}") is None  # norm1 feeds three Linears


@torch.no_grad()
def test_eva_view_applies_the_rotary_embedding() -> None:
    model = prepare(FAMILIES["eva02"]())
    attn = model.blocks[0].attn
    attn.qkv.weight.mul_(10)  # sharp attention, large attention branch: the rope must matter
    attn.proj.weight.mul_(10)
    name, view = reconstruction_blocks(model)[1]
    assert name == "blocks.0" and view is not model.blocks[0]
    assert [n for n, _ in view.named_modules()][1:] == [n for n, _ in model.blocks[0].named_modules()][1:]
    x = torch.randn(2, 65, 64, generator=torch.Generator().manual_seed(0))
    with_rope, without = view(x), model.blocks[0](x)
    assert rel_err(without, with_rope) > 0.1
    assert torch.equal(with_rope, model.blocks[0](x, rope=model.rope.get_embed()))


# --------------------------------------------------------------------------- unsupported models

def _one_line_error(fn: Callable[[], object]) -> str:
    with pytest.raises(VitqError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unsupported_models_name_the_class() -> None:
    msg = _one_line_error(lambda: prepare(nn.Sequential(nn.Linear(4, 4))))
    assert msg.startswith("model Sequential ") and "VisionTransformer" in msg and "Eva" in msg
    assert "Sequential" in _one_line_error(lambda: adapter_for(nn.Sequential()))

    vit = VisionTransformer(**VIT_KW)
    vit.blocks[1] = ParallelScalingBlock(48, 3)
    msg = _one_line_error(lambda: prepare(vit))
    assert msg == ("blocks.1 is a timm ParallelScalingBlock, which vitq cannot quantize; "
                   "supported blocks: timm vision_transformer.Block")

    vit = VisionTransformer(**VIT_KW)
    vit.blocks[0] = nn.Identity()
    assert _one_line_error(lambda: reconstruction_blocks(vit)).startswith("blocks.0 is a torch Identity")

    post_norm = Eva(**EVA_KW, use_post_norm=True)
    assert "EvaBlockPostNorm" in _one_line_error(lambda: prepare(post_norm))
    rope_attn = Eva(**EVA_KW, attn_type="rope")
    assert "blocks.0.attn is a timm AttentionRope" in _one_line_error(lambda: prepare(rope_attn))
    assert "dynamic_img_size" in _one_line_error(lambda: prepare(Eva(**EVA_KW, dynamic_img_size=True)))


# --------------------------------------------------------------------------- Eva end to end

@torch.no_grad()
def test_eva_minmax_quantize_end_to_end() -> None:
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    errs = {}
    for a_bits in (8, 2):
        model = FAMILIES["eva02"]()
        ref = model(images)
        vitq.quantize(model, images, "minmax", w_bits=8, a_bits=a_bits, calib_size=8, progress=False)
        assert all(q.is_calibrated for _, q in iter_quantizers(model))
        errs[a_bits] = rel_err(model(images), ref)
    # 8 bits: ~1% (a mis-scaled or misplaced matmul quantizer gives tens of %); 2-bit activations
    # (matmul operands included) must hurt, or activations are not really quantized.
    assert errs[8] < 0.03, errs
    assert errs[2] > 10 * errs[8], errs


def test_eva_mse_recipe_and_saved_state_reload() -> None:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    model = FAMILIES["eva02"]()
    fast = dict(eq_n=8, search_rounds=0, max_search_tokens=128, max_search_samples=2)  # a smoke test, not a search
    vitq.quantize(model, images, "mse", w_bits=4, a_bits=4, calib_size=4, progress=False, calibration=fast)
    with torch.no_grad():
        logits = model(images)
    assert torch.isfinite(logits).all()
    # The RepQ fold gave the bias-free EVA qkv a bias: a rebuilt model needs it before loading.
    assert model.blocks[0].attn.qkv.bias is not None
    state = model.state_dict()
    fresh = build_model({"family": "eva", "arch_kwargs": EVA_KW}).eval()
    prepare(fresh, QuantSpec(**model.vitq_config["spec"]))
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)
    prepare_for_state_dict(fresh, state)
    fresh.load_state_dict(state)
    set_mode(fresh, QuantMode.QUANT)
    with torch.no_grad():
        assert torch.equal(fresh(images), logits)
