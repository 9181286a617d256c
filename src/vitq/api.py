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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from . import distributed
from .adapters import QuantSpec, architecture_of, build_model, prepare, prepare_for_state_dict
from .calibration import calibrate, keep_zero_points_in_codes
from .data import atomic_write_bytes, build_dataset, fixed_subset, resolve_data
from .errors import VitqError
from .qmodules import QuantMode, set_mode
from .recipes import Recipe, get_recipe, recipe_from_dict
from .report import stage
from .rotation import restore_rotations, rotate_attention_operands, rotate_linear_inputs
from .runtime import resolve_device

# v2: recipes with softmax_options, side branches in QuantLinear.side (v1 models: quantize again)
QUANTIZED_FORMAT = "vitq-quantized-v2"


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
                            "lower calib_size (--calib-size) or add images")
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
                        "lower calib_size (--calib-size) or add images")
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

    from .data import FolderImageDataset
    from .models import data_config

    cfg = data_config(model)
    if transform not in ("eval", "train"):
        raise VitqError(f"calibration transform must be 'eval' or 'train', got {transform!r}")
    tf = timm.data.create_transform(**cfg, is_training=(transform == "train"))
    if calib_root is not None:
        spec = resolve_data(calib_root)
        root = spec.calib_root or spec.eval_root
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
    refine = refine_size(recipe) if recipe.refine is not None else 0
    return max(recipe.calib_size, optim, refine)


def refine_size(recipe: Recipe) -> int:
    """How many images the end-to-end refinement uses: its own setting, else the reconstruction's."""
    if recipe.refine.optim_size is not None:
        return recipe.refine.optim_size
    return recipe.reconstruction.optim_size if recipe.reconstruction is not None else 1024


@dataclass
class QuantizeResult:
    """What :func:`quantize_with_summary` returns: the model and what each stage did."""

    model: nn.Module
    recipe: Recipe
    calibration: dict[str, Any]
    reconstruction: dict[str, Any] | None
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # seconds and peak memory per stage
    refinement: dict[str, Any] | None = None


def quantize_with_summary(model: nn.Module, calib_data: Any, recipe: str | Recipe = "mse", *,
                          device: str | torch.device | None = None, progress: bool = True,
                          work_dir: str | Path | None = None, restart: bool = False,
                          after_calibration: Callable[[nn.Module], None] | None = None,
                          process_group: Any = None, **overrides: Any) -> QuantizeResult:
    """Quantize ``model`` in place with ``recipe``; returns the model and the per-stage summaries.

    ``calib_data``: preprocessed images as a tensor (N, 3, H, W), a dataset of (image, label)
    or an iterable of batches. Calibration uses ``recipe.calib_size`` of them; reconstruction
    recipes also use ``optim_size`` (a fixed random sample when there are more; the calibration
    images are a subset of the optimisation images, as in FIMA-Q). ``overrides`` go to
    :func:`~vitq.recipes.get_recipe` (``w_bits=3``, ``reconstruction={"iters": 500}``). With
    ``work_dir``, reconstruction saves its state after every block there and a repeated call
    resumes after the last finished block (``restart=True`` discards it). ``after_calibration(model)``
    is called between calibration and reconstruction (e.g. to evaluate the calibration-only model).

    Under torch.distributed (``process_group``, or the default group when one is initialised;
    ``process_group=False`` keeps this call to one process) the
    work is shared out over the ranks and every rank returns the same model as one process would
    (``vitq.distributed``); give every rank the same ``calib_data``, recipe and seed. Only rank 0
    prints and writes checkpoints.
    """
    with distributed.active(process_group):
        return _quantize(model, calib_data, recipe, device, progress and distributed.is_main(), work_dir, restart,
                         after_calibration, overrides)


