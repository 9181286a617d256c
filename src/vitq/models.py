"""Model loading: the shipped reference model, timm model names and checkpoint files.

``load_model(name)`` accepts:

* ``cifar10_vit`` / ``cifar10_swin``: the reference ViT and Swin trained on the shipped
  CIFAR-10 (weights ship inside the package, see ``benchmarks/train_reference.py``);
* a timm model name (``deit_small_patch16_224``, ``vit_base_patch16_224.augreg_in21k_ft_in1k``):
  weights load through timm's pretrained mechanism; offline that fails with a
  message saying how to pass a local checkpoint (``--checkpoint FILE``);
* a checkpoint file (``.safetensors``/``.pth``/``.bin``) beside a ``config.json`` naming its
  architecture, or a quantized run folder written by ``vitq quantize``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from .errors import VitqError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# The reference architecture: a real timm VisionTransformer for 32x32 inputs.
REFERENCE_ARCH: dict[str, Any] = dict(
    img_size=32, patch_size=4, in_chans=3, num_classes=10,
    embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0,
)
# The second reference model: a timm SwinTransformer for 32x32 inputs of about cifar10_vit's
# inference cost: 8x8 patches of 4 px (cifar10_vit's token grid) in 4x4 shifted windows for four
# blocks, then patch merging to 4x4 tokens, one whole window, for two. A first try with 2-px
# patches (16x16 tokens, three stages of two blocks) trained to under 70% in 17 epochs where
# cifar10_vit reached 75%. Stochastic depth is off, as in cifar10_vit: timm's Swin defaults to
# drop_path_rate=0.1, a regulariser for 300-epoch ImageNet schedules that slows a 21-epoch
# distillation run (the two earlier tries had it on and trailed cifar10_vit's curve).
REFERENCE_SWIN_ARCH: dict[str, Any] = dict(
    img_size=32, patch_size=4, in_chans=3, num_classes=10,
    embed_dim=192, depths=(4, 2), num_heads=(3, 6), window_size=4, mlp_ratio=4.0, drop_path_rate=0.0,
)
REFERENCE_PRETRAINED_CFG: dict[str, Any] = dict(
    input_size=(3, 32, 32), crop_pct=1.0, crop_mode="center", interpolation="bicubic",
    mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10,
)
# name -> (adapter family, constructor kwargs)
REFERENCE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "cifar10_vit": ("vit", REFERENCE_ARCH),
    "cifar10_swin": ("swin", REFERENCE_SWIN_ARCH),
}


def reference_asset_dir(name: str = "cifar10_vit") -> Path:
    return Path(str(resources.files("vitq") / "assets" / name))


def _tag_reference(model: torch.nn.Module, family: str, arch: dict[str, Any]) -> torch.nn.Module:
    # lets a quantized copy of this model be rebuilt (vitq.adapters.architecture_of)
    model.pretrained_cfg = {**REFERENCE_PRETRAINED_CFG, "vitq_arch_kwargs": dict(arch), "vitq_family": family}
    model.default_cfg = model.pretrained_cfg
    return model


def build_reference(name: str = "cifar10_vit", **overrides: Any) -> torch.nn.Module:
    """A reference model's architecture (``cifar10_vit``, ``cifar10_swin``) with random weights."""
    from .adapters import adapter_by_family

    if name not in REFERENCE_MODELS:
        raise VitqError(f"unknown reference model {name!r}: use one of {', '.join(REFERENCE_MODELS)}")
    family, arch = REFERENCE_MODELS[name]
    arch = {**arch, **overrides}
    return _tag_reference(adapter_by_family(family).build(arch), family, arch)


def build_reference_vit(**overrides: Any) -> VisionTransformer:
    """The ``cifar10_vit`` architecture with random weights."""
    return build_reference("cifar10_vit", **overrides)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict; a missing or damaged file is a one-line VitqError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VitqError(f"cannot read {path}: {exc}") from None


