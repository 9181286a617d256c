"""The calibration driver: every quantizer of a prepared model, block by block, in forward order."""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed
from ..adapters import layer_role, prev_layernorm, reconstruction_blocks
from ..capture import StopForward, run_until_stopped
from ..errors import VitqError
from ..quantizers.kernels import compile_status, compiled_kernels
from ..qmodules import (QuantConv2d, QuantLinear, QuantMatMul, QuantMode, QuantModule, iter_quantizers,
                        quant_modules, set_mode)
from .config import CalibConfig
from .mse_search import search_conv_mse, search_linear_mse, search_matmul_mse
from .repq_fold import per_channel_params, reparam_layernorm
from .stats import init_by_method, init_minmax, init_percentile_search


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise VitqError(f"NaN/Inf in the activations of {name} during calibration: "
                            "check the FP model and the calibration images (wrong normalisation?)")


def _capture_inputs(model: nn.Module, modules: list[tuple[str, QuantModule]], images: torch.Tensor,
                    batch_size: int, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Inputs of ``modules`` over all calibration images (the model in float mode).

    Distributed, each rank runs its slice of the images and the inputs are gathered in rank
    order: every rank holds what one process captures.
    """
    store: dict[str, list[list[torch.Tensor]]] = {name: [] for name, _ in modules}
    last = modules[-1][0]
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(mod: nn.Module, inputs: tuple) -> None:
            tensors = [t.detach() for t in inputs if isinstance(t, torch.Tensor)]
            # what its quantizers see (a rotated layer's rotated inputs)
            if isinstance(mod, QuantLinear):
                tensors[0] = mod.layer_input(tensors[0])
            elif isinstance(mod, QuantMatMul):
                tensors[:2] = mod.layer_inputs(*tensors[:2])
            store[name].append(tensors)
            if name == last:
                raise StopForward
        return hook

    for name, mod in modules:
        handles.append(mod.register_forward_pre_hook(make_hook(name)))
    run_until_stopped(model, distributed.local_rows(images), batch_size, device, handles)
    out: dict[str, list[torch.Tensor]] = {}
    for name, batches in store.items():
        if not batches:
            raise RuntimeError(f"calibration never reached {name}: is it used in the forward pass?")
        out[name] = [distributed.gather_rows(torch.cat([b[j] for b in batches])) for j in range(len(batches[0]))]
    return out


def _group_by_block(model: nn.Module) -> list[list[tuple[str, QuantModule]]]:
    """Quant modules grouped by reconstruction block, in forward order."""
    blocks = [name for name, _ in reconstruction_blocks(model)]
    groups: dict[str, list[tuple[str, QuantModule]]] = {}
    order: list[str] = []
    for name, mod in quant_modules(model):
        owner = next((b for b in blocks if name == b or name.startswith(b + ".")), name)
        if owner not in groups:
            groups[owner] = []
            order.append(owner)
        groups[owner].append((name, mod))
    return [groups[o] for o in order]


def _expand_tokenwise(module: QuantModule, inputs: list[torch.Tensor]) -> None:
    """One activation scale per token (zero points stay per tensor / head), fimaq.md §2.2.

    Linear 3-D inputs (B, N, C): scale (1, N, 1). MatMul operand A (B, H, N, *): (1, H, N, 1);
    operand B (B, H, *, M): (1, H, 1, M) (for attn @ v that is per head-dim channel, as in
    the official code). Values start identical, so the calibrated model is unchanged; block
    reconstruction then learns them separately.
    """
    if isinstance(module, QuantLinear):
        q, x = module.a_quantizer, inputs[0]
        if q is not None and q.grid_searchable and x.dim() == 3 and q.granularity == "tensor":
            q.set_params(q.scale.detach().reshape(1, 1, 1).expand(1, x.shape[1], 1).clone(), q.zero_point)
    elif isinstance(module, QuantMatMul):
        for q, t, dim in ((module.a_quantizer, inputs[0], 2), (module.b_quantizer, inputs[1], 3)):
            if q is None or not q.grid_searchable or t.dim() != 4:
                continue
            shape = [1, t.shape[1] if q.granularity == "head" else 1, 1, 1]
            base = q.scale.detach().reshape(shape)
            shape[dim] = t.shape[dim]
            q.set_params(base.expand(*shape).clone(), q.zero_point)


def _init_module(module: QuantModule, inputs: list[torch.Tensor], cfg: CalibConfig, gen: torch.Generator) -> None:
    """Initialise one module's quantizers by the configured method."""
    if cfg.method == "mse":
        if isinstance(module, QuantLinear):
            search_linear_mse(module, inputs[0], cfg, gen)
        elif isinstance(module, QuantMatMul):
            search_matmul_mse(module, inputs[0], inputs[1], cfg, gen)
        elif isinstance(module, QuantConv2d):
            search_conv_mse(module, inputs[0], cfg)
            if module.a_quantizer is not None:
                init_minmax(module.a_quantizer, inputs[0])
        return
    weight = getattr(module, "weight", None)
    if getattr(module, "w_quantizer", None) is not None:
        if cfg.method == "repq":
            init_percentile_search(module.w_quantizer, weight.detach())
        else:
            init_minmax(module.w_quantizer, weight.detach())
    slots = [("a_quantizer", 0), ("b_quantizer", 1)] if isinstance(module, QuantMatMul) else [("a_quantizer", 0)]
    for slot, i in slots:
        q = getattr(module, slot, None)
        if q is None:
            continue
        x = inputs[i]
        if q.calibrates_itself:  # e.g. AIQViT's DFQ: its own search, given the other operand
            q.calibrate_itself(x, partner=inputs[1] if slot == "a_quantizer" and len(inputs) > 1 else None)
        else:
            init_by_method(q, x, cfg)


def calibrate(model: nn.Module, images: torch.Tensor, cfg: CalibConfig, device: torch.device | str = "cpu",
              progress: bool = True, seed: int = 0) -> dict[str, object]:
    """Calibrate every quantizer of a prepared model on ``images`` (preprocessed, (N, 3, H, W)).

    Leaves the model in ``QuantMode.QUANT`` and returns a summary (modules, folded layers, seconds).
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    set_mode(model, QuantMode.FLOAT)
    model.eval()
    groups = _group_by_block(model)
    n_modules = sum(len(g) for g in groups)
    folded: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(total=n_modules, desc=f"calibrate ({cfg.method})", unit="layer", disable=not progress)
    with compiled_kernels(cfg.compiles(len(images))):
        _calibrate_groups(model, groups, images, cfg, device, gen, seed, bar, folded)
        kernels = compile_status()
    bar.close()
    set_mode(model, QuantMode.QUANT)
    return {"modules": n_modules, "folded_layers": folded, "seconds": round(time.perf_counter() - t0, 3),
            "kernels": kernels}


def _calibrate_groups(model: nn.Module, groups: list[list[tuple[str, QuantModule]]], images: torch.Tensor,
                      cfg: CalibConfig, device: torch.device, gen: torch.Generator, seed: int, bar: tqdm,
                      folded: list[str]) -> None:
    """Every group (reconstruction block) in turn: capture its inputs, then initialise its modules."""
    for group in groups:
        captured = _capture_inputs(model, group, images, cfg.batch_size, device)
        for name, module in group:
            inputs = captured.pop(name)
            _check_finite(name, *inputs)
            bar.set_postfix_str(name)
            role = layer_role(name)
            norm = prev_layernorm(model, name) if role in ("qkv", "fc1", "reduction") else None
            aq = getattr(module, "a_quantizer", None)
            # a rotated layer's channels are not the LayerNorm's: the rotation replaces the fold there
            if (cfg.reparam and norm is not None and norm.weight is not None and isinstance(module, QuantLinear)
                    and module.input_rotation is None and aq is not None and aq.grid_searchable):
                x2d = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                s_c, z_c = per_channel_params(x2d, aq.bits, cfg, seed)
                _, _, r, b = reparam_layernorm(norm, module, s_c, z_c)
                inputs[0] = inputs[0] / r - b  # the LN output the folded model now produces
                folded.append(name)
            _init_module(module, inputs, cfg, gen)
            if cfg.token_wise:
                _expand_tokenwise(module, inputs)
            if cfg.bias_correction and isinstance(module, QuantLinear) and (
                    module.w_quantizer is not None or module.a_quantizer is not None):
                correct_bias(module, inputs[0], cfg.batch_size)
            bar.update(1)
        del captured


@torch.no_grad()
def correct_bias(module: QuantLinear, x: torch.Tensor, batch: int) -> None:
    """Set ``module.bias_correction`` to the mean of (float output - quantized output) over ``x``'s rows.

    Fed ``batch`` leading entries at a time, in their captured shape (token-wise scales need it).
    """
    mode, module.bias_correction = module.mode, None
    total = torch.zeros(module.out_features, dtype=torch.float64, device=x.device)
    for part in x.split(batch):
        module.mode = QuantMode.FLOAT
        diff = module(part)
        module.mode = QuantMode.QUANT
        diff = (diff - module(part)).reshape(-1, module.out_features)
        total += diff.double().sum(0)
    module.mode = mode
    module.bias_correction = (total / (x.numel() // x.shape[-1])).to(module.weight.dtype)


@torch.no_grad()
def keep_zero_points_in_codes(model: nn.Module) -> list[str]:
    """Widen every affine grid whose zero point lies outside its codes to the nearest one that includes 0.

    Integer kernels take a zero point inside the code range (onnxruntime's int8 MatMul: 0..255); the
    FIMA-Q search may pick a range that excludes 0 (near-uniform attention probabilities). The new
    range is ``[min(lo, 0), max(hi, 0)]`` of the old representable ``[lo, hi]``. Returns the names changed.
    """
    changed = []
    for name, q in iter_quantizers(model):
        if not (q.enabled and q.grid_searchable and q.is_calibrated) or getattr(q, "symmetric", False):
            continue
        qmin, qmax = q.quant_range()
        z = torch.round(q.zero_point).expand_as(q.scale) if q.zero_point.numel() == 1 else torch.round(q.zero_point)
        if bool(((z >= qmin) & (z <= qmax)).all()):
            continue
        s = q.scale.detach()
        lo, hi = s * (qmin - z), s * (qmax - z)
        q.set_range(torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi)))
        changed.append(name)
    return changed