def _quantize(model: nn.Module, calib_data: Any, recipe: str | Recipe, device: str | torch.device | None,
              progress: bool, work_dir: str | Path | None, restart: bool,
              after_calibration: Callable[[nn.Module], None] | None, overrides: dict[str, Any]) -> QuantizeResult:
    recipe = get_recipe(recipe, **overrides)
    dev = resolve_device(None if device is None else str(device))
    pool = _collect_images(calib_data, images_needed(recipe), recipe.seed)
    calib = pool[torch.from_numpy(fixed_subset(len(pool), recipe.calib_size, recipe.seed))]
    distributed.check_shardable(recipe.calib_size, recipe.reconstruction)
    distributed.check_same(recipe.to_dict(), "the recipe")
    stages: dict[str, dict[str, float]] = {}
    model.eval().to(dev)
    prepare(model, recipe.quant_spec())
    rotated = rotate_linear_inputs(model, recipe.rotation, recipe.seed)
    if recipe.rotate_attention:
        rotated += rotate_attention_operands(model, recipe.rotation, recipe.seed)
    with stage(stages, "calibration", dev):
        summary = calibrate(model, calib, recipe.calibration, dev, progress=progress, seed=recipe.seed)
        if recipe.target == "ort-int8":
            summary["zero_points_moved_into_codes"] = keep_zero_points_in_codes(model)
    summary["rotated_layers"] = rotated
    if after_calibration is not None:
        after_calibration(model)
    recon = refined = None
    if recipe.refine is not None:
        from .reconstruction.refine import float_logits

        refine_images = pool[torch.from_numpy(fixed_subset(len(pool), refine_size(recipe), recipe.seed))]
        with stage(stages, "refinement_targets", dev):
            teacher = float_logits(model, refine_images, recipe.refine.batch_size, dev)
    if recipe.reconstruction is not None:
        from .reconstruction import reconstruct
        from .reconstruction.checkpoint import recon_settings

        extension = recipe.aiq.make_extension() if recipe.aiq is not None else None
        # the block stage does not depend on the recipe's name or its refinement, so a run that
        # differs only in those resumes the same finished blocks
        settings = {k: v for k, v in recipe.to_dict().items() if k not in ("name", "refine")}
        settings["reconstruction"] = recon_settings(recipe.reconstruction)
        with stage(stages, "reconstruction", dev):
            recon = reconstruct(model, pool, recipe.reconstruction, dev, seed=recipe.seed, progress=progress,
                                work_dir=work_dir, run_settings={"recipe": settings}, extension=extension,
                                restart=restart, fold=recipe.refine is None)
    if recipe.refine is not None:
        from .reconstruction.refine import refine_end_to_end

        with stage(stages, "refinement", dev):
            refined = refine_end_to_end(model, refine_images, teacher, recipe.refine, dev, seed=recipe.seed,
                                        progress=progress)
    # One plain dict on the root model (like timm's pretrained_cfg) so the model can be saved.
    model.vitq_config = {"recipe": recipe.to_dict(), "spec": asdict(recipe.quant_spec()),
                         "folded_layers": summary["folded_layers"]}
    if recon is not None and recon.get("lrc_side_ranks"):
        model.vitq_config["lrc_side_ranks"] = recon["lrc_side_ranks"]
    return QuantizeResult(model, recipe, summary, recon, stages, refined)


def quantize(model: nn.Module, calib_data: Any, recipe: str | Recipe = "mse", **kwargs: Any) -> nn.Module:
    """Quantize ``model`` in place with ``recipe`` and return it (in quantized mode).

    The same arguments as :func:`quantize_with_summary`, which also returns what each stage did.
    """
    return quantize_with_summary(model, calib_data, recipe, **kwargs).model


# What of timm's pretrained_cfg a saved model keeps (the data config and how to rebuild it)
PRETRAINED_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "num_classes",
                   "architecture", "vitq_arch_kwargs", "vitq_family")
# The vitq_config entries a saved model carries
META_KEYS = ("recipe", "spec", "folded_layers", "lrc_side_ranks")


