"""The Python entry point: ``vitq.quantize(model, calib_data, recipe)`` and quantized-model files.

Example::

    import vitq
    model = vitq.load_model("cifar10_vit")
    calib = vitq.calibration_images(model, "cifar10", 128)
    qmodel = vitq.quantize(model, calib, "mse", w_bits=4, a_bits=4)
    vitq.save_quantized(qmodel, "runs/my_w4a4")
    again = vitq.load_model("runs/my_w4a4")          # same logits as qmodel
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .adapters import QuantSpec, prepare
from .calibration import calibrate
from .data import atomic_write_bytes, build_dataset, fixed_subset, resolve_data
from .errors import VitqError
from .qmodules import QuantMode, set_mode
from .recipes import Recipe, get_recipe, recipe_from_dict
from .runtime import resolve_device

QUANTIZED_FORMAT = "vitq-quantized-v1"


def _collect_images(calib_data: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` images (N, 3, H, W) from a tensor, a dataset or an iterable of batches.

    A fixed random sample when the source holds more than ``n`` (sources may be class-sorted).
    """
    if isinstance(calib_data, torch.Tensor):
        images = calib_data
    elif isinstance(calib_data, torch.utils.data.Dataset) and hasattr(calib_data, "__len__"):
        total = len(calib_data)
        if total < n:
            raise VitqError(f"asked for {n} calibration images but the data holds only {total}: "
                            "lower --calib-size or add images")
        idx = fixed_subset(total, n, seed)
        items = [calib_data[int(i)] for i in idx]
        images = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    elif isinstance(calib_data, Iterable):
        batches, count = [], 0
        for batch in calib_data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            batches.append(x)
            count += len(x)
            if count >= n:
                break
        if not batches:
            raise VitqError("the calibration data is empty")
        images = torch.cat(batches)
    else:
        raise VitqError(f"calib_data must be a tensor, a dataset or an iterable of batches, got {type(calib_data).__name__}")
    if images.dim() != 4:
        raise VitqError(f"calibration images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if len(images) < n:
        raise VitqError(f"asked for {n} calibration images but the data holds only {len(images)}: "
                        "lower --calib-size or add images")
    if len(images) > n:
        images = images[torch.from_numpy(fixed_subset(len(images), n, seed))]
    if not torch.isfinite(images).all():
        raise VitqError("the calibration images contain NaN/Inf values")
    return images.float()


def calibration_images(model: nn.Module, data: str, n: int, seed: int = 0, transform: str = "eval",
                       calib_root: str | None = None) -> torch.Tensor:
    """``n`` preprocessed calibration images for ``model`` from a data name/folder's train split.

    Never from the evaluation split. ``transform`` is ``eval`` (timm's eval transform; default)
    or ``train`` (timm's training augmentation, drawn once per image as in FIMA-Q).
    """
    import timm.data

    from .models import data_config

    cfg = data_config(model)
    if transform not in ("eval", "train"):
        raise VitqError(f"calibration transform must be 'eval' or 'train', got {transform!r}")
    tf = timm.data.create_transform(**cfg, is_training=(transform == "train"))
    if calib_root is not None:
        spec = resolve_data(calib_root)
        root = spec.calib_root or spec.eval_root
        from .data import FolderImageDataset
        dataset = FolderImageDataset(root, tf)
    else:
        dataset = build_dataset(resolve_data(data), "calib", tf)
    # A seeded generator makes the training augmentation draws repeatable.
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return _collect_images(dataset, n, seed)
    finally:
        torch.random.set_rng_state(state)


def images_needed(recipe: Recipe) -> int:
    """How many images ``quantize`` takes from ``calib_data`` for ``recipe``."""
    optim = recipe.reconstruction.optim_size if recipe.reconstruction is not None else 0
    return max(recipe.calib_size, optim)


def quantize(model: nn.Module, calib_data: Any, recipe: str | Recipe = "mse", *, w_bits: int | None = None,
             a_bits: int | None = None, device: str | torch.device | None = None, progress: bool = True,
             work_dir: str | Path | None = None, report: dict[str, Any] | None = None,
             after_calibration: Callable[[nn.Module], None] | None = None, **overrides: Any) -> nn.Module:
    """Quantize ``model`` in place with ``recipe`` and return it (in quantized mode).

    ``calib_data``: preprocessed images as a tensor (N, 3, H, W), a dataset of (image, label)
    or an iterable of batches. Calibration uses ``recipe.calib_size`` of them; reconstruction
    recipes also use ``optim_size`` (a fixed random sample when there are more; the calibration
    images are a subset of the optimisation images, as in FIMA-Q). ``w_bits``/``a_bits`` and any
    other :class:`Recipe`, calibration or reconstruction field given as a keyword override the
    preset. With ``work_dir``, reconstruction saves its state after every block there and a
    repeated call resumes after the last finished block. ``report`` (a dict) receives the
    calibration and per-block reconstruction summaries. ``after_calibration(model)`` is called
    between calibration and reconstruction (e.g. to evaluate the calibration-only model).
    """
    recipe = get_recipe(recipe, w_bits=w_bits, a_bits=a_bits, **overrides)
    dev = resolve_device(None if device is None else str(device))
    pool = _collect_images(calib_data, images_needed(recipe), recipe.seed)
    calib = pool[torch.from_numpy(fixed_subset(len(pool), recipe.calib_size, recipe.seed))]
    model.eval().to(dev)
    prepare(model, recipe.quant_spec())
    summary = calibrate(model, calib, recipe.calibration, dev, progress=progress)
    if report is not None:
        report["calibration"] = summary
    if after_calibration is not None:
        after_calibration(model)
    if recipe.reconstruction is not None:
        from .reconstruction import reconstruct

        extension = None
        if recipe.aiq is not None:
            from .aiqvit_reconstruction import AIQViTExtension

            extension = AIQViTExtension(recipe.aiq)
        recon = reconstruct(model, pool, recipe.reconstruction, dev, seed=recipe.seed, progress=progress,
                            work_dir=work_dir, resume_key={"recipe": recipe.to_dict()}, extension=extension)
        side_ranks = recon.get("lrc_side_ranks", {})
        if report is not None:
            report["reconstruction"] = recon
    # One plain dict on the root model (like timm's pretrained_cfg) so the model can be saved.
    model.vitq_config = {"recipe": recipe.to_dict(), "spec": asdict(recipe.quant_spec()),
                         "folded_layers": summary["folded_layers"]}
    if recipe.reconstruction is not None and side_ranks:
        model.vitq_config["lrc_side_ranks"] = side_ranks
    return model


def _architecture_of(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "vitq_arch_kwargs" in cfg:
        return {"arch_kwargs": cfg["vitq_arch_kwargs"]}
    arch = cfg.get("architecture")
    if arch:
        kwargs: dict[str, Any] = {"num_classes": getattr(model, "num_classes", 1000)}
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            kwargs["img_size"] = tuple(img_size)
        return {"timm_name": arch, "arch_kwargs": kwargs}
    raise VitqError("cannot tell which timm architecture this model is (no pretrained_cfg): create it with "
                    "timm.create_model or vitq.load_model, or pass save_quantized(..., architecture={...})")


def save_quantized(model: nn.Module, folder: str | Path, architecture: dict[str, Any] | None = None) -> Path:
    """Write a quantized model to ``folder`` (``config.json`` + ``model.safetensors``), atomically.

    ``vitq.load_model(folder)`` / ``vitq eval --model folder`` load it back to the same logits.
    ``architecture`` says how to rebuild the float model (``{"timm_name": ..., "arch_kwargs": {...}}``);
    by default it is read from the model's timm ``pretrained_cfg``.
    """
    from safetensors.torch import save

    meta = getattr(model, "vitq_config", None)
    if meta is None:
        raise VitqError("this model was not quantized by vitq.quantize; nothing to save")
    folder = Path(folder)
    pretrained_cfg = {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in (getattr(model, "pretrained_cfg", None) or {}).items()
                      if k in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "num_classes",
                               "architecture", "vitq_arch_kwargs")}
    arch = architecture if architecture is not None else _architecture_of(model)
    config = {"format": QUANTIZED_FORMAT, **arch, "pretrained_cfg": pretrained_cfg, **meta}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(state)
    atomic_write_bytes(folder / "model.safetensors", lambda fh: fh.write(blob))
    atomic_write_bytes(folder / "config.json", lambda fh: fh.write(json.dumps(config, indent=2).encode()))
    return folder


def load_quantized(folder: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save_quantized`, in quantized mode."""
    import timm
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VitqError(f"cannot read {folder / 'config.json'}: {exc}") from None
    if config.get("format") != QUANTIZED_FORMAT:
        raise VitqError(f"{folder} is not a vitq quantized model (format {config.get('format')!r})")
    if "timm_name" in config:
        model = timm.create_model(config["timm_name"], pretrained=False, **config.get("arch_kwargs", {}))
    else:
        model = VisionTransformer(**config["arch_kwargs"])
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in config.get("pretrained_cfg", {}).items()})
    model.pretrained_cfg = model.default_cfg = cfg
    spec = QuantSpec(**config["spec"])
    prepare(model, spec)
    try:
        state = load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # safetensors has its own error types for damaged files
        raise VitqError(f"{folder / 'model.safetensors'} is missing or damaged ({exc.__class__.__name__})") from None
    # The RepQ fold gives bias-free layers (Swin reduction) a bias: recreate it before loading.
    for key, value in state.items():
        if key.endswith(".bias"):
            owner = model.get_submodule(key.rsplit(".", 1)[0])
            if getattr(owner, "bias", "absent") is None:
                owner.bias = nn.Parameter(torch.zeros_like(value))
    side = config.get("lrc_side_ranks", {})
    if side:
        # AIQViT side branches are modules with hooks: attach them to the calibrated layers (a first,
        # partial load calibrates the quantizers), then load again with their factors.
        from .aiqvit import attach_lowrank

        model.load_state_dict(state, strict=False)
        factor_bits = (config.get("recipe", {}).get("aiq") or {}).get("factor_bits")
        for name, rank in side.items():
            attach_lowrank(model.get_submodule(name), "side", rank=rank, init="lora", factor_bits=factor_bits)
    model.load_state_dict(state)
    set_mode(model, QuantMode.QUANT)
    model.vitq_config = {k: config[k] for k in ("recipe", "spec", "folded_layers", "lrc_side_ranks") if k in config}
    return model.eval()


def recipe_of(model: nn.Module) -> Recipe | None:
    """The recipe a vitq-quantized model was made with (None for a float model)."""
    meta = getattr(model, "vitq_config", None)
    return recipe_from_dict(meta["recipe"]) if meta else None
