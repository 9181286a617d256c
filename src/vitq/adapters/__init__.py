"""timm adapters: the only code that knows timm internals (timm 1.0.x).

One :class:`~vitq.adapters.registry.ModelAdapter` per timm model family, registered by model
class and looked up along the MRO (:func:`adapter_for`):

==============  ===========================================================================
file            family
==============  ===========================================================================
``vit.py``      ``VisionTransformer`` (ViT, DeiT, DeiT III, register tokens, avg pool) and
                ``VisionTransformerDistilled`` (DeiT distilled, two heads)
``swin.py``     ``SwinTransformer``
``eva.py``      ``Eva`` (EVA-02: rotary position embedding, SwiGLU)
==============  ===========================================================================

:func:`prepare` swaps, in place, every attention for a quant attention with the same submodules
plus ``matmul1`` (q @ kᵀ) and ``matmul2`` (attn @ v), every Linear of the blocks and the
classifier head(s) for :class:`~vitq.qmodules.QuantLinear`, and the patch-embedding conv for
:class:`~vitq.qmodules.QuantConv2d` (FIMA-Q, research note fimaq.md §1.2, §2.2). Norms, softmax,
activations, residual adds, embeddings and pooling stay FP. All quant modules start in
``QuantMode.FLOAT``, where the prepared model computes the same logits as the original.

A new family: subclass ``ModelAdapter`` in its own file, decorate it with
``@register_adapter(TimmModelClass)`` and import the file below.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import VitqError
from ..qmodules import QuantModule
# Importing a family file registers it; this order is the order of error messages.
from . import vit  # noqa: F401  isort: skip
from . import swin  # noqa: F401  isort: skip
from . import eva  # noqa: F401  isort: skip
from .eva import EvaBlockView, QuantEvaAttention
from .registry import ROLES, ModelAdapter, adapter_by_family, adapter_for, layer_role_of, register_adapter
from .spec import QuantSpec
from .swin import QuantWindowAttention
from .vit import DistilledHeads, QuantAttention


def prepare(model: nn.Module, spec: QuantSpec | None = None) -> nn.Module:
    """Swap a timm model's modules for quant modules in place; returns ``model``.

    All quant modules start in ``QuantMode.FLOAT`` (logits unchanged). Weights stay the same
    Parameter objects, so every original state-dict key survives; quantizers add keys such as
    ``blocks.0.attn.qkv.w_quantizer.scale``.
    """
    spec = spec or QuantSpec()
    adapter = adapter_for(model)
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise VitqError("model is already prepared for quantization; call prepare() once on a float model")
    adapter.prepare(model, spec)
    return model


def reconstruction_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks for block-wise reconstruction, in forward order (fimaq.md §1.4).

    ===================================  ==================================  ===============================
    block                                input                               output
    ===================================  ==================================  ===============================
    ``patch_embed`` (PatchEmbed)         image ``(B, 3, H, W)``              ViT/Eva ``(B, N, C)`` (before
                                                                             cls/pos embedding); Swin
                                                                             ``(B, H/p, W/p, C)`` (NHWC)
    ``blocks.i`` (ViT ``Block``; Eva:    tokens ``(B, N, C)``                ``(B, N, C)``
    an :class:`EvaBlockView` that adds
    the rotary embedding)
    ``layers.s.blocks.j`` (Swin block)   ``(B, H, W, C)``                    ``(B, H, W, C)``
    ``layers.s.downsample``              ``(B, H, W, C)``                    ``(B, H/2, W/2, 2C)``
    (PatchMerging, at the start of
    stage s >= 1)
    ``head`` (ViT/DeiT/Eva Linear)       pooled, fc-normed feature ``(B, C)``  logits ``(B, classes)``
    ``head`` (Swin ``ClassifierHead``)   post-norm ``(B, H, W, C)``          logits
    ``head+head_dist`` (DeiT distilled,  final-norm tokens ``(B, N, C)``     averaged logits
    a :class:`DistilledHeads` view that  (output of ``model.norm``)
    is NOT a submodule of the model)
    ===================================  ==================================  ===============================

    Every name except ``head+head_dist`` resolves with ``model.get_submodule(name)``, so block
    inputs/outputs can be captured with forward hooks on that module (see
    :func:`block_input_source`). The listed module may be a view (Eva blocks) that holds the
    block's own submodules under the same names and computes the same output.
    """
    return adapter_for(model).reconstruction_blocks(model)


