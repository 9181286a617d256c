"""The reconstruction driver: every block of a calibrated model in forward order, with resume."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed
from ..adapters import is_head_block, reconstruction_blocks
from ..distributed import sharded_map
from ..errors import VitqError
from ..qmodules import QuantMode, set_mode
from ..quantizers.kernels import compile_status, compiled_kernels
from ..report import PeakMemory
from . import checkpoint
from .block import float_block_outputs, reconstruct_block
from .capture import capture_block_input, keep_cache, step_block_input
from .config import FISHER_LOSSES, ReconConfig, compiles
from .extension import BlockExtension
from .global_loss import penultimate_features
from .rounding import block_quant_modules, fold_learned_rounding, install_learned_rounding


def _restore_finished(model: nn.Module, blocks: list[tuple[str, nn.Module]], done: list[dict[str, Any]],
                      state: dict[str, torch.Tensor], cfg: ReconConfig, extension: BlockExtension | None) -> None:
    """Re-create the finished blocks' modules (final learned rounding, an extension's) and load the state."""
    finished = {d["block"]: d for d in done}
    for name, block in blocks:
        if name not in finished:
            continue
        if cfg.adaround:
            for q in install_learned_rounding(block):
                q.freeze_()
        if extension is not None:
            extension.restore_block(model, name, block, finished[name])
    model.load_state_dict(state)


def _load_on_main(folder: Path, key: dict[str, str], world: int
                  ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]] | None:
    """Rank 0 reads the checkpoint (the others may not share its disk) and sends it, or its error, to all."""
    result: tuple[str, Any] = ("ok", None)
    if distributed.is_main():
        try:
            result = ("ok", checkpoint.load_progress(folder, key, world))
        except VitqError as exc:
            result = ("error", str(exc))
    status, value = distributed.broadcast_object(result, "loading the checkpoint")
    if status == "error":
        raise VitqError(value)
    return value


def _block_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], index: int, images: torch.Tensor,
                  cfg: ReconConfig, device: torch.device, store: torch.device,
                  previous: list | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``index``'s input with everything float (x_fp) and with the blocks before it quantized (x_q).

    With the previous block's caches in hand (``previous``: ``[index, x_q, float outputs]``), each
    input is stepped on from that block: x_fp from its float outputs (its targets, computed
    already), x_q through the quantized block; otherwise (the first block of a run or of a resume)
    the prefix runs in full. The previous outputs are dropped from ``previous`` once used.
    """
    name, block = blocks[index]
    names = [n for n, _ in blocks]
    step = previous is not None and previous[0] == index - 1
    set_mode(model, QuantMode.FLOAT)
    x_fp = None
    if step:
        x_fp = step_block_input(model, *blocks[index - 1], previous[2], name, block, cfg.capture_batch_size,
                                device, store, from_output=True)
        previous[2] = None  # not needed any more: one cache fewer while x_q is stepped
    if x_fp is None:
        step = False
        x_fp = capture_block_input(model, name, block, images, cfg.capture_batch_size, device, store)
    x_fp = keep_cache(x_fp, cfg.cache_on_disk)
    for other in names[:index]:
        if not is_head_block(model, other):
            for m in block_quant_modules(model.get_submodule(other)):
                m.mode = QuantMode.QUANT
    if index == 0:
        return x_fp, x_fp
    x_q = None
    if step:
        x_q = step_block_input(model, *blocks[index - 1], previous[1], name, block, cfg.capture_batch_size,
                               device, store)
    if x_q is None:
        x_q = capture_block_input(model, name, block, images, cfg.capture_batch_size, device, store)
    return x_fp, keep_cache(x_q, cfg.cache_on_disk)


def block_seed(seed: int, index: int) -> int:
    """The seed of block ``index``: each block's random draws depend only on (seed, index), so a
    resumed run draws exactly what an uninterrupted one does."""
    return seed * 100003 + index


