"""What a reconstruction run holds in memory per rank, predicted before it starts.

Every rank holds what one process holds (``vitq.distributed``: the caches are gathered, so a rank
can draw any sample of the global batch), so the formula does not shrink with the world size; only
the transient copies of a gather grow a little. Per rank, in bytes, with ``n`` optimisation images:

* ``model``: the float model's parameters and buffers;
* ``targets``: the FP soft labels over the images, ``n x classes`` (Fisher / BRECQ losses), and the
  logits they come from while they are made;
* per block, the largest over the blocks of
  * ``caches``: ``X_fp`` and ``X_q`` (``n x`` block-input elements each; the first block has one)
    and ``Y_fp`` (``n x`` block-output elements), on the device, the host or disk (``cache``);
  * the largest of three moments: capturing a cache (the chunks and the gathered copy, about
    ``2 + 3/world`` inputs' worth beside the caches), an optimisation step (the tensors autograd
    saves for the block's backward at the reconstruction batch, measured on the quantized block at
    batch 1 and scaled) and a snapshot pass (saved tensors of the rest of the network at the
    capture batch, measured the same way);
  * ``rounding``: the AdaRound variables with their gradient and Adam's two moments (4 x the
    block's weights), and the Fisher snapshots (3 x k block outputs; BRECQ: n per-sample gradients).

Float32 throughout (4 bytes per element). The measured parts come from a quick min-max
calibration of a copy of the model on two random images, so no data is needed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..adapters import forward_after, is_head_block, reconstruction_blocks
from ..qmodules import QuantMode, set_mode
from .capture import capture_block_input
from .config import FISHER_LOSSES, ReconConfig
from .rounding import activation_quantizers, block_quant_modules, install_learned_rounding

BYTES = 4  # float32


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of one rank, with the parts it is made of."""

    total_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    largest_block: str = ""
    per_block: dict[str, dict[str, int]] = field(default_factory=dict)

    def describe(self) -> str:
        return f"about {self.total_bytes / 2**30:.2f} GiB per rank (largest block {self.largest_block})"


