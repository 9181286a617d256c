"""timm ``SwinTransformer`` family (Swin v1, with patch merging).

``prepare`` swaps every ``WindowAttention`` for :class:`QuantWindowAttention` (same submodules
plus ``matmul1`` = q @ kᵀ and ``matmul2`` = attn @ v) and qkv, proj, fc1, fc2,
``PatchMerging.reduction`` and ``head.fc`` for QuantLinear; ``patch_embed.proj`` -> QuantConv2d.
The relative-position bias, the shift mask, LayerNorms and pooling stay FP.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention

from ..qmodules import QuantLinear
from .layers import check_block, mlp_fc1_fold_valid, mlp_swaps, unsupported_module
from .registry import ModelAdapter, register_adapter
from .spec import QuantSpec, attention_matmuls, block_linear, quant_linear


class QuantWindowAttention(nn.Module):
    """timm Swin ``WindowAttention`` with quantizable matmuls.

    Mirrors ``WindowAttention.forward`` (unfused path): q is scaled BEFORE ``matmul1``, then
    timm's relative-position bias and the (0/-100) shift mask are added, softmax, ``matmul2``.
    Keeps ``relative_position_bias_table`` (parameter) and ``relative_position_index``
    (non-persistent buffer) under their timm names.
    """

    # Reuse timm's own bias lookup and window-resize logic (they only touch attributes we keep).
    _get_rel_pos_bias = WindowAttention._get_rel_pos_bias
    _init_buffers = WindowAttention._init_buffers
    set_window_size = WindowAttention.set_window_size
    init_non_persistent_buffers = WindowAttention.init_non_persistent_buffers

    def __init__(self, attn: WindowAttention, spec: QuantSpec, name: str = "attn") -> None:
        super().__init__()
        self.dim, self.window_size, self.window_area = attn.dim, attn.window_size, attn.window_area
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.fused_attn = attn.fused_attn  # reference only
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = block_linear(attn.qkv, f"{name}.qkv", spec)
        self.attn_drop = attn.attn_drop
        self.proj = block_linear(attn.proj, f"{name}.proj", spec)
        self.proj_drop = attn.proj_drop
        self.softmax = attn.softmax
        self.matmul1, self.matmul2 = attention_matmuls(spec, attn.num_heads)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = self.matmul1(q, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        return self.proj_drop(x)


@register_adapter(SwinTransformer)
class SwinAdapter(ModelAdapter):
    """timm SwinTransformer.

    Reconstruction blocks, in forward order: ``patch_embed`` (image -> NHWC ``(B, H/p, W/p, C)``),
    per stage s its ``layers.s.downsample`` (PatchMerging, stages s >= 1) then its
    ``layers.s.blocks.j`` (``(B, H, W, C)`` -> same), and ``head`` (the ``ClassifierHead``:
    post-norm ``(B, H, W, C)`` -> logits).
    """

    family = "swin"
    description = "timm SwinTransformer"

    def check(self, model: nn.Module) -> None:
        for s, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, (PatchMerging, nn.Identity)):
                raise unsupported_module(f"layers.{s}.downsample", stage.downsample, "downsampling",
                                         "timm PatchMerging")
            for j, blk in enumerate(stage.blocks):
                check_block(f"layers.{s}.blocks.{j}", blk, SwinTransformerBlock, "timm SwinTransformerBlock",
                            (WindowAttention, QuantWindowAttention), "timm WindowAttention")
        super().check(model)

    def block_swaps(self, model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Module]]:
        swaps: list[tuple[str, nn.Module]] = []
        for name, m in self._trunk(model):
            if isinstance(m, PatchMerging):
                # The reduction input is 4-D (B, H/2, W/2, 4C): keep it per tensor (as FIMA-Q does).
                swaps.append((f"{name}.reduction", quant_linear(m.reduction, f"{name}.reduction", spec.w_bits,
                                                                spec.a_bits, spec, force_tensor_act=True)))
            else:
                swaps.append((f"{name}.attn", QuantWindowAttention(m.attn, spec, f"{name}.attn")))
                swaps += mlp_swaps(m.mlp, f"{name}.mlp", spec)
        return swaps

    def head_linear_names(self, model: nn.Module) -> list[str]:
        return [n for n in ("head.fc",) if isinstance(model.get_submodule(n), (nn.Linear, QuantLinear))]

    def head_block_names(self, model: nn.Module) -> tuple[str, ...]:
        return ("head",)  # the ClassifierHead (pool + fc) is a block even when fc is Identity

    @staticmethod
    def _trunk(model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Patch mergings and Swin blocks in forward order (a stage downsamples first)."""
        out: list[tuple[str, nn.Module]] = []
        for s, stage in enumerate(model.layers):
            if isinstance(stage.downsample, PatchMerging):
                out.append((f"layers.{s}.downsample", stage.downsample))
            out += [(f"layers.{s}.blocks.{j}", blk) for j, blk in enumerate(stage.blocks)]
        return out

    def reconstruction_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("patch_embed", model.patch_embed)] + self._trunk(model) + [("head", model.head)]

    def forward_after(self, model: nn.Module, block_name: str, y: torch.Tensor) -> torch.Tensor:
        if block_name == "head":
            return y
        names = [name for name, _ in self._trunk(model)]
        start = 0 if block_name == "patch_embed" else names.index(block_name) + 1
        x = y
        for _, module in self._trunk(model)[start:]:
            x = module(x)
        return model.forward_head(model.norm(x))

    def prev_layernorm(self, model: nn.Module, name: str) -> Optional[nn.LayerNorm]:
        # qkv -> the block's norm1; fc1 -> norm2; reduction -> PatchMerging.norm.
        parts = name.split(".")
        last = parts[-1]
        if last == "reduction":
            norm = getattr(model.get_submodule(".".join(parts[:-1])), "norm", None)
        elif last in ("qkv", "fc1") and len(parts) == 6:  # layers.s.blocks.j.(attn|mlp).layer
            blk = model.get_submodule(".".join(parts[:-2]))
            if last == "fc1" and not mlp_fc1_fold_valid(blk.mlp):
                return None
            norm = blk.norm1 if last == "qkv" else blk.norm2
        else:
            return None
        return norm if isinstance(norm, nn.LayerNorm) else None