def reconstruct(model: nn.Module, images: torch.Tensor, cfg: ReconConfig, device: torch.device | str = "cpu",
                seed: int = 0, progress: bool = True, work_dir: str | Path | None = None,
                run_settings: dict[str, Any] | None = None, extension: BlockExtension | None = None,
                restart: bool = False, fold: bool = True) -> dict[str, Any]:
    """Reconstruct every block of a calibrated model in order; returns the per-block report.

    ``images``: the preprocessed optimisation images. With ``work_dir``, the state after each
    block is saved atomically there and a later call with the same model, images, settings and
    package versions resumes after the last finished block; anything else is refused with one
    line (``restart=True`` discards the old checkpoint instead). ``run_settings`` is what, beside
    ``cfg`` and ``seed``, identifies the run (the recipe). The global torch RNG is left as it was.
    With ``fold=False`` the final learned rounding stays installed (hard) instead of being folded
    into the weights, for a later stage that learns it further (``vitq.reconstruction.refine``).
    """
    device = torch.device(device)
    store = device if cfg.keep_on_device and not cfg.cache_on_disk else torch.device("cpu")
    cfg.autocast_context(device)  # refuses fp16 off CUDA before any work
    blocks = reconstruction_blocks(model)
    names = [n for n, _ in blocks]
    model.eval()
    folder = Path(work_dir) if work_dir is not None else None
    key: dict[str, str] = {}
    done: list[dict[str, Any]] = []
    world = distributed.world_size()
    if folder is not None:
        if restart and distributed.is_main():
            checkpoint.discard(folder)
        key = checkpoint.run_key(model, images,
                                 {"recon": checkpoint.recon_settings(cfg), "seed": seed, **(run_settings or {})})
        saved = _load_on_main(folder, key, world)
        if saved is not None:
            done, state = saved
            _restore_finished(model, blocks, done, state, cfg, extension)

    targets = None
    if cfg.loss in FISHER_LOSSES or cfg.loss == "brecq":
        set_mode(model, QuantMode.FLOAT)
        targets = torch.softmax(sharded_map(model, images, cfg.capture_batch_size, device, store) / cfg.temperature,
                                -1)
    features = None
    if cfg.global_weight > 0:
        set_mode(model, QuantMode.FLOAT)
        features = penultimate_features(model, images, cfg.capture_batch_size, device, store)
    finished = {d["block"] for d in done}
    todo = [name for name in names if name not in finished]
    t_start = time.perf_counter()
    previous: list | None = None
    for k, name in enumerate(todo):
        index = names.index(name)
        block = blocks[index][1]
        eta = ""
        if k > 0:
            eta = f", ~{(time.perf_counter() - t_start) / k * (len(todo) - k) / 60:.1f} min left"
        # fork_rng: the per-block seed must not leak into the caller's global RNG
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), PeakMemory(device) as mem, \
                compiled_kernels(compiles(cfg.compile_kernels, cfg.iters)):
            torch.manual_seed(block_seed(seed, index))  # QDrop masks inside the quantizers
            gen = torch.Generator().manual_seed(block_seed(seed, index))
            t0 = time.perf_counter()
            x_fp, x_q = _block_inputs(model, blocks, index, images, cfg, device, store, previous)
            previous = None
            y_fp = float_block_outputs(model, block, x_fp, cfg, device, store)
            block_cfg = replace(cfg, iters=cfg.iters_for(index))  # the first transformer block's own budget
            summary = reconstruct_block(model, name, block, x_fp, x_q, targets, block_cfg, device, gen, progress,
                                        desc=f"block {index + 1}/{len(blocks)} {name}{eta}", extension=extension,
                                        features=features, y_fp=y_fp)
            summary["seconds"] = round(time.perf_counter() - t0, 3)
            summary["kernels"] = compile_status()  # compiled, eager, or eager after a failed compile
            previous = [index, x_q, y_fp]  # the next block's inputs step on from these
            del x_fp, x_q, y_fp
        summary.update(mem.summary())
        done.append(summary)
        if folder is not None and distributed.is_main():
            checkpoint.save_progress(folder, key, done, model, world)
        if progress:
            tqdm.write(f"  {name}: {summary['seconds']:.1f}s, rec loss {summary['final_rec_loss']:.4f}, "
                       f"output MSE {summary['output_mse_calibrated']:.5f} -> {summary['output_mse_fp_input']:.5f}")
    final = extension.finalize(model) if extension is not None else {}
    if fold:
        fold_learned_rounding(model)
    set_mode(model, QuantMode.QUANT)
    return {"blocks": done, "seconds": round(sum(d["seconds"] for d in done), 3), **final}
