"""timm ``VisionTransformer`` family: ViT, DeiT, DeiT III (LayerScale), register tokens, avg pool,
and ``VisionTransformerDistilled`` (DeiT distilled, two heads).

Every block must be timm's ``vision_transformer.Block`` with timm's ``Attention`` and an MLP of
:data:`~vitq.adapters.layers.MLP_LINEARS`. ``prepare`` swaps (FIMA-Q, fimaq.md §1.2, §2.2):

* ``Attention`` -> :class:`QuantAttention` (same submodules plus ``matmul1`` = q @ kᵀ and
  ``matmul2`` = attn @ v);
* qkv, proj, the MLP Linears and the head(s) -> QuantLinear; ``patch_embed.proj`` -> QuantConv2d.

LayerNorms, LayerScale, softmax, GELU, residuals, embeddings and pooling stay FP.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import VitqError
from ..qmodules import QuantLinear
from .layers import attention_block_swaps, check_token_trunk, token_block_prev_layernorm
from .registry import ModelAdapter, register_adapter
from .spec import QuantSpec, attention_matmuls, block_linear


class QuantAttention(nn.Module):
    """timm ``Attention`` (ViT/DeiT) with quantizable matmuls.

    Mirrors ``timm.layers.attention.Attention.forward`` (unfused path) except that the
    softmax scale is applied AFTER ``matmul1`` as FIMA-Q does, so q reaches its quantizer
    unscaled. Parameter names are unchanged (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``).
    """

    def __init__(self, attn: Attention, spec: QuantSpec, name: str = "attn") -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise VitqError(f"{name}: gated timm Attention is not supported by vitq")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim, self.scale = attn.attn_dim, attn.scale
        self.fused_attn = attn.fused_attn  # kept for reference only; the math is always explicit
        self.qkv = block_linear(attn.qkv, f"{name}.qkv", spec)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.gate = None
        self.proj = block_linear(attn.proj, f"{name}.proj", spec)
        self.proj_drop = attn.proj_drop
        self.matmul1, self.matmul2 = attention_matmuls(spec, attn.num_heads)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)


class DistilledHeads(nn.Module):
    """Reconstruction view of DeiT-distilled's two classifiers (not registered in the model).

    Input: the final-norm token sequence ``(B, N, C)`` (the output of ``model.norm``, i.e. the
    input of ``forward_head``; capture it with a forward hook on ``model.norm``).
    Output: ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``, the eval-mode logits.
    """

    source = "norm"  # module whose output is this block's input

    def __init__(self, model: VisionTransformerDistilled) -> None:
        super().__init__()
        self.head, self.head_dist, self.head_drop = model.head, model.head_dist, model.head_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_tok, dist_tok = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        return (self.head(cls_tok) + self.head_dist(dist_tok)) / 2


@register_adapter(VisionTransformer)
class VitAdapter(ModelAdapter):
    """timm VisionTransformer built from ``Block`` (ViT, DeiT, DeiT III, register tokens, avg pool).

    Reconstruction blocks: ``patch_embed`` (image -> tokens before cls/pos embedding),
    ``blocks.i`` (tokens -> tokens), ``head`` (pooled, fc-normed feature (B, C) -> logits).
    """

    family = "vit"
    description = "timm VisionTransformer (ViT/DeiT/DeiT III)"

    def check(self, model: nn.Module) -> None:
        check_token_trunk(model, Block, "timm vision_transformer.Block", (Attention, QuantAttention), "timm Attention")
        super().check(model)

    def block_swaps(self, model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Module]]:
        return attention_block_swaps([(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], QuantAttention, spec)

    def reconstruction_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks = [("patch_embed", model.patch_embed)]
        blocks += [(f"blocks.{i}", blk) for i, blk in enumerate(model.blocks)]
        blocks += [(name, model.get_submodule(name)) for name in self.head_block_names(model)]
        return blocks

    def forward_after(self, model: nn.Module, block_name: str, y: torch.Tensor) -> torch.Tensor:
        # Mirrors timm's forward_features / forward_head (eval mode, no masks).
        if block_name in self.head_block_names(model):
            return y
        if block_name == "patch_embed":
            x, start = model.norm_pre(model.patch_drop(model._pos_embed(y))), 0
        else:
            x, start = y, int(block_name.split(".")[1]) + 1
        for blk in model.blocks[start:]:
            x = blk(x)
        return model.forward_head(model.norm(x))

    def prev_layernorm(self, model: nn.Module, name: str) -> Optional[nn.LayerNorm]:
        # blocks.i.attn.qkv -> norm1; blocks.i.mlp.fc1 -> norm2 (when the MLP has a single fc1).
        return token_block_prev_layernorm(model, name)


@register_adapter(VisionTransformerDistilled)
class DistilledAdapter(VitAdapter):
    """DeiT distilled: the two classifiers form one reconstruction block ``head+head_dist``
    (a :class:`DistilledHeads` view fed by the output of ``model.norm``)."""

    family = "deit_distilled"
    description = "timm VisionTransformerDistilled (DeiT distilled)"

    def head_linear_names(self, model: nn.Module) -> list[str]:
        return [n for n in ("head", "head_dist") if isinstance(model.get_submodule(n), (nn.Linear, QuantLinear))]

    def head_block_names(self, model: nn.Module) -> tuple[str, ...]:
        return ("head+head_dist",) if self.head_linear_names(model) else ()

    def reconstruction_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks = [("patch_embed", model.patch_embed)] + [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        if self.head_block_names(model):
            blocks.append(("head+head_dist", DistilledHeads(model)))
        return blocks

    def block_input_source(self, model: nn.Module, block_name: str, block: nn.Module) -> tuple[nn.Module, bool]:
        if block_name == "head+head_dist":
            return model.norm, True
        return super().block_input_source(model, block_name, block)