def _saved_bytes(fn, model: nn.Module) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn()`` runs: its activations, not the
    parameters and buffers of ``model`` it keeps references to (those do not grow with the batch)."""
    seen: dict[tuple[int, int], int] = {}
    held = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel():
            storage = t.untyped_storage()
            if storage.data_ptr() not in held:
                seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _quick_calibrated(model: nn.Module, image_shape: tuple[int, ...]) -> nn.Module:
    import vitq

    twin = copy.deepcopy(model).float().cpu()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn((2, *image_shape), generator=gen)
    return vitq.quantize(twin, images, "minmax", w_bits=4, a_bits=4, calib_size=2, progress=False, device="cpu",
                         process_group=False)


@dataclass
class BlockFootprint:
    """What one block holds, measured at batch 1 (elements and bytes per sample)."""

    name: str
    in_elements: int
    out_elements: int
    step_bytes_per_sample: int       # autograd's saved tensors of one optimisation step
    snapshot_bytes_per_sample: int   # saved tensors of a snapshot pass through the rest (0 for the head)
    weights: int


@dataclass
class ModelFootprint:
    """The measured side of the formula: one pass over the blocks, reused for every setting."""

    model_bytes: int
    classes: int
    blocks: list[BlockFootprint]
    adaround: bool
    drop_prob: float


def measure_footprint(model: nn.Module, image_shape: tuple[int, ...] = (3, 224, 224), adaround: bool = True,
                      drop_prob: float = 0.5, num_classes: int | None = None) -> ModelFootprint:
    """Measure every block of ``model`` (a float model) at batch 1 on a quickly calibrated copy."""
    quant = _quick_calibrated(model, image_shape)
    for p in quant.parameters():  # frozen, as during reconstruction: no weight gradients are kept
        p.requires_grad_(False)
    set_mode(quant, QuantMode.FLOAT)
    one = torch.randn((1, *image_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = quant(one)
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    blocks = []
    for name, block in reconstruction_blocks(quant):
        set_mode(quant, QuantMode.FLOAT)
        x = capture_block_input(quant, name, block, one, 1, torch.device("cpu"), torch.device("cpu"))
        with torch.no_grad():
            y = block(x)
        # one optimisation step at batch 1 on the quantized block: learned rounding, trainable scales
        for m in block_quant_modules(block):
            m.mode = QuantMode.QUANT
        installed = install_learned_rounding(block) if adaround else []
        for q in activation_quantizers(block):
            q.train()
            q.set_qdrop(drop_prob)
            for params in q.trainable_parameters().values():
                for p in params:
                    p.requires_grad_(True)
        for q in installed:
            for p in q.trainable_parameters().get("rounding", []):
                p.requires_grad_(True)
        step = _saved_bytes(lambda: block(x.detach()).float().pow(2).mean(), quant)  # a cached input: no grad
        for q in activation_quantizers(block):
            q.eval()
            q.set_qdrop(1.0)
        set_mode(quant, QuantMode.FLOAT)
        snapshot = 0
        if not is_head_block(quant, name):
            out = y.detach().requires_grad_(True)
            snapshot = _saved_bytes(lambda: forward_after(quant, name, out), quant)
        weights = sum(m.weight.numel() for m in block_quant_modules(block) if getattr(m, "weight", None) is not None)
        blocks.append(BlockFootprint(name, x[0].numel(), y[0].numel(), step, snapshot, weights))
    return ModelFootprint(model_bytes, num_classes or logits.shape[-1], blocks, adaround, drop_prob)


def reconstruction_memory(model: nn.Module | None, cfg: ReconConfig, image_shape: tuple[int, ...] = (3, 224, 224),
                          world_size: int = 1, num_classes: int | None = None,
                          cache: str = "memory", footprint: ModelFootprint | None = None) -> MemoryEstimate:
    """Predict one rank's peak memory for reconstructing ``model`` (a float model) with ``cfg``.

    ``cache``: ``memory`` (device or host: counted) or ``disk`` (memory-mapped files: not counted).
    ``footprint``: a :func:`measure_footprint` of the model (then ``model`` may be None), so that
    several settings cost one measurement.
    """
    if footprint is None or footprint.adaround != cfg.adaround or footprint.drop_prob != cfg.drop_prob:
        if model is None:
            raise ValueError("a footprint measured with this adaround / drop_prob, or the model to measure")
        footprint = measure_footprint(model, image_shape, cfg.adaround, cfg.drop_prob, num_classes)
    n = cfg.optim_size
    classes = num_classes or footprint.classes
    fisher = cfg.loss in FISHER_LOSSES
    targets = 2 * n * classes * BYTES if (fisher or cfg.loss == "brecq") else 0
    est = MemoryEstimate(0, {"model": footprint.model_bytes, "targets": targets})
    best = -1
    for index, b in enumerate(footprint.blocks):
        in_el, out_el = b.in_elements, b.out_elements
        caches = n * ((1 if index == 0 else 2) * in_el + out_el) * BYTES if cache == "memory" else 0
        capture = int(n * in_el * BYTES * (2 + (3 / world_size if world_size > 1 else 0)))
        step = b.step_bytes_per_sample * cfg.batch_size + 2 * cfg.batch_size * out_el * BYTES  # + output, its grad
        snapshot = b.snapshot_bytes_per_sample * cfg.capture_batch_size if fisher else 0
        rounding = 4 * b.weights * BYTES if cfg.adaround else 0
        extra = (3 * cfg.rank * out_el * BYTES if fisher else 0) + (n * out_el * BYTES if cfg.loss == "brecq" else 0)
        if fisher and cfg.snapshot_images is not None and cfg.snapshot_images < n:
            # the subset's copies of the block's input, float output and targets during a refresh
            extra += cfg.snapshot_images * (in_el + out_el + classes) * BYTES
        parts = {"caches": caches, "moment": max(capture, step, snapshot), "rounding": rounding + extra,
                 "capture": capture, "step": step, "snapshot": snapshot}
        est.per_block[b.name] = parts
        size = parts["caches"] + parts["moment"] + parts["rounding"]
        if size > best:
            best, est.largest_block = size, b.name
            est.parts.update({k: parts[k] for k in ("caches", "moment", "rounding")})
    est.total_bytes = int(sum(est.parts[k] for k in ("model", "targets", "caches", "moment", "rounding")))
    return est


def summary(est: MemoryEstimate) -> dict[str, Any]:
    """JSON-able view (MiB)."""
    mib = 2**20
    return {"total_mib": round(est.total_bytes / mib, 1), "largest_block": est.largest_block,
            "parts_mib": {k: round(v / mib, 1) for k, v in est.parts.items()},
            "per_block_mib": {b: {k: round(v / mib, 1) for k, v in p.items()} for b, p in est.per_block.items()}}


__all__ = ["BlockFootprint", "MemoryEstimate", "ModelFootprint", "measure_footprint", "reconstruction_memory",
           "summary"]
