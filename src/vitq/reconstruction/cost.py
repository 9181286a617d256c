"""What a reconstruction run will cost, predicted before it starts from two measured floors.

The floors are plain PyTorch on the float model, measured on this device in a few seconds:

* iteration floor of a block: forward + backward of the float block at the reconstruction batch
  (weights trainable): the hardware's own cost of one optimisation step of that block;
* snapshot floor of a block: forward from the block's output through the rest of the network
  to the logits and backward to the block output, over every optimisation image.

A run costs ``sum over blocks of iters x iteration ratio x iteration floor + snapshots x snapshot
ratio x snapshot floor``. The ratios, what the engine spends over the floors, depend on the
machine far more than the floors do (the same cifar10_vit block: 1.6x on an earlier session's CPU, 3.2x on
an AVX-512 Xeon with the same kernels; benchmarks/speed.md), so they are measured too: a handful of
real engine iterations and one snapshot over a few images on a minmax-calibrated copy of the
block with the largest floor, on the kernel path the run will take (compiled kernels are
compiled here once and reused by the run). ``SNAP_RATIO`` is the snapshot ratio used when the
iteration ratio is given instead of measured.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..adapters import QuantSpec, forward_after, is_head_block, prepare, reconstruction_blocks
from ..qmodules import QuantMode, QuantModule, set_mode
from ..quantizers.kernels import compiled_kernels
from .capture import capture_block_input
from .config import FISHER_LOSSES, ReconConfig, compiles

# Snapshot time over its floor when not measured (benchmarks/speed.md: 1.0-1.5x on cifar10_vit and
# deit_small blocks)
SNAP_RATIO = 1.1
# engine iterations timed for the iteration ratio (the median of their steps)
RATIO_ITERS = 9


@dataclass
class RunEstimate:
    """Predicted reconstruction seconds, per block and in all."""

    seconds: float
    per_block: dict[str, float] = field(default_factory=dict)
    floors: dict[str, dict[str, float]] = field(default_factory=dict)
    iter_ratio: float = 0.0          # engine iteration over its floor
    snap_ratio: float = 0.0          # engine snapshot over its floor
    ratio_block: str | None = None   # the block both were measured on (None: given, not measured)

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


def engine_ratios(model: nn.Module, name: str, images: torch.Tensor, cfg: ReconConfig,
                  spec: QuantSpec | None, device: torch.device, snapshots: bool) -> tuple[float, float | None]:
    """(engine iteration / iteration floor, engine snapshot / snapshot floor or None) of block ``name``,
    each pair timed back to back (so they share the machine's load) on a minmax-calibrated copy of
    ``model`` (prepared with ``spec`` unless it already is), on the kernel path ``cfg`` gives the run.

    The iterations use plain MSE (a Fisher loss's extra per iteration is a few elementwise ops)
    and no method extension; the snapshot covers ``2 x batch_size`` images with QDrop on, as in a
    run (a snapshot also runs the quantized block, which its floor does not).
    """
    from ..calibration import CalibConfig, calibrate
    from .block import reconstruct_block
    from .fisher import _take_snapshot
    from .rounding import activation_quantizers, block_quant_modules

    twin = copy.deepcopy(model)
    if not any(isinstance(m, QuantModule) for m in twin.modules()):
        prepare(twin, spec)
    x_img = images[: 2 * cfg.batch_size].to(device)
    calibrate(twin, x_img, CalibConfig(method="minmax", reparam=False), device, progress=False)
    set_mode(twin, QuantMode.FLOAT)
    block = twin.get_submodule(name)
    x = capture_block_input(twin, name, block, x_img, cfg.batch_size, device, device)

    def run(iters: int) -> list[float]:
        """The wall time at the end of each optimiser step of an ``iters``-iteration run."""
        trial = copy.deepcopy(twin)
        short = replace(cfg, loss="mse", iters=iters, global_weight=0.0, log_every=max(iters, 1))
        stamps: list[float] = []

        def stamp(_it: int) -> None:
            if device.type == "cuda":  # the step is queued: wait for it
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            reconstruct_block(trial, name, trial.get_submodule(name), x, x, None, short, device,
                              torch.Generator().manual_seed(0), progress=False, on_step=stamp)
        return stamps

    with compiled_kernels(compiles(cfg.compile_kernels, cfg.iters)):
        run(1)  # warm-up: allocations, and the one-off compilation the run then reuses
        stamps = run(RATIO_ITERS)
        # the median step: robust to a step slowed by another process on the core (or a log step)
        engine = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        it_ratio = engine / iteration_floor(block, x[: cfg.batch_size], repeats=5)
        if not snapshots:
            return it_ratio, None
        with torch.no_grad():
            y_fp = block(x)
            targets = torch.softmax(twin(x_img) / cfg.temperature, -1)
        for m in block_quant_modules(block):
            m.mode = QuantMode.QUANT
        for q in activation_quantizers(block):
            q.train()
            q.set_qdrop(cfg.drop_prob if cfg.snapshot_qdrop else 1.0)
        snap = _timed(lambda: _take_snapshot(twin, name, block, x, y_fp, targets, cfg, device, None), 2, device)
        set_mode(twin, QuantMode.FLOAT)
        return it_ratio, snap / snapshot_floor(twin, name, y_fp, len(x))


def estimate_reconstruction(model: nn.Module, images: torch.Tensor, cfg: ReconConfig,
                            device: torch.device | str = "cpu", iter_ratio: float | None = None,
                            snap_ratio: float = SNAP_RATIO, spec: QuantSpec | None = None) -> RunEstimate:
    """Predict the reconstruction time of ``model`` (float or prepared) with ``cfg`` on ``device``.

    Uses ``cfg.batch_size`` of ``images`` to measure the floors of every block on ``device``
    (the model is moved there, as :func:`vitq.quantize` does) and, unless ``iter_ratio`` is given,
    the engine's own iteration and snapshot on the block with the largest floor (a copy prepared
    with the run's ``spec``; ``snap_ratio`` then applies only to a loss without snapshots); leaves
    the model's modes as FLOAT and its parameters' ``requires_grad`` as they were.
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
            snap = 0.0
            if snaps and not is_head_block(model, name):
                with torch.no_grad():
                    y = block(x)
                snap = snapshot_floor(model, name, y, cfg.snapshot_images or cfg.optim_size)
            est.floors[name] = {"iteration_s": iteration_floor(block, x), "snapshot_s": snap}
        if iter_ratio is None:
            inner = [n for n in est.floors if not is_head_block(model, n)] or list(est.floors)
            est.ratio_block = max(inner, key=lambda n: est.floors[n]["iteration_s"])
            iter_ratio, measured_snap = engine_ratios(model, est.ratio_block, images, cfg, spec, device,
                                                      snaps > 0 and not is_head_block(model, est.ratio_block))
            snap_ratio = measured_snap if measured_snap is not None else snap_ratio
        est.iter_ratio, est.snap_ratio = iter_ratio, snap_ratio
        for index, (name, f) in enumerate(est.floors.items()):
            est.per_block[name] = cfg.iters_for(index) * iter_ratio * f["iteration_s"] + snaps * snap_ratio * f["snapshot_s"]
            est.seconds += est.per_block[name]
    finally:
        set_mode(model, QuantMode.FLOAT)
        for p, flag in flags:
            p.requires_grad_(flag)
    return est
