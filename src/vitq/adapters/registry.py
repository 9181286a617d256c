"""The adapter registry: one :class:`ModelAdapter` per timm model class, looked up along the MRO."""

from __future__ import annotations

from typing import Callable, ClassVar, Optional, TypeVar

import torch
import torch.nn as nn

from ..errors import VitqError
from ..qmodules import QuantLinear, QuantModule
from .layers import check_patch_embed, patch_embed_swap, set_submodule
from .spec import QuantSpec, quant_linear

# Roles of quant modules (see layer_role); every family maps its layers onto these.
ROLES = ("qkv", "proj", "fc1", "fc2", "reduction", "head", "patch_embed", "matmul1", "matmul2")
# Last name component -> role, for the layer names every family shares.
SHARED_LAYER_ROLES = {"qkv": "qkv", "proj": "proj", "fc1": "fc1", "fc2": "fc2", "reduction": "reduction",
                      "matmul1": "matmul1", "matmul2": "matmul2",
                      # timm SwiGLU's separate gate / value projections play fc1's part
                      "fc1_g": "fc1", "fc1_x": "fc1"}


class ModelAdapter:
    """What vitq needs to know about one timm model family.

    Subclass it per family (one file each) and register it with :func:`register_adapter`. The
    defaults below cover what most families share; a family overrides what differs.
    """

    family: ClassVar[str] = ""            # short name, e.g. "vit" (build_model's "family" key)
    description: ClassVar[str] = ""       # for messages, e.g. "timm SwinTransformer"
    model_cls: ClassVar[type[nn.Module]]  # set by register_adapter
    layer_roles: ClassVar[dict[str, str]] = {}  # this family's extra layer names -> role

    # ------------------------------------------------------------------ structure
    def check(self, model: nn.Module) -> None:
        """Raise a one-line VitqError naming the first submodule this adapter cannot quantize.

        Must accept both the float model and the prepared one.
        """
        check_patch_embed(model)

    def block_swaps(self, model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Module]]:
        """(qualified name, quant module) replacements inside the trunk (not the head / patch embed)."""
        raise NotImplementedError

    def head_linear_names(self, model: nn.Module) -> list[str]:
        """Qualified names of the classifier Linear(s); empty when the head is Identity."""
        return [n for n in ("head",) if isinstance(model.get_submodule(n), (nn.Linear, QuantLinear))]

    def prepare(self, model: nn.Module, spec: QuantSpec) -> None:
        swaps = self.block_swaps(model, spec)
        for name in self.head_linear_names(model):
            # Head input is the pooled 2-D feature (B, C): per tensor.
            swaps.append((name, quant_linear(model.get_submodule(name), name, spec.head_w, spec.head_a, spec,
                                             force_tensor_act=True)))
        swaps.append(patch_embed_swap(model, spec))
        for name, module in swaps:
            set_submodule(model, name, module)

    # ------------------------------------------------------------------ reconstruction
    def reconstruction_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def forward_after(self, model: nn.Module, block_name: str, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_input_source(self, model: nn.Module, block_name: str, block: nn.Module) -> tuple[nn.Module, bool]:
        """Usually the block itself, whose first positional input is the block input."""
        return model.get_submodule(block_name), False

    def head_block_names(self, model: nn.Module) -> tuple[str, ...]:
        """Names of the classifier reconstruction blocks this model has."""
        return ("head",) if self.head_linear_names(model) else ()

    # ------------------------------------------------------------------ layers
    def prev_layernorm(self, model: nn.Module, name: str) -> Optional[nn.LayerNorm]:
        return None

    # ------------------------------------------------------------------ saving / loading
    def build(self, arch_kwargs: dict) -> nn.Module:
        """A float model of this family from its constructor's keyword arguments."""
        return self.model_cls(**arch_kwargs)

    def prepare_for_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Recreate what a saved quantized model has and ``prepare`` does not make.

        The RepQ LayerNorm fold gives bias-free layers (Swin's reduction, EVA's qkv) a bias; bias
        correction gives linear layers a ``bias_correction`` buffer.
        """
        for key, value in state.items():
            owner_name, _, leaf = key.rpartition(".")
            if leaf not in ("bias", "bias_correction"):
                continue
            try:
                owner = model.get_submodule(owner_name)
            except AttributeError:
                continue  # made later by whoever owns it (e.g. a low-rank side branch)
            if isinstance(owner, QuantModule) and getattr(owner, leaf, "absent") is None:
                if leaf == "bias":
                    owner.bias = nn.Parameter(torch.zeros_like(value))
                else:
                    owner.bias_correction = torch.zeros_like(value)


_ADAPTERS: dict[type[nn.Module], ModelAdapter] = {}
A = TypeVar("A", bound=type[ModelAdapter])


def register_adapter(model_cls: type[nn.Module], adapter: Optional[ModelAdapter] = None
                     ) -> Callable[[A], A] | ModelAdapter:
    """Make ``adapter`` handle ``model_cls`` and its subclasses (nearest registered class wins).

    As a decorator on a :class:`ModelAdapter` subclass: ``@register_adapter(SwinTransformer)``.
    """
    def add(instance: ModelAdapter) -> ModelAdapter:
        instance.model_cls = model_cls
        _ADAPTERS[model_cls] = instance
        return instance

    if adapter is not None:
        return add(adapter)

    def decorate(cls: A) -> A:
        add(cls())
        return cls
    return decorate


def supported_families() -> str:
    return ", ".join(a.description for a in _ADAPTERS.values())


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter for ``model``, after checking it can quantize every block.

    Raises a one-line VitqError naming the model class (no adapter) or the first unknown block.
    """
    for cls in type(model).__mro__:
        adapter = _ADAPTERS.get(cls)
        if adapter is not None:
            adapter.check(model)
            return adapter
    raise VitqError(f"model {type(model).__name__} is not a model family vitq can quantize; "
                    f"supported: {supported_families()}")


def adapter_by_family(family: str) -> ModelAdapter:
    for adapter in _ADAPTERS.values():
        if adapter.family == family:
            return adapter
    names = ", ".join(a.family for a in _ADAPTERS.values())
    raise VitqError(f"unknown model family {family!r}; use one of {names}")


def layer_role_of(name: str) -> Optional[str]:
    """Role from the last name component, over every registered family's layer names."""
    last = name.split(".")[-1]
    if last in SHARED_LAYER_ROLES:
        return SHARED_LAYER_ROLES[last]
    for adapter in _ADAPTERS.values():
        if last in adapter.layer_roles:
            return adapter.layer_roles[last]
    return None
