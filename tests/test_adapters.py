"""timm adapters on tiny random-weight models (offline, pretrained=False)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import VisionTransformer

from conftest import TINY_SWIN, TINY_VIT, minmax_calibrate, rel_err, tiny_swin, tiny_vit
from vitq.adapters import (
    DistilledHeads,
    ModelAdapter,
    QuantAttention,
    QuantSpec,
    QuantWindowAttention,
    adapter_for,
    architecture_of,
    block_input_source,
    build_model,
    is_head_block,
    layer_role,
    prepare,
    prepare_for_state_dict,
    prev_layernorm,
    reconstruction_blocks,
    register_adapter,
)
from vitq.adapters import registry as adapter_registry
from vitq.adapters.vit import VitAdapter
from vitq.errors import VitqError
from vitq.qmodules import QuantConv2d, QuantLinear, QuantMode, iter_quantizers, quant_modules, set_mode
from vitq.quantizers import SOFTMAX_QUANTIZERS, LogQuantizer, UniformQuantizer

VIT_KW, SWIN_KW = TINY_VIT, TINY_SWIN


def _vit(fused: bool = True) -> VisionTransformer:
    m = tiny_vit(0)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    return m


def _deit() -> VisionTransformerDistilled:
    return tiny_vit(1, distilled=True)


def _swin(fused: bool = False) -> SwinTransformer:
    m = tiny_swin(2)
    for mod in m.modules():
        if hasattr(mod, "relative_position_bias_table"):
            mod.fused_attn = fused
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


BUILDERS = {
    "vit_fused": lambda: _vit(True),
    "vit_unfused": lambda: _vit(False),
    "deit_distilled": _deit,
    "swin": lambda: _swin(False),
    "swin_fused": lambda: _swin(True),
}


@pytest.mark.parametrize("arch", list(BUILDERS))
@torch.no_grad()
def test_float_mode_matches_timm(arch: str, images: torch.Tensor) -> None:
    model = BUILDERS[arch]()
    ref = copy.deepcopy(model)
    orig_keys = set(model.state_dict())
    prepare(model, QuantSpec(w_bits=4, a_bits=4))
    assert all(m.mode == QuantMode.FLOAT for _, m in quant_modules(model))
    assert torch.allclose(model(images), ref(images), atol=1e-5, rtol=0)
    assert orig_keys <= set(model.state_dict())
    # Observing does not change the float output either.
    set_mode(model, "observe")
    assert torch.allclose(model(images), ref(images), atol=1e-5, rtol=0)


def test_vit_structure_and_swapped_modules() -> None:
    model = prepare(_vit(True), QuantSpec(w_bits=4, a_bits=4, head_w_bits=8))
    attn = model.blocks[0].attn
    assert isinstance(attn, QuantAttention)
    for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "matmul1", "matmul2"):
        assert hasattr(attn, name)
    assert isinstance(model.blocks[1].mlp.fc1, QuantLinear) and isinstance(model.blocks[1].mlp.fc2, QuantLinear)
    assert isinstance(model.patch_embed.proj, QuantConv2d) and model.patch_embed.proj.a_quantizer is None
    assert model.head.w_quantizer.bits == 8 and model.head.a_quantizer.bits == 4
    assert attn.qkv.w_quantizer.bits == 4 and attn.qkv.w_quantizer.granularity == "channel"
    assert attn.matmul1.a_quantizer.granularity == "head" and attn.matmul2.a_quantizer.axis == 1
    names = [n for n, _ in quant_modules(model)]
    assert names[0] == "patch_embed.proj" and names[-1] == "head"
    assert len(names) == 1 + 2 * 6 + 1  # patch_embed, per block qkv/matmul1/matmul2/proj/fc1/fc2, head
    assert {layer_role(n) for n in names} == {"patch_embed", "qkv", "matmul1", "matmul2", "proj", "fc1",
                                              "fc2", "head"}
    assert prev_layernorm(model, "blocks.1.attn.qkv") is model.blocks[1].norm1
    assert prev_layernorm(model, "blocks.0.mlp.fc1") is model.blocks[0].norm2
    assert prev_layernorm(model, "blocks.0.mlp.fc2") is None
    blocks = reconstruction_blocks(model)
    assert [n for n, _ in blocks] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert blocks[-1][1] is model.head


@torch.no_grad()
def test_deit_distilled_heads_block(images: torch.Tensor) -> None:
    model = prepare(_deit())
    assert isinstance(model.head, QuantLinear) and isinstance(model.head_dist, QuantLinear)
    blocks = reconstruction_blocks(model)
    assert [n for n, _ in blocks] == ["patch_embed", "blocks.0", "blocks.1", "head+head_dist"]
    feats = model.forward_features(images)
    assert torch.allclose(blocks[-1][1](feats), model(images), atol=1e-6)
    assert layer_role("head_dist") == "head"


def test_swin_structure_and_blocks() -> None:
    model = prepare(_swin(), QuantSpec(w_bits=4, a_bits=4, softmax_quantizer="log2"))
    swin_blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    assert any(any(b.shift_size) and b.attn_mask is not None for b in swin_blocks), "no shifted block"
    assert all(isinstance(b.attn, QuantWindowAttention) for b in swin_blocks)
    attn = swin_blocks[1].attn
    assert isinstance(attn.matmul2.a_quantizer, LogQuantizer)
    assert isinstance(attn.matmul2.b_quantizer, UniformQuantizer)
    red = model.layers[1].downsample.reduction
    assert isinstance(red, QuantLinear) and isinstance(model.head.fc, QuantLinear)
    assert layer_role("layers.1.downsample.reduction") == "reduction"
    assert layer_role("head.fc") == "head"
    assert prev_layernorm(model, "layers.1.downsample.reduction") is model.layers[1].downsample.norm
    names = [n for n, _ in reconstruction_blocks(model)]
    assert names == ["patch_embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample",
                     "layers.1.blocks.0", "layers.1.blocks.1", "head"]
    assert model.get_submodule("head") is dict(reconstruction_blocks(model))["head"]


@pytest.mark.parametrize("arch", ["vit_unfused", "deit_distilled", "swin"])
@torch.no_grad()
def test_minmax_quant_error_8bit_vs_2bit(arch: str, images: torch.Tensor) -> None:
    errs = {}
    for bits in (8, 2):
        model = BUILDERS[arch]()
        ref = model(images)
        prepare(model, QuantSpec(w_bits=bits, a_bits=bits))
        minmax_calibrate(model, images)
        errs[bits] = rel_err(model(images), ref)
    assert errs[8] < 0.05, errs
    assert errs[2] > 0.3 and errs[2] > 10 * errs[8], errs


@torch.no_grad()
def test_prepared_state_dict_round_trip(images: torch.Tensor) -> None:
    model = prepare(_vit(False), QuantSpec(w_bits=4, a_bits=4, act_granularity="token"))
    minmax_calibrate(model, images)
    assert model.blocks[0].mlp.fc2.a_quantizer.scale.shape == (1, 17, 1)  # 16 patches + cls
    sd = model.state_dict()
    fresh = prepare(_vit(False), QuantSpec(w_bits=4, a_bits=4, act_granularity="token"))
    fresh.load_state_dict(sd)
    set_mode(fresh, "quant")
    assert torch.equal(fresh(images), model(images))


def test_spec_validation_and_unsupported_models() -> None:
    with pytest.raises(VitqError, match=r"^w_bits must be between 2 and 8 \(or 16/32 for off\), got 9$"):
        QuantSpec(w_bits=9)
    with pytest.raises(VitqError, match="softmax_quantizer"):
        QuantSpec(softmax_quantizer="log3")
    with pytest.raises(VitqError, match=r"^model Sequential is not a model family vitq can quantize; supported: "
                                        r"timm VisionTransformer .*, timm SwinTransformer, timm Eva"):
        prepare(nn.Sequential(nn.Linear(4, 4)))
    model = prepare(_vit())
    with pytest.raises(VitqError, match="already prepared"):
        prepare(model)


@torch.no_grad()
def test_off_bits_leave_slots_empty(images: torch.Tensor) -> None:
    model = prepare(_vit(), QuantSpec(w_bits=4, a_bits=None, head_w_bits=32))
    assert model.blocks[0].attn.qkv.a_quantizer is None and model.blocks[0].attn.matmul1.a_quantizer is None
    assert model.head.w_quantizer is None and model.blocks[0].mlp.fc1.w_quantizer.bits == 4


def test_block_gradients_reach_activation_scales(images: torch.Tensor) -> None:
    # Reconstruction trains activation scales through round_ste: every one must get a gradient.
    model = prepare(_vit(False), QuantSpec(w_bits=4, a_bits=4, quant_image_input=True))
    assert isinstance(model.patch_embed.proj.a_quantizer, UniformQuantizer)
    with torch.no_grad():
        minmax_calibrate(model, images)
    block = dict(reconstruction_blocks(model))["blocks.0"]
    act_qs = [q for n, q in iter_quantizers(block) if not n.endswith("w_quantizer")]
    assert len(act_qs) == 8  # qkv, proj, fc1, fc2 inputs + both operands of both matmuls
    for q in act_qs:
        q.scale.requires_grad_(True)
        q.drop_prob = 0.5
    block.train()
    block(torch.randn(2, 17, 48)).pow(2).sum().backward()
    assert all(q.scale.grad is not None and q.scale.grad.abs().sum() > 0 for q in act_qs)


# --------------------------------------------------------------------------- registry and new API

def test_adapter_lookup_follows_the_mro(monkeypatch: pytest.MonkeyPatch) -> None:
    assert adapter_for(_vit()).family == "vit"
    assert adapter_for(_deit()).family == "deit_distilled"  # nearest registered class wins
    assert adapter_for(_swin()).family == "swin"
    monkeypatch.setattr(adapter_registry, "_ADAPTERS", dict(adapter_registry._ADAPTERS))

    class MyViT(VisionTransformer):
        pass

    class MyViTChild(MyViT):
        pass

    @register_adapter(MyViT)
    class MyAdapter(VitAdapter):
        family = "my_vit"
        description = "my ViT"

    adapter = adapter_for(MyViTChild(**VIT_KW))
    assert isinstance(adapter, MyAdapter) and adapter.model_cls is MyViT
    instance = register_adapter(MyViTChild, VitAdapter())
    assert isinstance(instance, ModelAdapter) and adapter_for(MyViTChild(**VIT_KW)) is instance
    with pytest.raises(VitqError, match="supported: .*my ViT"):
        adapter_for(nn.Linear(2, 2))


def test_block_input_source_and_head_blocks() -> None:
    vit = prepare(_vit())
    blk = vit.blocks[1]
    assert block_input_source(vit, "blocks.1", blk) == (blk, False)
    assert is_head_block(vit, "head") and not is_head_block(vit, "blocks.1")
    deit = prepare(_deit())
    name, heads = reconstruction_blocks(deit)[-1]
    assert isinstance(heads, DistilledHeads)
    assert block_input_source(deit, name, heads) == (deit.norm, True)
    assert is_head_block(deit, "head+head_dist") and not is_head_block(deit, "head")
    swin = prepare(_swin())
    assert block_input_source(swin, "layers.1.downsample", swin.layers[1].downsample) == \
        (swin.layers[1].downsample, False)
    assert is_head_block(swin, "head")
    headless = VisionTransformer(**{**VIT_KW, "num_classes": 0})
    assert [n for n, _ in reconstruction_blocks(headless)][-1] == "blocks.1" and not is_head_block(headless, "head")


def test_architecture_round_trip() -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)
    arch = architecture_of(model)
    assert arch == {"timm_name": "vit_tiny_patch16_224", "arch_kwargs": {"num_classes": 10, "img_size": (32, 32)}}
    rebuilt = build_model(arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    vit = _vit()
    vit.pretrained_cfg = {"vitq_arch_kwargs": dict(VIT_KW)}
    assert architecture_of(vit) == {"arch_kwargs": VIT_KW, "family": "vit"}
    swin = build_model({"family": "swin", "arch_kwargs": SWIN_KW})
    swin.pretrained_cfg = {"vitq_arch_kwargs": dict(SWIN_KW), "vitq_family": "swin"}
    assert type(build_model(architecture_of(swin))) is SwinTransformer
    assert type(build_model(architecture_of(vit))) is VisionTransformer
    assert type(build_model({"family": "swin", "arch_kwargs": SWIN_KW})) is SwinTransformer
    with pytest.raises(VitqError, match="no pretrained_cfg"):
        architecture_of(nn.Linear(2, 2))
    with pytest.raises(VitqError, match="unknown model family 'resnet'"):
        build_model({"family": "resnet", "arch_kwargs": {}})
    with pytest.raises(VitqError, match="unknown timm model"):
        build_model({"timm_name": "no_such_model_xyz"})


@torch.no_grad()
def test_prepare_for_state_dict_recreates_folded_biases(images: torch.Tensor) -> None:
    model = prepare(_swin(), QuantSpec(w_bits=4, a_bits=4))
    red = model.layers[1].downsample.reduction
    assert red.bias is None
    red.bias = nn.Parameter(torch.randn(red.out_features))  # what the RepQ fold does
    minmax_calibrate(model, images)
    state = model.state_dict()
    fresh = prepare(_swin(), QuantSpec(w_bits=4, a_bits=4))
    with pytest.raises(RuntimeError, match="reduction.bias"):
        fresh.load_state_dict(state)
    prepare_for_state_dict(fresh, {**state, "layers.1.downsample.reduction.side.up.bias": torch.zeros(3)})
    fresh.load_state_dict(state)
    set_mode(fresh, "quant")
    assert torch.equal(fresh(images), model(images))


def test_softmax_quantizer_comes_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(bits: int, granularity: str, num_heads: int, options: dict) -> UniformQuantizer:
        calls.append((bits, granularity, num_heads, options))
        return UniformQuantizer(bits)

    monkeypatch.setitem(SOFTMAX_QUANTIZERS, "fake", fake)
    spec = QuantSpec(w_bits=4, a_bits=6, softmax_quantizer="fake", softmax_options={"below": "zero"},
                     matmul_granularity="tensor")
    model = prepare(_vit(), spec)
    assert calls == [(6, "tensor", 3, {"below": "zero"})] * 2
    assert model.blocks[0].attn.matmul2.a_quantizer.granularity == "tensor"
    with pytest.raises(VitqError, match="softmax_quantizer must be one of .*fake.*got 'dfq2'"):
        QuantSpec(softmax_quantizer="dfq2")
    with pytest.raises(VitqError, match="softmax_options must be a dict"):
        QuantSpec(softmax_options=[("a", 1)])