def portable_pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """The JSON-able part of ``model.pretrained_cfg`` a saved model needs."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in (getattr(model, "pretrained_cfg", None) or {}).items() if k in PRETRAINED_KEYS}


def rebuild_quantized(config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The prepared model a saved ``config`` describes, ready to ``load_state_dict(state)``.

    Builds the float architecture, restores its pretrained_cfg, prepares it with the saved
    spec and recreates what calibration and reconstruction added (fold biases, side branches).
    """
    model = build_model(config)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in config.get("pretrained_cfg", {}).items()})
    model.pretrained_cfg = model.default_cfg = cfg
    prepare(model, QuantSpec(**config["spec"]))
    prepare_for_state_dict(model, state)
    restore_rotations(model, state)
    side = config.get("lrc_side_ranks", {})
    if side:
        from .methods.aiqvit import restore_side_branches

        restore_side_branches(model, side, (config.get("recipe", {}).get("aiq") or {}).get("factor_bits"))
    return model


def weights_do_not_fit(folder: Path, detail: str, how: str) -> VitqError:
    """The one-line error for saved weights that do not fit the architecture in their config."""
    return VitqError(f"the weights in {folder} do not fit the architecture in its config.json ({detail[:160]}): "
                     f"{how}(..., architecture={{'timm_name': ..., 'arch_kwargs': {{...}}}})")


def first_line_of_load_error(exc: RuntimeError) -> str:
    lines = str(exc).splitlines()
    return lines[1].strip() if len(lines) > 1 else str(exc)


def save_quantized(model: nn.Module, folder: str | Path, architecture: dict[str, Any] | None = None) -> Path:
    """Write a quantized model to ``folder`` (``config.json`` + ``model.safetensors``), atomically.

    ``vitq.load_model(folder)`` / ``vitq eval --model folder`` load it back to the same logits.
    ``architecture`` says how to rebuild the float model (``{"timm_name": ..., "arch_kwargs": {...}}``);
    by default the model's adapter reads it from the model.
    """
    from safetensors.torch import save

    meta = getattr(model, "vitq_config", None)
    if meta is None:
        raise VitqError("this model was not quantized by vitq.quantize; nothing to save")
    folder = Path(folder)
    arch = architecture if architecture is not None else architecture_of(model)
    config = {"format": QUANTIZED_FORMAT, **arch, "pretrained_cfg": portable_pretrained_cfg(model), **meta}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(state)
    atomic_write_bytes(folder / "model.safetensors", lambda fh: fh.write(blob))
    atomic_write_bytes(folder / "config.json", lambda fh: fh.write(json.dumps(config, indent=2).encode()))
    return folder


def load_quantized(folder: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save_quantized`, in quantized mode."""
    from safetensors.torch import load_file

    from .models import read_json

    folder = Path(folder)
    config = read_json(folder / "config.json")
    fmt = config.get("format")
    if fmt != QUANTIZED_FORMAT:
        hint = ": it was written by an older vitq, quantize the model again" if str(fmt).startswith("vitq-") else ""
        raise VitqError(f"{folder} is not a vitq quantized model of this version (format {fmt!r}){hint}")
    try:
        state = load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # safetensors has its own error types for damaged files
        raise VitqError(f"{folder / 'model.safetensors'} is missing or damaged ({exc.__class__.__name__})") from None
    model = rebuild_quantized(config, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # e.g. a timm model built with other constructor arguments
        raise weights_do_not_fit(folder, first_line_of_load_error(exc), "save with save_quantized") from None
    set_mode(model, QuantMode.QUANT)
    model.vitq_config = {k: config[k] for k in META_KEYS if k in config}
    return model.eval()


def recipe_of(model: nn.Module) -> Recipe | None:
    """The recipe a vitq-quantized model was made with (None for a float model)."""
    meta = getattr(model, "vitq_config", None)
    return recipe_from_dict(meta["recipe"]) if meta else None
