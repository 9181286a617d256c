"""timm building blocks shared by several families: MLP variants, the patch embedding, messages."""

from __future__ import annotations

import torch.nn as nn
from timm.layers import GluMlp, Mlp, PatchEmbed, SwiGLU

from ..errors import VitqError
from ..qmodules import QuantConv2d, QuantLinear
from ..quantizers import UniformQuantizer
from .spec import QuantSpec, block_linear, weight_quantizer

# The Linear children of each MLP class vitq quantizes, in forward order. GluMlp (packed SwiGLU /
# GeGLU) has one fc1 producing both halves; SwiGLU has separate gate / value projections.
MLP_LINEARS: dict[type[nn.Module], tuple[str, ...]] = {
    Mlp: ("fc1", "fc2"),
    GluMlp: ("fc1", "fc2"),
    SwiGLU: ("fc1_g", "fc1_x", "fc2"),
}
SUPPORTED_MLPS = "timm Mlp, GluMlp (packed SwiGLU), SwiGLU"


def describe(module: nn.Module) -> str:
    """'a timm ParallelScalingBlock' / 'a torch Identity' / 'a MyBlock', for error messages."""
    cls = type(module)
    origin = cls.__module__.split(".")[0]
    return f"a {origin} {cls.__name__}" if origin in ("timm", "torch") else f"a {cls.__name__}"


def unsupported_module(where: str, module: nn.Module, kind: str, supported: str) -> VitqError:
    """One-line error for a submodule vitq does not know, e.g. ``kind="blocks"``."""
    return VitqError(f"{where} is {describe(module)}, which vitq cannot quantize; supported {kind}: {supported}")


def check_mlp(mlp: nn.Module, where: str) -> None:
    if type(mlp) not in MLP_LINEARS:
        raise unsupported_module(where, mlp, "MLPs", SUPPORTED_MLPS)


def mlp_swaps(mlp: nn.Module, name: str, spec: QuantSpec) -> list[tuple[str, nn.Module]]:
    """QuantLinear replacements for every Linear of a (checked) MLP at ``name``."""
    out = []
    for child in MLP_LINEARS[type(mlp)]:
        layer = getattr(mlp, child)
        if not isinstance(layer, QuantLinear):
            out.append((f"{name}.{child}", block_linear(layer, f"{name}.{child}", spec)))
    return out


def mlp_fc1_fold_valid(mlp: nn.Module) -> bool:
    """True when the norm before the MLP feeds exactly one Linear (the RepQ fold edits that Linear).

    SwiGLU's norm feeds both fc1_g and fc1_x, so folding it into one of them would change the other.
    """
    return type(mlp) in (Mlp, GluMlp)


def check_patch_embed(model: nn.Module) -> None:
    pe = getattr(model, "patch_embed", None)
    if not isinstance(pe, PatchEmbed) or not isinstance(pe.proj, (nn.Conv2d, QuantConv2d)):
        raise VitqError(f"model {type(model).__name__}'s patch embedding is not a timm PatchEmbed with a Conv2d, "
                        "which vitq cannot quantize")


def patch_embed_swap(model: nn.Module, spec: QuantSpec) -> tuple[str, QuantConv2d]:
    """``patch_embed.proj`` as a QuantConv2d (optionally quantizing the image input at 8 bits)."""
    image_q = UniformQuantizer(8, granularity="tensor") if spec.quant_image_input else None
    conv = model.patch_embed.proj
    return "patch_embed.proj", QuantConv2d.from_float(conv, weight_quantizer(spec.patch_embed_w, spec), image_q)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def check_block(where: str, blk: nn.Module, block_cls: type, block_desc: str, attn_classes: tuple[type, ...],
                attn_desc: str) -> None:
    """One transformer block: exactly ``block_cls``, with an attention vitq knows and a known MLP."""
    if type(blk) is not block_cls:
        raise unsupported_module(where, blk, "blocks", block_desc)
    if type(blk.attn) not in attn_classes:
        raise unsupported_module(f"{where}.attn", blk.attn, "attention", attn_desc)
    check_mlp(blk.mlp, f"{where}.mlp")


def check_token_trunk(model: nn.Module, block_cls: type, block_desc: str, attn_classes: tuple[type, ...],
                      attn_desc: str) -> None:
    """A flat ``model.blocks`` trunk (ViT, EVA): no attention-pool head, at least one known block."""
    name = type(model).__name__
    if getattr(model, "attn_pool", None) is not None:
        raise VitqError(f"model {name} has an attention-pool head, which vitq cannot quantize: "
                        "use global_pool='token' or 'avg'")
    if len(model.blocks) == 0:
        raise VitqError(f"model {name} has no transformer blocks to quantize")
    for i, blk in enumerate(model.blocks):
        check_block(f"blocks.{i}", blk, block_cls, block_desc, attn_classes, attn_desc)


def attention_block_swaps(blocks: list[tuple[str, nn.Module]], quant_attention: type,
                          spec: QuantSpec) -> list[tuple[str, nn.Module]]:
    """Every block's attention -> ``quant_attention(attn, spec, name)`` and its MLP's Linears -> QuantLinear."""
    swaps: list[tuple[str, nn.Module]] = []
    for name, blk in blocks:
        swaps.append((f"{name}.attn", quant_attention(blk.attn, spec, f"{name}.attn")))
        swaps += mlp_swaps(blk.mlp, f"{name}.mlp", spec)
    return swaps


def token_block_prev_layernorm(model: nn.Module, name: str) -> nn.LayerNorm | None:
    """For a flat ``model.blocks`` trunk: ``blocks.i.attn.qkv`` -> ``norm1``, ``blocks.i.mlp.fc1`` -> ``norm2``
    (when the MLP has a single fc1, so the fold feeds one Linear); None otherwise."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or parts[3] not in ("qkv", "fc1"):
        return None
    blk = model.blocks[int(parts[1])]
    if parts[3] == "fc1" and not mlp_fc1_fold_valid(blk.mlp):
        return None
    norm = blk.norm1 if parts[3] == "qkv" else blk.norm2
    return norm if isinstance(norm, nn.LayerNorm) else None