def forward_after(model: nn.Module, block_name: str, y: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` given the output ``y`` of reconstruction block ``block_name``.

    Runs only what follows that block (the rest of the trunk, the final norm and the head), so
    Fisher snapshots start from a cached block input instead of re-running the whole network.
    Mirrors timm's ``forward_features`` / ``forward_head`` (eval mode, no masks).
    """
    adapter = adapter_for(model)
    if block_name not in [name for name, _ in adapter.reconstruction_blocks(model)]:
        raise ValueError(f"{block_name!r} is not a reconstruction block of this model")
    return adapter.forward_after(model, block_name, y)


def block_input_source(model: nn.Module, block_name: str, block: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose call carries reconstruction block ``block_name``'s input.

    Returns ``(module, from_output)``: with ``from_output`` False the block input is that
    module's first positional input (a forward pre-hook captures it; usually the block itself),
    with True it is the module's output (a forward hook; e.g. ``model.norm`` for DeiT-distilled's
    ``head+head_dist``).
    """
    return adapter_for(model).block_input_source(model, block_name, block)


def is_head_block(model: nn.Module, block_name: str) -> bool:
    """True for the classifier reconstruction block(s) at the end (``head``, ``head+head_dist``)."""
    return block_name in adapter_for(model).head_block_names(model)


def layer_role(name: str) -> str:
    """Role of a quant module from its qualified name: one of :data:`ROLES`.

    Each family maps its own layer names onto these roles (e.g. Eva's ``q_proj`` -> ``qkv``,
    SwiGLU's ``fc1_g`` / ``fc1_x`` -> ``fc1``).
    """
    parts = name.split(".")
    if "patch_embed" in parts:
        return "patch_embed"
    role = layer_role_of(name)
    if role is not None:
        return role
    last = parts[-1]
    if last in ("head", "head_dist") or (len(parts) >= 2 and parts[-2] == "head" and last == "fc"):
        return "head"
    raise ValueError(f"no quantization role for module {name!r}")


def prev_layernorm(model: nn.Module, name: str) -> Optional[nn.LayerNorm]:
    """The LayerNorm that directly feeds a qkv / fc1 / reduction layer (for the RepQ-ViT fold).

    qkv -> the block's ``norm1``; fc1 -> ``norm2``; reduction -> ``PatchMerging.norm``.
    Returns None for any other role, when that norm is not a LayerNorm, or when the fold is not
    valid because the norm feeds more than this one Linear (Eva's q/k/v_proj, SwiGLU's fc1_g/fc1_x).
    """
    return adapter_for(model).prev_layernorm(model, name)


def architecture_of(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model`` as a float model: the input of :func:`build_model`.

    ``{"timm_name": ..., "arch_kwargs": {"num_classes", "img_size"}}`` from timm's
    ``pretrained_cfg``, or ``{"arch_kwargs": ...}`` for a vitq model folder's VisionTransformer.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "vitq_arch_kwargs" in cfg:
        return {"arch_kwargs": cfg["vitq_arch_kwargs"], "family": cfg.get("vitq_family", "vit")}
    arch = cfg.get("architecture")
    if arch:
        kwargs: dict[str, Any] = {"num_classes": getattr(model, "num_classes", 1000)}
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            kwargs["img_size"] = tuple(img_size)
        return {"timm_name": arch, "arch_kwargs": kwargs}
    raise VitqError("cannot tell which timm architecture this model is (no pretrained_cfg): create it with "
                    "timm.create_model or vitq.load_model, or pass save_quantized(..., architecture={...})")


def build_model(architecture: dict[str, Any]) -> nn.Module:
    """A float model (random weights, nothing downloaded) from an :func:`architecture_of` dict.

    ``timm_name``: ``timm.create_model(timm_name, pretrained=False, **arch_kwargs)``; otherwise the
    ``family``'s model class (default ``"vit"``: VisionTransformer) built from ``arch_kwargs``.
    """
    kwargs = dict(architecture.get("arch_kwargs", {}))
    if "timm_name" in architecture:
        import timm

        name = architecture["timm_name"]
        if not timm.is_model(name.split(".", 1)[0]):
            raise VitqError(f"unknown timm model {name!r}: use a name from timm.list_models()")
        return timm.create_model(name, pretrained=False, **kwargs)
    if "arch_kwargs" not in architecture:
        raise VitqError("the architecture names no model: give 'timm_name' or 'arch_kwargs'")
    return adapter_by_family(architecture.get("family", "vit")).build(kwargs)


def prepare_for_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make a prepared ``model`` able to ``load_state_dict(state)`` of a saved quantized model.

    Recreates what calibration added and ``prepare`` does not make: the bias the RepQ LayerNorm
    fold gives bias-free layers (Swin's PatchMerging.reduction, Eva's qkv).
    """
    adapter_for(model).prepare_for_state_dict(model, state)


__all__ = [
    "ROLES",
    "DistilledHeads",
    "EvaBlockView",
    "ModelAdapter",
    "QuantAttention",
    "QuantEvaAttention",
    "QuantSpec",
    "QuantWindowAttention",
    "adapter_for",
    "architecture_of",
    "block_input_source",
    "build_model",
    "forward_after",
    "is_head_block",
    "layer_role",
    "prepare",
    "prepare_for_state_dict",
    "prev_layernorm",
    "reconstruction_blocks",
    "register_adapter",
]