def load_model_dir(folder: Path) -> torch.nn.Module:
    """Load a model folder: ``config.json`` naming the architecture plus ``model.safetensors``.

    This is the format of the shipped reference model; a ``config.json`` may
    name a timm architecture (``timm_name``) or a VisionTransformer's kwargs
    (``arch_kwargs``).
    """
    from safetensors.torch import load_file

    config = read_json(folder / "config.json")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise VitqError(f"{folder} has no model.safetensors: it is not a vitq model folder")
    if "timm_name" in config:
        model = timm.create_model(config["timm_name"], pretrained=False, **config.get("arch_kwargs", {}))
    elif "arch_kwargs" in config:
        from .adapters import adapter_by_family

        model = adapter_by_family(config.get("family", "vit")).build(config["arch_kwargs"])
    else:
        raise VitqError(f"{folder / 'config.json'} names no architecture (expected 'timm_name' or 'arch_kwargs')")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise VitqError(f"{weights} is damaged ({exc.__class__.__name__}): re-create or re-download it") from None
    model.load_state_dict(state)
    if "mean" in config:
        cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        cfg.update(mean=tuple(config["mean"]), std=tuple(config["std"]))
        if "input_size" in config:
            cfg["input_size"] = tuple(config["input_size"])
        elif "arch_kwargs" in config and "img_size" in config["arch_kwargs"]:
            size = config["arch_kwargs"]["img_size"]
            cfg.update(input_size=(3, size, size), crop_pct=1.0, crop_mode="center", interpolation="bicubic")
        model.pretrained_cfg = cfg
        model.default_cfg = cfg
    if "arch_kwargs" in config and "timm_name" not in config:
        # lets a quantized copy of this model be rebuilt (vitq.api.save_quantized)
        model.pretrained_cfg = {**(model.pretrained_cfg or {}), "vitq_arch_kwargs": dict(config["arch_kwargs"]),
                                "vitq_family": config.get("family", "vit")}
        model.default_cfg = model.pretrained_cfg
    return model.eval()


def load_reference_model(name: str = "cifar10_vit") -> torch.nn.Module:
    """A shipped reference model (``cifar10_vit``, ``cifar10_swin``) with its trained weights."""
    folder = reference_asset_dir(name)
    if not (folder / "model.safetensors").is_file():
        raise VitqError(
            f"the {name} weights are not in this install: train them with "
            f"'python benchmarks/train_reference.py --model {name}' or reinstall vitq"
        )
    model = load_model_dir(folder)
    family, arch = REFERENCE_MODELS[name]
    return _tag_reference(model, family, arch)


def _timm_name_known(name: str) -> bool:
    base = name.split(".", 1)[0]
    return bool(timm.list_models(base)) or bool(timm.list_pretrained(name))


def resolve_model_folder(path: Path) -> Path:
    """A `vitq quantize` run folder keeps its model in ``model/``: that folder, else ``path`` itself."""
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def load_model(name: str, checkpoint: str | Path | None = None, pretrained: bool = True) -> torch.nn.Module:
    """Load a model by name, path or timm name, in eval mode (see the module docstring).

    ``checkpoint`` loads a timm model's weights from a local file through timm's
    own pretrained mechanism (so original-format checkpoints are remapped the way
    timm does). ``pretrained=False`` gives random weights (for timing runs).
    """
    if name in REFERENCE_MODELS:
        return load_reference_model(name)
    path = Path(name).expanduser()
    if path.is_dir():
        path = resolve_model_folder(path)
        if (path / "config.json").is_file() and '"vitq-quantized' in (path / "config.json").read_text():
            from .api import load_quantized

            return load_quantized(path)
        if (path / "config.json").is_file() and '"vitq-packed' in (path / "config.json").read_text():
            from .export import load_packed

            return load_packed(path)
        if (path / "model.safetensors").is_file() or (path / "config.json").is_file():
            return load_model_dir(path)
        raise VitqError(f"{path} is a folder without config.json/model.safetensors: pass a vitq model or run folder")
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin") or path.exists():
        if not path.is_file():
            raise VitqError(f"model file {path} does not exist")
        if (path.parent / "config.json").is_file() and path.name == "model.safetensors":
            return load_model_dir(path.parent)
        raise VitqError(
            f"cannot tell the architecture of {path}: pass '--model TIMM_NAME --checkpoint {path}' "
            "(e.g. --model deit_small_patch16_224)"
        )
    if not _timm_name_known(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models() + list(REFERENCE_MODELS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise VitqError(f"unknown model {name!r}{hint}: use cifar10_vit, cifar10_swin, a timm model name or a model folder")
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise VitqError(f"checkpoint {ckpt} does not exist")
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt))).eval()
        except (RuntimeError, KeyError, ValueError) as exc:
            raise VitqError(f"checkpoint {ckpt} does not fit {name}: {str(exc).splitlines()[0][:200]}") from None
    if not pretrained:
        return timm.create_model(name, pretrained=False).eval()
    try:
        return timm.create_model(name, pretrained=True).eval()
    except Exception as exc:  # network / hub errors come in many types
        raise VitqError(
            f"could not fetch timm weights for {name} ({exc.__class__.__name__}; offline?): "
            f"pass a local file with --checkpoint PATH, or --random-weights for timing"
        ) from None


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """timm's data config (input size, crop, interpolation, mean/std) for ``model``."""
    import timm.data

    return timm.data.resolve_data_config(model=model)


def eval_transform(model: torch.nn.Module):
    """The evaluation transform timm uses for ``model``."""
    import timm.data

    return timm.data.create_transform(**data_config(model), is_training=False)
