"""timm adapters: the only module that knows timm internals (timm 1.0.x).

:func:`prepare` swaps, in place, the modules of a timm ``VisionTransformer`` (ViT, DeiT,
``VisionTransformerDistilled``) or ``SwinTransformer`` for quant modules, following what
FIMA-Q wraps (research note fimaq.md §1.2, §2.2):

* every ``Attention`` -> :class:`QuantAttention`, every ``WindowAttention`` ->
  :class:`QuantWindowAttention`: same submodules and parameter names plus ``matmul1``
  (q @ kᵀ) and ``matmul2`` (attn @ v);
* qkv, proj, fc1, fc2, Swin ``PatchMerging.reduction`` and the classifier head(s) ->
  :class:`~vitq.qmodules.QuantLinear`; the patch-embedding conv -> :class:`~vitq.qmodules.QuantConv2d`.

LayerNorms, softmax, GELU, residual adds, embeddings, the relative-position bias and pooling
stay FP. All quant modules start in ``QuantMode.FLOAT``, where the prepared model computes
the same logits as the original (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
)
from timm.models.vision_transformer import Block, VisionTransformer

from .errors import VitqError
from .qmodules import QuantConv2d, QuantLinear, QuantMatMul, QuantModule
from .quantizers import LogQuantizer, UniformQuantizer, bits_enabled, validate_bits

SUPPORTED = "timm VisionTransformer (ViT/DeiT), VisionTransformerDistilled (DeiT distilled), SwinTransformer"
SOFTMAX_QUANTIZERS = ("uniform", "log2", "logsqrt2", "dfq")
ROLES = ("qkv", "proj", "fc1", "fc2", "reduction", "head", "patch_embed", "matmul1", "matmul2")


@dataclass
class QuantSpec:
    """Bit widths and granularities for :func:`prepare`.

    Bits: 2..8, or None/16/32 for "off". ``head_*_bits``/``patch_embed_w_bits`` of None mean
    "same as w_bits/a_bits". ``quant_image_input`` adds an 8-bit per-tensor quantizer on the
    image (FIMA-Q's nominal value; FIMA-Q itself leaves the image FP).
    """

    w_bits: Optional[int] = 4
    a_bits: Optional[int] = 4
    head_w_bits: Optional[int] = None
    head_a_bits: Optional[int] = None
    patch_embed_w_bits: Optional[int] = None
    quant_image_input: bool = False
    softmax_quantizer: str = "uniform"   # "uniform" | "log2" | "logsqrt2" | "dfq" (AIQViT)
    dfq_granularity: str = "layer"       # DFQ: one interval per layer, or per "head"
    dfq_below: str = "clip"              # DFQ: values below b1 -> b1 ("clip") or exact 0 ("zero")
    matmul_granularity: str = "head"     # "head" | "tensor"
    act_granularity: str = "tensor"      # "tensor" | "token" | "channel" (linear inputs)
    weight_granularity: str = "channel"  # "channel" | "tensor"

    def __post_init__(self) -> None:
        for field in ("w_bits", "a_bits", "head_w_bits", "head_a_bits", "patch_embed_w_bits"):
            validate_bits(getattr(self, field), field)
        _check_choice("softmax_quantizer", self.softmax_quantizer, SOFTMAX_QUANTIZERS)
        _check_choice("matmul_granularity", self.matmul_granularity, ("head", "tensor"))
        _check_choice("act_granularity", self.act_granularity, ("tensor", "token", "channel"))
        _check_choice("weight_granularity", self.weight_granularity, ("channel", "tensor"))

    # Resolved bit widths (None overrides fall back to the global ones).
    @property
    def head_w(self) -> Optional[int]:
        return self.w_bits if self.head_w_bits is None else self.head_w_bits

    @property
    def head_a(self) -> Optional[int]:
        return self.a_bits if self.head_a_bits is None else self.head_a_bits

    @property
    def patch_embed_w(self) -> Optional[int]:
        return self.w_bits if self.patch_embed_w_bits is None else self.patch_embed_w_bits


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise VitqError(f"{field} must be one of {', '.join(choices)}, got {value!r}")


# --------------------------------------------------------------------------- quantizer factories
# A quantizer whose bits are "off" is not created at all (slot None), so calibration code
# never has to skip identity quantizers.

def _weight_q(bits: Optional[int], spec: QuantSpec) -> Optional[UniformQuantizer]:
    if not bits_enabled(bits):
        return None
    # axis 0 = output rows of a Linear weight / output channels of a Conv2d weight.
    return UniformQuantizer(bits, symmetric=False, granularity=spec.weight_granularity, axis=0)


def _linear_act_q(bits: Optional[int], spec: QuantSpec, force_tensor: bool = False) -> Optional[UniformQuantizer]:
    if not bits_enabled(bits):
        return None
    gran = "tensor" if force_tensor else spec.act_granularity
    # token: dim 1 of (B, N, C); channel: the last (feature) dim.
    axis = {"tensor": None, "token": 1, "channel": -1}[gran]
    return UniformQuantizer(bits, symmetric=False, granularity=gran, axis=axis)


def _matmul_q(bits: Optional[int], spec: QuantSpec, post_softmax: bool = False, num_heads: Optional[int] = None):
    if not bits_enabled(bits):
        return None
    if post_softmax and spec.softmax_quantizer == "dfq":
        from .aiqvit import DynamicFocusingQuantizer  # AIQViT's learned-interval uniform quantizer

        return DynamicFocusingQuantizer(bits, granularity=spec.dfq_granularity, below=spec.dfq_below,
                                        num_heads=num_heads)
    # Operands are (B, H, N, D) / (B, H, D, N) / (B, H, N, N): the head is dim 1.
    axis = 1 if spec.matmul_granularity == "head" else None
    if post_softmax and spec.softmax_quantizer != "uniform":
        base = "2" if spec.softmax_quantizer == "log2" else "sqrt2"
        return LogQuantizer(bits, base=base, granularity=spec.matmul_granularity, axis=axis)
    return UniformQuantizer(bits, symmetric=False, granularity=spec.matmul_granularity, axis=axis)


def _qlinear(linear: nn.Module, name: str, w_bits: Optional[int], a_bits: Optional[int], spec: QuantSpec,
             force_tensor_act: bool = False) -> QuantLinear:
    if type(linear) is not nn.Linear:
        raise VitqError(f"{name} is a {type(linear).__name__}, not an nn.Linear; vitq cannot quantize it")
    return QuantLinear.from_float(linear, _weight_q(w_bits, spec),
                                  _linear_act_q(a_bits, spec, force_tensor_act))


# --------------------------------------------------------------------------- attention modules

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
        self.qkv = _qlinear(attn.qkv, f"{name}.qkv", spec.w_bits, spec.a_bits, spec)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.gate = None
        self.proj = _qlinear(attn.proj, f"{name}.proj", spec.w_bits, spec.a_bits, spec)
        self.proj_drop = attn.proj_drop
        self.matmul1 = QuantMatMul(_matmul_q(spec.a_bits, spec), _matmul_q(spec.a_bits, spec))
        self.matmul2 = QuantMatMul(_matmul_q(spec.a_bits, spec, post_softmax=True, num_heads=attn.num_heads),
                                   _matmul_q(spec.a_bits, spec))

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
        self.qkv = _qlinear(attn.qkv, f"{name}.qkv", spec.w_bits, spec.a_bits, spec)
        self.attn_drop = attn.attn_drop
        self.proj = _qlinear(attn.proj, f"{name}.proj", spec.w_bits, spec.a_bits, spec)
        self.proj_drop = attn.proj_drop
        self.softmax = attn.softmax
        self.matmul1 = QuantMatMul(_matmul_q(spec.a_bits, spec), _matmul_q(spec.a_bits, spec))
        self.matmul2 = QuantMatMul(_matmul_q(spec.a_bits, spec, post_softmax=True, num_heads=attn.num_heads),
                                   _matmul_q(spec.a_bits, spec))

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


# --------------------------------------------------------------------------- prepare

def _unsupported(model: nn.Module, why: str = "") -> VitqError:
    extra = f" ({why})" if why else ""
    return VitqError(f"model {type(model).__name__} has no timm ViT/DeiT/Swin blocks vitq can quantize{extra}; "
                     f"supported: {SUPPORTED}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_supported(model: nn.Module) -> None:
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise VitqError("model is already prepared for quantization; call prepare() once on a float model")
    if isinstance(model, VisionTransformer):
        if getattr(model, "attn_pool", None) is not None:
            raise _unsupported(model, "attention-pool heads are not supported")
        if len(model.blocks) == 0:
            raise _unsupported(model, "no blocks")
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
                raise _unsupported(model, f"blocks.{i} is a {type(blk).__name__} with "
                                          f"{type(getattr(blk, 'attn', None)).__name__} attention and "
                                          f"{type(getattr(blk, 'mlp', None)).__name__} MLP")
    elif isinstance(model, SwinTransformer):
        if not any(isinstance(m, SwinTransformerBlock) for m in model.modules()):
            raise _unsupported(model, "no SwinTransformerBlock")
    else:
        raise _unsupported(model)
    if not isinstance(getattr(model, "patch_embed", None), PatchEmbed) or \
            type(model.patch_embed.proj) is not nn.Conv2d:
        raise _unsupported(model, "patch embedding is not a timm PatchEmbed with a Conv2d")


def prepare(model: nn.Module, spec: QuantSpec | None = None) -> nn.Module:
    """Swap a timm ViT/DeiT/Swin's modules for quant modules in place; returns ``model``.

    All quant modules start in ``QuantMode.FLOAT`` (logits unchanged). Weights stay the same
    Parameter objects, so every original state-dict key survives; quantizers add keys such as
    ``blocks.0.attn.qkv.w_quantizer.scale``.
    """
    spec = spec or QuantSpec()
    _check_supported(model)
    swaps: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if type(m) is Attention:
            swaps.append((name, QuantAttention(m, spec, name)))
        elif type(m) is WindowAttention:
            swaps.append((name, QuantWindowAttention(m, spec, name)))
        elif type(m) is Mlp:
            swaps.append((f"{name}.fc1", _qlinear(m.fc1, f"{name}.fc1", spec.w_bits, spec.a_bits, spec)))
            swaps.append((f"{name}.fc2", _qlinear(m.fc2, f"{name}.fc2", spec.w_bits, spec.a_bits, spec)))
        elif type(m) is PatchMerging:
            # The reduction input is 4-D (B, H/2, W/2, 4C): keep it per tensor (as FIMA-Q does).
            swaps.append((f"{name}.reduction", _qlinear(m.reduction, f"{name}.reduction", spec.w_bits,
                                                        spec.a_bits, spec, force_tensor_act=True)))
    for head_name in _head_linear_names(model):
        # Head input is the pooled 2-D feature (B, C): per tensor.
        swaps.append((head_name, _qlinear(model.get_submodule(head_name), head_name, spec.head_w,
                                          spec.head_a, spec, force_tensor_act=True)))
    pe = model.patch_embed.proj
    image_q = UniformQuantizer(8, granularity="tensor") if spec.quant_image_input else None
    swaps.append(("patch_embed.proj", QuantConv2d.from_float(pe, _weight_q(spec.patch_embed_w, spec), image_q)))
    for name, new in swaps:
        _set_submodule(model, name, new)
    return model


def _head_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the classifier Linear(s); empty when the head is Identity."""
    if isinstance(model, SwinTransformer):
        names = ["head.fc"]
    elif isinstance(model, VisionTransformerDistilled):
        names = ["head", "head_dist"]
    else:
        names = ["head"]
    return [n for n in names if isinstance(model.get_submodule(n), (nn.Linear, QuantLinear))]


# --------------------------------------------------------------------------- block / layer queries

def reconstruction_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks for block-wise reconstruction, in forward order (fimaq.md §1.4).

    ===================================  ==================================  ===============================
    block                                input                               output
    ===================================  ==================================  ===============================
    ``patch_embed`` (PatchEmbed)         image ``(B, 3, H, W)``              ViT ``(B, N, C)`` (before
                                                                             cls/pos embedding); Swin
                                                                             ``(B, H/p, W/p, C)`` (NHWC)
    ``blocks.i`` (ViT ``Block``)         tokens ``(B, N, C)``                ``(B, N, C)``
    ``layers.s.blocks.j`` (Swin block)   ``(B, H, W, C)``                    ``(B, H, W, C)``
    ``layers.s.downsample``              ``(B, H, W, C)``                    ``(B, H/2, W/2, 2C)``
    (PatchMerging, at the start of
    stage s >= 1)
    ``head`` (ViT/DeiT Linear)           pooled, fc-normed feature ``(B, C)``  logits ``(B, classes)``
    ``head`` (Swin ``ClassifierHead``)   post-norm ``(B, H, W, C)``          logits
    ``head+head_dist`` (DeiT distilled,  final-norm tokens ``(B, N, C)``     averaged logits
    a :class:`DistilledHeads` view that  (output of ``model.norm``)
    is NOT a submodule of the model)
    ===================================  ==================================  ===============================

    Every name except ``head+head_dist`` resolves with ``model.get_submodule(name)``, so block
    inputs/outputs can be captured with forward hooks on that module.
    """
    if not isinstance(model, (VisionTransformer, SwinTransformer)):
        raise _unsupported(model)
    blocks: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        # named_modules order is forward order for these models: Swin registers each stage's
        # downsample before its blocks, and it runs first.
        if name == "patch_embed" or isinstance(m, (Block, SwinTransformerBlock, PatchMerging)):
            blocks.append((name, m))
    if isinstance(model, VisionTransformerDistilled):
        if _head_linear_names(model):
            blocks.append(("head+head_dist", DistilledHeads(model)))
    elif isinstance(model, SwinTransformer) or _head_linear_names(model):
        blocks.append(("head", model.head))
    return blocks


def forward_after(model: nn.Module, block_name: str, y: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` given the output ``y`` of reconstruction block ``block_name``.

    Runs only what follows that block (the rest of the trunk, the final norm and the head), so
    Fisher snapshots start from a cached block input instead of re-running the whole network.
    Mirrors timm's ``forward_features`` / ``forward_head`` (eval mode, no masks).
    """
    names = [name for name, _ in reconstruction_blocks(model)]
    if block_name not in names:
        raise ValueError(f"{block_name!r} is not a reconstruction block of this model")
    if block_name in ("head", "head+head_dist"):
        return y
    if isinstance(model, VisionTransformer):
        if block_name == "patch_embed":
            x = model.norm_pre(model.patch_drop(model._pos_embed(y)))
            start = 0
        else:
            x, start = y, int(block_name.split(".")[1]) + 1
        for blk in model.blocks[start:]:
            x = blk(x)
        return model.forward_head(model.norm(x))
    # Swin: the trunk is every block after this one except the head, in forward order
    x = y
    for name in names[names.index(block_name) + 1:]:
        if name != "head":
            x = model.get_submodule(name)(x)
    return model.forward_head(model.norm(x))


def layer_role(name: str) -> str:
    """Role of a quant module from its qualified name: one of :data:`ROLES`."""
    parts = name.split(".")
    if "patch_embed" in parts:
        return "patch_embed"
    last = parts[-1]
    if last in ("qkv", "proj", "fc1", "fc2", "reduction", "matmul1", "matmul2"):
        return last
    if last in ("head", "head_dist") or (len(parts) >= 2 and parts[-2] == "head" and last == "fc"):
        return "head"
    raise ValueError(f"no quantization role for module {name!r}")


def prev_layernorm(model: nn.Module, name: str) -> Optional[nn.LayerNorm]:
    """The LayerNorm that directly feeds a qkv / fc1 / reduction layer (for the RepQ-ViT fold).

    qkv -> the block's ``norm1``; fc1 -> ``norm2``; reduction -> ``PatchMerging.norm``.
    Returns None for any other role or when that norm is not a LayerNorm.
    """
    role = layer_role(name)
    parts = name.split(".")
    if role in ("qkv", "fc1"):
        owner = model.get_submodule(".".join(parts[:-2]))  # blocks.i[.attn|.mlp].layer
        norm = getattr(owner, "norm1" if role == "qkv" else "norm2", None)
        if role == "fc1" and not isinstance(getattr(owner, "mlp", None), Mlp):
            return None
    elif role == "reduction":
        norm = getattr(model.get_submodule(".".join(parts[:-1])), "norm", None)
    else:
        return None
    return norm if isinstance(norm, nn.LayerNorm) else None


__all__ = [
    "DistilledHeads",
    "forward_after",
    "QuantAttention",
    "QuantSpec",
    "QuantWindowAttention",
    "layer_role",
    "prepare",
    "prev_layernorm",
    "reconstruction_blocks",
]
