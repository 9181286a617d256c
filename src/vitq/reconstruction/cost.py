"""What a reconstruction run will cost, predicted before it starts from two measured floors.

The floors are plain PyTorch on the float model, measured on this device in a few seconds:

* iteration floor of a block: forward + backward of the float block at the reconstruction batch
  (weights trainable): the hardware's own cost of one optimisation step of that block;
* snapshot floor of a block: forward from the block's output through the rest of the network
  to the logits and backward to the block output, over every optimisation image.

A run costs ``sum over blocks of iters x ITER_RATIO x iteration floor + snapshots x SNAP_RATIO x
snapshot floor``; the ratios are what the engine spends over the floors, measured by
``benchmarks/speed.py`` on this CPU (speed.md) and used as defaults elsewhere.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..adapters import forward_after, is_head_block, reconstruction_blocks
from ..qmodules import QuantMode, set_mode
from .capture import capture_block_input
from .config import FISHER_LOSSES, ReconConfig

# Engine time over the floors (benchmarks/speed.md, cifar10_vit and deit_small blocks on this CPU)
ITER_RATIO = 2.0
SNAP_RATIO = 1.1


@dataclass
class RunEstimate:
    """Predicted reconstruction seconds, per block and in all."""

    seconds: float
    per_block: dict[str, float] = field(default_factory=dict)
    floors: dict[str, dict[str, float]] = field(default_factory=dict)

    def describe(self) -> str:
        """``about 3 h 10 min`` style text."""
        s = self.seconds
        if s >= 3600:
            return f"about {int(s // 3600)} h {int(s % 3600 // 60)} min"
        if s >= 60:
            return f"about {s / 60:.0f} min"
        return f"about {s:.0f} s"


def _timed(fn, repeats: int, device: torch.device) -> float:
    """The best of ``repeats`` timed calls after a warm-up (allocations, kernel choice)."""
    def call() -> None:
        fn()
        if device.type == "cuda":  # the work is queued: wait for it
            torch.cuda.synchronize(device)

    call()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def iteration_floor(block: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Seconds of forward + backward of a float copy of ``block`` on ``x`` (weights trainable)."""
    twin = copy.deepcopy(block)
    set_mode(twin, QuantMode.FLOAT)
    for p in twin.parameters():
        p.requires_grad_(True)

    def step() -> None:
        twin.zero_grad(set_to_none=True)
        twin(x).pow(2).mean().backward()

    return _timed(step, repeats, x.device)


def snapshot_floor(model: nn.Module, name: str, y: torch.Tensor, n_images: int, repeats: int = 2) -> float:
    """Seconds of forward from block ``name``'s output ``y`` to the logits and backward to ``y``,
    scaled from ``len(y)`` to ``n_images`` images."""
    set_mode(model, QuantMode.FLOAT)

    def step() -> None:
        out = y.detach().requires_grad_(True)
        torch.autograd.grad(torch.log_softmax(forward_after(model, name, out), -1).sum(), out)

    return _timed(step, repeats, y.device) * n_images / len(y)


def estimate_reconstruction(model: nn.Module, images: torch.Tensor, cfg: ReconConfig,
                            device: torch.device | str = "cpu", iter_ratio: float = ITER_RATIO,
                            snap_ratio: float = SNAP_RATIO) -> RunEstimate:
    """Predict the reconstruction time of ``model`` (float or prepared) with ``cfg`` on ``device``.

    Uses ``cfg.batch_size`` of ``images`` to measure the floors of every block on ``device``
    (the model is moved there, as :func:`vitq.quantize` does); leaves the model's modes as FLOAT
    and its parameters' ``requires_grad`` as they were.
    """
    device = torch.device(device)
    model.to(device)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    set_mode(model, QuantMode.FLOAT)
    x_img = images[: cfg.batch_size].to(device)
    est = RunEstimate(0.0)
    snaps = cfg.rank if cfg.loss in FISHER_LOSSES else 0
    try:
        for name, block in reconstruction_blocks(model):
            x = capture_block_input(model, name, block, x_img, cfg.batch_size, device, device)
            it_floor = iteration_floor(block, x)
            snap = 0.0
            if snaps and not is_head_block(model, name):
                with torch.no_grad():
                    y = block(x)
                snap = snapshot_floor(model, name, y, cfg.optim_size)
            seconds = cfg.iters * iter_ratio * it_floor + snaps * snap_ratio * snap
            est.floors[name] = {"iteration_s": it_floor, "snapshot_s": snap}
            est.per_block[name] = seconds
            est.seconds += seconds
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return est
