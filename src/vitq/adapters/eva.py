"""timm ``Eva`` family (EVA / EVA-02: rotary position embedding, SwiGLU MLP, LayerScale).

Supported: ``EvaBlock`` (pre-norm) with ``EvaAttention`` (fused ``qkv`` with EVA's separate
q/v biases, or separate ``q_proj`` / ``k_proj`` / ``v_proj``; no gate) and a timm ``Mlp``,
``GluMlp`` (packed SwiGLU, EVA-02 without ``scale_mlp``) or ``SwiGLU`` (``fc1_g`` / ``fc1_x``,
EVA-02 with ``scale_mlp``); fixed image size (no ``dynamic_img_size``); no attention pool.

``prepare`` swaps ``EvaAttention`` for :class:`QuantEvaAttention` (q @ kᵀ -> ``matmul1``,
attn @ v -> ``matmul2``, rotary embedding applied as timm does), every MLP Linear and the head for
QuantLinear, ``patch_embed.proj`` for QuantConv2d. Norms, LayerScale (``gamma_1/2``), the rotary
embedding, SiLU gating, residuals and pooling stay FP.

Roles (:func:`vitq.adapters.layer_role`): ``attn.qkv`` and ``attn.q_proj/k_proj/v_proj`` -> qkv;
``attn.proj`` -> proj; ``mlp.fc1`` (GluMlp: both halves) and SwiGLU's ``mlp.fc1_g/fc1_x`` -> fc1;
``mlp.fc2`` -> fc2; ``head`` -> head; ``attn.matmul1/2`` -> matmul1/2.

RepQ LayerNorm fold (:func:`vitq.adapters.prev_layernorm`): ``norm1`` for the fused ``qkv`` and
``norm2`` for a single ``fc1``; None for q/k/v_proj and SwiGLU (one norm feeds several Linears).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask
from timm.models.eva import Eva, EvaAttention, EvaBlock

from ..errors import VitqError
from .layers import attention_block_swaps, check_token_trunk, token_block_prev_layernorm
from .registry import ModelAdapter, register_adapter
from .spec import QuantSpec, attention_matmuls, block_linear


class QuantEvaAttention(nn.Module):
    """timm ``EvaAttention`` with quantizable matmuls.

    Mirrors ``EvaAttention.forward`` (unfused path) except that the softmax scale is applied AFTER
    ``matmul1`` (as :class:`~vitq.adapters.QuantAttention` does), so q reaches its quantizer
    unscaled. Parameter and buffer names are unchanged (``qkv``, ``q_bias``, ``k_bias``,
    ``v_bias`` or ``q_proj/k_proj/v_proj``, ``q_norm``, ``k_norm``, ``norm``, ``proj``).
    """

    # timm's meta-device init of the (zero, non-persistent) k_bias buffer.
    _init_buffers = EvaAttention._init_buffers
    init_non_persistent_buffers = EvaAttention.init_non_persistent_buffers

    def __init__(self, attn: EvaAttention, spec: QuantSpec, name: str = "attn") -> None:
        super().__init__()
        if attn.gate is not None:
            raise VitqError(f"{name}: gated EvaAttention is not supported by vitq")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.num_prefix_tokens = attn.num_prefix_tokens
        self.rotate_half = getattr(attn, "rotate_half", False)
        self.fused_attn = attn.fused_attn  # kept for reference only; the math is always explicit
        # Registered in forward order, so quant_modules() lists them as they run.
        if attn.qkv is not None:
            self.qkv = block_linear(attn.qkv, f"{name}.qkv", spec)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.qkv = None
            self.q_proj = block_linear(attn.q_proj, f"{name}.q_proj", spec)
            self.k_proj = block_linear(attn.k_proj, f"{name}.k_proj", spec)
            self.v_proj = block_linear(attn.v_proj, f"{name}.v_proj", spec)
        self.q_bias, self.v_bias = attn.q_bias, attn.v_bias
        self.register_buffer("k_bias", attn.k_bias, persistent=False)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.matmul1, self.matmul2 = attention_matmuls(spec, attn.num_heads)
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.gate = None
        self.proj = block_linear(attn.proj, f"{name}.proj", spec)
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        if self.qkv is not None:
            qkv = self.qkv(x)
            if self.q_bias is not None:
                # EVA keeps the q/v biases outside the Linear (k has none); adding them after the
                # quantized product keeps the qkv weight's quantization as timm's F.linear sees it.
                qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            # Prefix (cls / register) tokens get no rotary embedding, exactly as in timm.
            npt = self.num_prefix_tokens
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=self.rotate_half)],
                          dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=self.rotate_half)],
                          dim=2).type_as(v)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)


def rotary_embedding(model: Eva, index: int) -> Optional[torch.Tensor]:
    """The rotary embedding ``Eva.forward_features`` hands block ``index`` (fixed image size, eval)."""
    if model.rope is None:
        return None
    if hasattr(model.rope, "feat_shape"):
        rope = model.rope.get_embed()
    else:  # RoPE modules without a feat_shape (MRoPE) need the grid shape
        rope = model.rope.get_embed(shape=model.patch_embed.grid_size)
    return rope[index] if getattr(model, "rope_mixed", False) else rope


class EvaBlockView(nn.Module):
    """Reconstruction view of ``blocks.i``: ``view(x) = block(x, rope=<the model's rotary embedding>)``.

    An EvaBlock needs the model's rotary embedding as an argument, so it cannot run on its input
    alone. The view is not registered in the model; it holds the block's own submodules and
    LayerScale parameters under the block's names (``f"blocks.{i}.{sub}"`` of its named_modules are
    model names) and runs timm's own ``EvaBlock.forward``. Hooks on ``model.blocks[i]`` still see
    the block's input (first positional argument) and output.
    """

    def __init__(self, model: Eva, index: int) -> None:
        super().__init__()
        block = model.blocks[index]
        for name, child in block.named_children():
            self.add_module(name, child)
        self.gamma_1, self.gamma_2 = block.gamma_1, block.gamma_2
        self.training = block.training
        self._block_forward = type(block).forward
        # A closure, not a submodule: the rope belongs to the model and must not train with the block.
        self._rope = lambda: rotary_embedding(model, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._block_forward(self, x, rope=self._rope())


@register_adapter(Eva)
class EvaAdapter(ModelAdapter):
    """timm Eva (EVA-02).

    Reconstruction blocks: ``patch_embed`` (image -> tokens before cls/pos embedding),
    ``blocks.i`` (an :class:`EvaBlockView`, tokens -> tokens) and ``head`` (pooled, fc-normed
    feature (B, C) -> logits).
    """

    family = "eva"
    description = "timm Eva (EVA-02)"
    layer_roles = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv"}

    def check(self, model: nn.Module) -> None:
        name = type(model).__name__
        if model.dynamic_img_size:
            raise VitqError(f"model {name} has dynamic_img_size=True, which vitq cannot quantize: "
                            "create it with dynamic_img_size=False")
        check_token_trunk(model, EvaBlock, "timm EvaBlock", (EvaAttention, QuantEvaAttention), "timm EvaAttention")
        super().check(model)

    def block_swaps(self, model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Module]]:
        return attention_block_swaps([(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], QuantEvaAttention,
                                     spec)

    def reconstruction_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks: list[tuple[str, nn.Module]] = [("patch_embed", model.patch_embed)]
        blocks += [(f"blocks.{i}", EvaBlockView(model, i)) for i in range(len(model.blocks))]
        blocks += [(name, model.get_submodule(name)) for name in self.head_block_names(model)]
        return blocks

    def forward_after(self, model: nn.Module, block_name: str, y: torch.Tensor) -> torch.Tensor:
        # Mirrors Eva.forward_features / forward_head (eval mode, no masks).
        if block_name in self.head_block_names(model):
            return y
        if block_name == "patch_embed":
            x, _ = model._pos_embed(y)
            x, start = model.norm_pre(x), 0
        else:
            x, start = y, int(block_name.split(".")[1]) + 1
        for i in range(start, len(model.blocks)):
            x = model.blocks[i](x, rope=rotary_embedding(model, i))
        return model.forward_head(model.norm(x))

    def prev_layernorm(self, model: nn.Module, name: str) -> Optional[nn.LayerNorm]:
        return token_block_prev_layernorm(model, name)
