"""Engine speed: reconstruction iteration and Fisher snapshot pass against their plain-PyTorch floors.

    python benchmarks/speed.py                      # groups: blocks, e2e
    python benchmarks/speed.py --groups blocks      # the per-block ratios only (minutes)

Group ``blocks``: for one block of ``cifar10_vit`` (32 px) and of ``deit_small_patch16_224`` (224 px,
random weights, ImageNet sample images), batch 32, W3A3 fimaq quantizers:

* seconds per reconstruction iteration, through vitq's engine (``reconstruct_block``), with the fast
  kernels (today) and the reference ones (``vitq.quantizers.kernels.reference_kernels``, the path
  before this benchmark), from the difference of two runs of different lengths;
* seconds per Fisher snapshot pass (the engine's ``_take_snapshot`` over the optimisation images);
* the two floors measured in the same process (``vitq.reconstruction.cost``): forward + backward
  of the float block at batch 32, and forward from the block's output to the logits + backward
  over the same images;
* the top operators of 20 fast iterations (``torch.profiler``).

Group ``e2e``: ``vitq quantize``'s path (``quantize_with_summary``) for ``cifar10_vit`` W3A3 fimaq,
500 iterations per block, seed 0, once on the reference kernels and once on the fast ones, one
process, one thread: wall time per stage and top-1 on the 10k test images; and the cost model's
prediction (``estimate_reconstruction``) against the measured reconstruction time.

Group ``overhead``: the compiled iteration of the same blocks with QDrop, the learned activation
scales or AdaRound switched off, one at a time, against the floor: what each costs.

Group ``agreement``: whether the kernel paths learn the same block (parameters, learned rounding,
block output after 300 steps), against the difference a change of seed makes.

Writes ``speed.json`` and ``speed.md`` next to this script, after every measurement (resumable).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from typing import Iterator
from pathlib import Path

import torch

import vitq
from vitq.adapters import forward_after, prepare
from vitq.calibration import CalibConfig, calibrate
from vitq.data import atomic_write_bytes, build_dataset, make_loader, resolve_data
from vitq.evaluation import evaluate
from vitq.models import eval_transform
from vitq.qmodules import QuantMode, set_mode
from vitq.quantizers.kernels import compiled_kernels, float_draws, reference_kernels
from vitq.reconstruction import ReconConfig, capture_block_input, reconstruct_block
from vitq.reconstruction.config import compiles
from vitq.reconstruction.cost import _timed, estimate_reconstruction, iteration_floor, snapshot_floor
from vitq.reconstruction.fisher import _take_snapshot
from vitq.reconstruction.rounding import activation_quantizers, block_quant_modules
from vitq.report import machine, versions

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SAMPLE = HERE.parents[1] / "shared/data/imagenet-sample-128.tar.gz"
EVAL_BATCH = 100


def block_setup(which: str) -> tuple:
    """(model prepared + minmax-calibrated, block name, block input, targets) for one test block."""
    return block_setup_with_images(which)[:4]


def block_setup_with_images(which: str) -> tuple:
    """:func:`block_setup`'s tuple and the preprocessed images it was built from."""
    if which == "cifar10_vit":
        model = vitq.load_model("cifar10_vit").eval()
        images = vitq.calibration_images(model, "cifar10", 1024, seed=0)
        name = "blocks.1"
    else:
        import timm

        from calibration import imagenet_sample  # benchmarks/calibration.py

        model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        images = imagenet_sample(SAMPLE, model)
        name = "blocks.0"
    prepare(model, vitq.get_recipe("fimaq", w_bits=3, a_bits=3).quant_spec())
    calibrate(model, images[:32], CalibConfig(method="minmax", reparam=False), "cpu", progress=False)
    set_mode(model, QuantMode.FLOAT)
    for p in model.parameters():  # as in the engine: only what a block learns is trainable
        p.requires_grad_(False)
    block = model.get_submodule(name)
    x = capture_block_input(model, name, block, images, 32, torch.device("cpu"), torch.device("cpu"))
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + 64]) for i in range(0, len(images), 64)])
    return model, name, x, torch.softmax(logits / 20, -1), images


# the kernel paths compared: the plain-autograd one before this benchmark (QDrop coins from float
# draws), the fused autograd functions run eagerly, the same functions through torch.compile with
# the float draws (the compiled path before 16-bit coins) and with 16-bit coins (today)
PATHS = ("reference", "fast", "compiled_float_draws", "compiled")


@contextlib.contextmanager
def kernel_path(path: str) -> Iterator[None]:
    """The context that selects ``path`` (the engine's own compile switch is set by ``recon_config``)."""
    with reference_kernels(path == "reference"), compiled_kernels(path.startswith("compiled")), \
            float_draws(path in ("reference", "compiled_float_draws")):
        yield


def recon_config(path: str, **kwargs) -> ReconConfig:
    return ReconConfig(compile_kernels="on" if path.startswith("compiled") else "off", **kwargs)


def engine_seconds(model, name, x, targets, iters: int, path: str, on_step=None, **settings) -> float:
    """Wall seconds of reconstruct_block (mse loss: no snapshot) on a copy of the model; ``settings``
    override the ReconConfig, ``on_step`` is the engine's per-step callback."""
    m = copy.deepcopy(model)
    with kernel_path(path):
        t0 = time.perf_counter()
        reconstruct_block(m, name, m.get_submodule(name), x, x, targets,
                          recon_config(path, loss="mse", iters=iters, **settings), torch.device("cpu"),
                          torch.Generator().manual_seed(0), progress=False, on_step=on_step)
    return time.perf_counter() - t0


def snapshot_seconds(model, name, x, targets, path: str) -> float:
    m = copy.deepcopy(model)
    block = m.get_submodule(name)
    for mod in block_quant_modules(block):
        mod.mode = QuantMode.QUANT
    for q in activation_quantizers(block):  # QDrop on during snapshots, as in the engine
        q.train()
        q.set_qdrop(0.5)
    with kernel_path(path), torch.no_grad():
        y_fp = torch.cat([model.get_submodule(name)(x[i:i + 64]) for i in range(0, len(x), 64)])
    cfg = recon_config(path)
    with kernel_path(path):
        t0 = time.perf_counter()
        _take_snapshot(m, name, block, x, y_fp, targets, cfg, torch.device("cpu"), None)
        return time.perf_counter() - t0


def profile_top(model, name, x, targets, n: int = 20, top: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    engine_seconds(model, name, x, targets, 2, "compiled")  # compiled before the profile starts
    m = copy.deepcopy(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof, compiled_kernels():
        reconstruct_block(m, name, m.get_submodule(name), x, x, targets, recon_config("compiled", loss="mse", iters=n),
                          torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in rows[:top]]


def measure_block(which: str, short: int, long: int) -> dict:
    model, name, x, targets = block_setup(which)
    out: dict = {"block": name, "images": len(x), "batch": 32, "load_avg": os.getloadavg()[0]}
    # the floors, then the engine (both kernel paths), then the floors again: the mean of both
    floors_a = (iteration_floor(model.get_submodule(name), x[:32]),
                snapshot_floor(model, name, model.get_submodule(name)(x[:64]).detach(), len(x)))
    for label in PATHS:
        if label.startswith("compiled"):  # the one-off compilation (per graph) outside the timed runs
            engine_seconds(model, name, x, targets, 2, label)
            snapshot_seconds(model, name, x[:128], targets[:128], label)
        t_short = engine_seconds(model, name, x, targets, short, label)
        t_long = engine_seconds(model, name, x, targets, long, label)
        out[f"iteration_s_{label}"] = (t_long - t_short) / (long - short)
        out[f"snapshot_s_{label}"] = snapshot_seconds(model, name, x, targets, label)
    floors_b = (iteration_floor(model.get_submodule(name), x[:32]),
                snapshot_floor(model, name, model.get_submodule(name)(x[:64]).detach(), len(x)))
    out["iteration_floor_s"] = (floors_a[0] + floors_b[0]) / 2
    out["snapshot_floor_s"] = (floors_a[1] + floors_b[1]) / 2
    for label in PATHS:
        out[f"iteration_ratio_{label}"] = out[f"iteration_s_{label}"] / out["iteration_floor_s"]
        out[f"snapshot_ratio_{label}"] = out[f"snapshot_s_{label}"] / out["snapshot_floor_s"]
    out["profile_compiled"] = profile_top(model, name, x, targets)
    return out


class NativeFakeQuant(torch.nn.Module):
    """One calibrated quantizer as PyTorch's own fake-quantization op (the QAT building block).

    Weights: ``torch.fake_quantize_per_channel_affine`` (straight-through gradient to the weight,
    which is trainable: the plain counterpart of learned rounding). Activations and attention
    operands: ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` with the scale trainable
    (the plain counterpart of vitq's learned activation scales). No QDrop, no rounding variables.
    """

    def __init__(self, view, weight: bool) -> None:
        super().__init__()
        self.weight, self.axis, self.qmin, self.qmax = weight, view.axis, view.qmin, view.qmax
        scale, zp = torch.broadcast_tensors(view.scale.float(), view.zero_point.float())
        if weight:  # per output channel
            self.register_buffer("scale", scale.reshape(-1))
            self.register_buffer("zero_point", zp.reshape(-1).to(torch.int32))
        elif view.axis is None:
            self.scale = torch.nn.Parameter(scale.reshape(-1))
            self.register_buffer("zero_point", zp.reshape(-1))
        else:
            # per token and/or head: PyTorch's op keeps one axis, so the kept axes are merged into one
            # when they are adjacent (per token: axis 1 as it is; per head and token of q: one view),
            # else every element of a sample gets its own (scale, zero point) on the flattened sample
            kept = [d for d in range(1, scale.dim()) if scale.shape[d] > 1]
            first, last = (kept[0], kept[-1]) if kept else (1, 1)
            self.span = (first, last) if last - first + 1 == len(kept) else None
            self.scale_full, self.zp_full = scale, zp
            self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, 0, self.qmin, self.qmax)
        if self.axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, self.qmin,
                                                                    self.qmax, 1.0)
        if self.span is not None:
            a, b = self.span
            shape = (*x.shape[:a], -1, *x.shape[b + 1:])
        else:
            a, shape = 1, (len(x), -1)
        if self.scale is None:  # built at the first call, when the sample's shape is known
            full = (1, *x.shape[1:])
            s, z = self.scale_full.expand(full), self.zp_full.expand(full)
            if self.span is not None:  # one value per position of the merged axis
                index = tuple(slice(None) if a <= d <= b else 0 for d in range(len(full)))
                s, z = s[index], z[index]
            self.scale = torch.nn.Parameter(s.reshape(-1).clone())
            self.register_buffer("zero_point", z.reshape(-1).clone())
        y = torch._fake_quantize_learnable_per_channel_affine(x.reshape(shape), self.scale, self.zero_point,
                                                              a, self.qmin, self.qmax, 1.0)
        return y.reshape(x.shape)


def native_twin(block: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """A copy of the calibrated ``block`` with every quantizer replaced by :class:`NativeFakeQuant`
    (PyTorch's own fake-quantization ops, same scales and zero points), and the layouts it used."""
    twin = copy.deepcopy(block)
    layouts = []
    for mod in block_quant_modules(twin):
        for slot in ("w_quantizer", "a_quantizer", "b_quantizer"):
            q = getattr(mod, slot, None)
            if q is None or not q.enabled:
                continue
            view = q.integer_view()
            assert view.kind == "uniform", view.kind  # fimaq's spec: uniform quantizers only
            setattr(mod, slot, NativeFakeQuant(view, weight=slot == "w_quantizer"))
            layouts.append(f"{slot}:{'tensor' if view.axis is None else 'axis' + str(view.axis)}")
        mod.mode = QuantMode.QUANT
    return twin, sorted(set(layouts))


def native_fake_quant_floor(block: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> tuple[float, list[str]]:
    """Seconds of forward + backward of ``block`` fake-quantized with PyTorch's own ops, weights and
    activation scales trainable (the issue's 'same fake-quantized block' floor, a QAT step), and
    the quantizer layouts it used."""
    twin, layouts = native_twin(block)
    for p in twin.parameters():
        p.requires_grad_(True)

    def step() -> None:
        twin.zero_grad(set_to_none=True)
        twin(x).pow(2).mean().backward()

    return _timed(step, repeats, x.device), layouts


def native_snapshot_floor(model: torch.nn.Module, name: str, twin: torch.nn.Module, x: torch.Tensor,
                          batch: int = 64) -> float:
    """Seconds of the issue's snapshot floor read literally, 'the forward + backward of the model from
    that block to the logits': the block's forward fake-quantized with PyTorch's ops (``twin``, no
    gradient: a snapshot needs none inside the block), then the float rest of the model forward and
    backward to the block's output, batch by batch over ``x`` as the engine's snapshot goes."""
    set_mode(model, QuantMode.FLOAT)
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        with torch.no_grad():
            out = twin(x[i:i + batch])
        out.requires_grad_(True)
        torch.autograd.grad(torch.log_softmax(forward_after(model, name, out), -1).sum(), out)
    return time.perf_counter() - t0


def measure_snapshot_floor(which: str, repeats: int = 3) -> dict:
    """The engine's snapshot pass against both snapshot floors, alternating, the median of ``repeats``
    each: the float rest of the model alone (the floor of the tables above) and the literal reading
    that starts at the block, fake-quantized with PyTorch's ops as the iteration's issue floor is."""
    model, name, x, targets = block_setup(which)
    block = model.get_submodule(name)
    twin, _ = native_twin(block)
    snapshot_seconds(model, name, x[:128], targets[:128], "compiled")  # compile the snapshot's graphs
    native_snapshot_floor(model, name, twin, x[:128])
    y = block(x[:64]).detach()
    snaps, rest, literal = [], [], []
    for _ in range(repeats):
        rest.append(snapshot_floor(model, name, y, len(x), repeats=1))
        literal.append(native_snapshot_floor(model, name, twin, x))
        snaps.append(snapshot_seconds(model, name, x, targets, "compiled"))
    out = {"block": name, "images": len(x), "load_avg": os.getloadavg()[0], "machine": machine(),
           "snapshot_s": snaps, "rest_floor_s": rest, "literal_floor_s": literal}
    out["ratio_rest"] = statistics.median(snaps) / statistics.median(rest)
    out["ratio_literal"] = statistics.median(snaps) / statistics.median(literal)
    return out


def measure_estimate_block(which: str = "deit_small_patch16_224", iters: int = 40) -> dict:
    """The cost model's prediction for one block against that block's measured reconstruction: the
    fimaq loss (k = 5 snapshots over every image), ``iters`` iterations, the run's kernel path."""
    model, name, x, targets, images = block_setup_with_images(which)  # the estimate starts from the images
    cfg = ReconConfig(loss="fimaq_dplr", iters=iters, optim_size=len(images))
    t0 = time.perf_counter()
    est = estimate_reconstruction(model, images, cfg, "cpu")
    estimate_s = time.perf_counter() - t0
    set_mode(model, QuantMode.FLOAT)
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    with compiled_kernels(compiles(cfg.compile_kernels, cfg.iters)):  # the path the engine takes
        reconstruct_block(m, name, m.get_submodule(name), x, x, targets, cfg, torch.device("cpu"),
                          torch.Generator().manual_seed(0), progress=False)
    measured = time.perf_counter() - t0
    return {"block": name, "images": len(images), "iters": iters, "snapshots": cfg.rank,
            "load_avg": os.getloadavg()[0], "machine": machine(), "estimate_s": estimate_s,
            "predicted_block_s": est.per_block[name], "measured_block_s": measured,
            "iter_ratio": est.iter_ratio, "snap_ratio": est.snap_ratio, "ratio_block": est.ratio_block,
            "floors": est.floors[name]}


def measure_qat_floor(which: str, iters: int) -> dict:
    """The compiled engine iteration against both floors, measured back to back in one run."""
    model, name, x, targets = block_setup(which)
    block = model.get_submodule(name)
    iteration_median(model, name, x, targets, 5)  # compile the engine's graphs first
    snapshot_seconds(model, name, x[:128], targets[:128], "compiled")  # and the snapshot's
    float_a, (native_a, layouts) = iteration_floor(block, x[:32]), native_fake_quant_floor(block, x[:32])
    engine = iteration_median(model, name, x, targets, iters)
    float_b, (native_b, _) = iteration_floor(block, x[:32]), native_fake_quant_floor(block, x[:32])
    out = {"block": name, "iters": iters, "load_avg": os.getloadavg()[0], "engine_iteration_s": engine,
           "float_floor_s": (float_a + float_b) / 2, "native_fake_quant_floor_s": (native_a + native_b) / 2,
           "native_layouts": layouts}
    out["ratio_float"] = engine / out["float_floor_s"]
    out["ratio_native_fake_quant"] = engine / out["native_fake_quant_floor_s"]
    # the snapshot pass against its floor, alternating, the median of three each: one pass is one
    # ~10 s measurement on this shared CPU, and single pairs moved by 0.2x from run to run
    y = block(x[:64]).detach()
    snaps, floors = [], []
    for _ in range(3):
        floors.append(snapshot_floor(model, name, y, len(x), repeats=1))
        snaps.append(snapshot_seconds(model, name, x, targets, "compiled"))
    out.update(snapshot_s=snaps, snapshot_floor_s=floors,
               snapshot_ratio=statistics.median(snaps) / statistics.median(floors))
    return out


# what each part of the engine's step costs: the iteration with one feature off at a time (compiled path)
OVERHEAD_SETTINGS = (
    ("all on (the fimaq step)", {}),
    ("QDrop off (quantized block input, no coins)", {"input_mode": "qinp"}),
    ("activation scales frozen", {"learn_act_scales": False}),
    ("AdaRound off (weights frozen: no weight-gradient matmuls)", {"adaround": False}),
    ("all three off", {"input_mode": "qinp", "learn_act_scales": False, "adaround": False}),
)


def iteration_median(model, name, x, targets, iters: int, **settings) -> float:
    """The median wall time of one compiled engine iteration (from the engine's per-step callback)."""
    stamps: list[float] = []
    engine_seconds(model, name, x, targets, iters, "compiled", lambda it: stamps.append(time.perf_counter()),
                   **settings)
    gaps = sorted(b - a for a, b in zip(stamps[2:], stamps[3:]))  # the first steps may still compile
    return gaps[len(gaps) // 2]


def measure_overhead(which: str, iters: int) -> dict:
    """The compiled iteration with QDrop, the learned activation scales or AdaRound off, against the floor."""
    model, name, x, targets = block_setup(which)
    floor_a = iteration_floor(model.get_submodule(name), x[:32])
    out: dict = {"block": name, "iters": iters, "load_avg": os.getloadavg()[0], "settings": {}}
    for label, settings in OVERHEAD_SETTINGS:
        iteration_median(model, name, x, targets, 5, **settings)  # compile this setting's graphs first
        out["settings"][label] = {"overrides": settings,
                                  "iteration_s": iteration_median(model, name, x, targets, iters, **settings)}
    out["iteration_floor_s"] = (floor_a + iteration_floor(model.get_submodule(name), x[:32])) / 2
    for cell in out["settings"].values():
        cell["ratio"] = cell["iteration_s"] / out["iteration_floor_s"]
    return out


def _reconstructed(model, name, x, targets, path: str, seed: int, iters: int) -> torch.nn.Module:
    """A copy of ``model`` with block ``name`` reconstructed on kernel path ``path``, seeded as the engine seeds."""
    m = copy.deepcopy(model)
    torch.manual_seed(seed)  # QDrop's draws (the engine seeds them per block)
    with kernel_path(path), float_draws():  # one random stream on every path: this compares the kernels
        reconstruct_block(m, name, m.get_submodule(name), x, x, targets, recon_config(path, loss="mse", iters=iters),
                          torch.device("cpu"), torch.Generator().manual_seed(seed), progress=False)
    return m


def measure_agreement(iters: int = 300) -> dict:
    """How far the kernel paths' trajectories drift apart on one block, against a change of seed.

    ``cifar10_vit`` blocks.1, W3A3, mse loss with QDrop, ``iters`` steps: the reference path with
    seeds 0 and 1, the fast and compiled paths with seed 0. For each against the reference at seed 0:
    the largest difference of any learned parameter, the share of weights whose learned rounding
    differs, and the block output's relative difference on 256 optimisation images.
    """
    model, name, x, targets = block_setup("cifar10_vit")
    runs = {label: _reconstructed(model, name, x, targets, path, seed, iters)
            for label, path, seed in (("reference", "reference", 0), ("fast", "fast", 0),
                                      ("compiled", "compiled", 0), ("reference seed 1", "reference", 1))}

    def weights(m) -> list[torch.Tensor]:
        with torch.no_grad():
            return [mod.w_quantizer(mod.weight) for mod in block_quant_modules(m.get_submodule(name))
                    if getattr(mod, "w_quantizer", None) is not None]

    def output(m) -> torch.Tensor:
        set_mode(m, QuantMode.QUANT)
        with torch.no_grad():
            return m.get_submodule(name)(x[:256])

    base, base_w, base_out = runs["reference"], weights(runs["reference"]), output(runs["reference"])
    out: dict = {"block": name, "iters": iters, "load_avg": os.getloadavg()[0]}
    for label in ("fast", "compiled", "reference seed 1"):
        m = runs[label]
        params = dict(m.get_submodule(name).named_parameters())
        max_param = max((p - params[k]).abs().max().item()
                        for k, p in base.get_submodule(name).named_parameters() if k in params and p.numel())
        w = weights(m)
        flips = sum(int((a != b).sum()) for a, b in zip(base_w, w)) / sum(a.numel() for a in base_w)
        rel_out = ((output(m) - base_out).norm() / base_out.norm()).item()
        out[label] = {"max_param_diff": max_param, "rounding_differs": flips, "output_rel_diff": rel_out}
    return out


def e2e_setup(path: str) -> tuple:
    """(float model, recipe, image pool) of the e2e cell on kernel path ``path``."""
    fp = vitq.load_model("cifar10_vit")
    recipe = vitq.get_recipe("fimaq", w_bits=3, a_bits=3, seed=0, reconstruction={
        "iters": 500, "compile_kernels": "on" if path.startswith("compiled") else "off"})
    return fp, recipe, vitq.calibration_images(fp, "cifar10", vitq.api.images_needed(recipe), seed=0)


def predict(fp, recipe, pool) -> dict:
    """The cost model's prediction, as the CLI makes it before a run."""
    t0 = time.perf_counter()
    est = estimate_reconstruction(copy.deepcopy(fp), pool, recipe.reconstruction, spec=recipe.quant_spec())
    return dict(predicted_reconstruction_s=est.seconds, estimate_cost_s=time.perf_counter() - t0,
                predicted_iteration_ratio=est.iter_ratio, predicted_snapshot_ratio=est.snap_ratio,
                load_avg_estimate=os.getloadavg()[0])


def measure_e2e(path: str) -> dict:
    fp, recipe, pool = e2e_setup(path)
    out: dict = {"load_avg_start": os.getloadavg()[0]}
    if path != "reference":
        out.update(predict(fp, recipe, pool))
    model = copy.deepcopy(fp)
    t0 = time.perf_counter()
    with kernel_path(path):
        result = vitq.quantize_with_summary(model, pool, recipe, device="cpu", progress=False)
    out["wall_s"] = time.perf_counter() - t0
    out["stages"] = {k: v["seconds"] for k, v in result.stages.items()}
    loader = make_loader(build_dataset(resolve_data("cifar10"), "eval", eval_transform(fp)), EVAL_BATCH)
    out["top1"] = evaluate(model, loader, progress=False)["top1"]
    out["load_avg_end"] = os.getloadavg()[0]
    return out


def _e2e_table(e2e: dict, title: str) -> list[str]:
    lines = ["", title, "", "| kernels | calibration s | reconstruction s | total s | top-1 |", "|---|---|---|---|---|"]
    for label in PATHS:
        c = e2e.get(label)
        if c:
            lines.append(f"| {label} | {c['stages']['calibration']:.0f} | {c['stages']['reconstruction']:.0f} | "
                         f"{c['wall_s']:.0f} | {c['top1']:.2f} |")
    labels = [p for p in PATHS if p in e2e]
    for a, b in zip(labels, labels[1:]):
        x, y = e2e[a], e2e[b]
        lines += ["", f"`{b}` against `{a}`: whole run **{x['wall_s'] / y['wall_s']:.2f}x** faster (calibration "
                  f"{x['stages']['calibration'] / y['stages']['calibration']:.2f}x, reconstruction "
                  f"{x['stages']['reconstruction'] / y['stages']['reconstruction']:.2f}x); top-1 {y['top1'] - x['top1']:+.2f}."]
    for label in labels:
        c = e2e[label]
        if "predicted_reconstruction_s" in c:
            how = ("the floors; a constant iteration ratio of 2.0" if "predicted_iteration_ratio" not in c else
                   f"the floors and the engine's iteration ratio, {c['predicted_iteration_ratio']:.2f}x"
                   + (f", and snapshot ratio, {c['predicted_snapshot_ratio']:.2f}x"
                      if "predicted_snapshot_ratio" in c else ""))
            lines += ["", f"Cost model for `{label}` (`estimate_reconstruction`, {c['estimate_cost_s']:.0f} s to measure "
                      f"{how}): predicted reconstruction {c['predicted_reconstruction_s']:.0f} s, measured "
                      f"{c['stages']['reconstruction']:.0f} s "
                      f"({c['predicted_reconstruction_s'] / c['stages']['reconstruction'] - 1:+.0%})."]
    return lines


def summarise(r: dict) -> str:
    lines = ["# Engine speed", "", f"Command: `{r['command']}`", "",
             "CPU, one thread, one process; every ratio compares two measurements of the same run. "
             "Floors: forward + backward of the float block at batch 32 (iteration) and forward from the "
             "block's output to the logits + backward to it over the optimisation images (snapshot), plain "
             "PyTorch (`vitq.reconstruction.cost`). Kernel paths: `reference` is the fake-quantization path "
             "before this benchmark (`vitq.quantizers.kernels.reference_kernels()`, QDrop's coins from float draws), "
             "`fast` the fused autograd functions run eagerly (`--compile off`), `compiled` the same functions "
             "through `torch.compile` (`--compile on`; `auto`, the default, compiles from 200 iterations per block); "
             "QDrop's coins are 16-bit draws, four to a 64-bit random number, except on `reference` and "
             "`compiled_float_draws` (the compiled path before 16-bit coins, `vitq.quantizers.kernels.float_draws()`).",
             ""]
    if r.get("machine"):
        m = r["machine"]
        lines += [f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, features {', '.join(m.get('features', []))}.", ""]
    blocks = r.get("blocks", {})
    if blocks:
        paths = [p for p in PATHS if all(f"iteration_s_{p}" in b for b in blocks.values())]
        head = " | ".join(f"{p} s (x floor)" for p in paths)
        lines += ["## One block, batch 32", "",
                  f"| model | block | images | iteration floor s | {head} | snapshot floor s | {head} |",
                  "|---|---|---|---|" + "---|" * len(paths) + "---|" + "---|" * len(paths)]
        for which, b in blocks.items():
            its = " | ".join(f"{b[f'iteration_s_{p}']:.4f} ({b[f'iteration_ratio_{p}']:.2f}x)" for p in paths)
            snaps = " | ".join(f"{b[f'snapshot_s_{p}']:.2f} ({b[f'snapshot_ratio_{p}']:.2f}x)" for p in paths)
            lines.append(f"| {which} | {b['block']} | {b['images']} | {b['iteration_floor_s']:.4f} | {its} | "
                         f"{b['snapshot_floor_s']:.2f} | {snaps} |")
        for which, b in blocks.items():
            lines += ["", f"Top operators of 20 compiled iterations, {which} (self CPU share):", ""]
            lines += [f"- `{p['op']}` {100 * p['share']:.1f}% ({p['calls']} calls)" for p in b["profile_compiled"]]
    if r.get("overhead"):
        lines += ["", "## Where the rest of an iteration goes: one feature off at a time (compiled path)", "",
                  "`python benchmarks/speed.py --groups overhead`: the median compiled iteration (mse loss, batch 32) "
                  "with QDrop (its coins, the block input's mix and the kernels' select), the learned activation "
                  "scales or AdaRound (the learned rounding, whose gradient needs the weight-gradient matmuls that "
                  "the float floor also runs) switched off, against the iteration floor measured in the same run.", "",
                  "| model | block | floor s | " + " | ".join(f"{k}" for k, _ in OVERHEAD_SETTINGS) + " |",
                  "|---|---|---|" + "---|" * len(OVERHEAD_SETTINGS)]
        for which, o in r["overhead"].items():
            cells = " | ".join(f"{o['settings'][k]['iteration_s']:.4f} ({o['settings'][k]['ratio']:.2f}x)"
                               for k, _ in OVERHEAD_SETTINGS if k in o["settings"])
            lines.append(f"| {which} | {o['block']} | {o['iteration_floor_s']:.4f} | {cells} |")
    if r.get("qat_floor"):
        lines += ["", "## The issue's floor: the same fake-quantized block in plain PyTorch", "",
                  "`python benchmarks/speed.py --groups qat_floor`: the median compiled engine iteration (mse loss, "
                  "batch 32, QDrop, learned rounding and activation scales) against two floors measured before and "
                  "after it in the same run: the float block (the floor of the tables above) and the same block "
                  "fake-quantized with PyTorch's own ops, a QAT step (`NativeFakeQuant`: "
                  "`torch.fake_quantize_per_channel_affine` on the weights, which are trainable, and "
                  "`torch._fake_quantize_learnable_per_{tensor,channel}_affine` on every activation and attention "
                  "operand with its scales trainable; the same scales and zero points as the calibrated block). It has "
                  "no QDrop and no rounding variables. It reproduces cifar10_vit's block output exactly; on DeiT-S "
                  "(random weights) PyTorch's ops clamp zero points into the code range (see the notes).", "",
                  "| model | block | engine s | float floor s | engine / float floor | fake-quant floor s | "
                  "engine / fake-quant floor | snapshot s (median of 3) | snapshot floor s | snapshot / floor | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for which, o in r["qat_floor"].items():
            lines.append(f"| {which} | {o['block']} | {o['engine_iteration_s']:.4f} | {o['float_floor_s']:.4f} | "
                         f"{o['ratio_float']:.2f}x | {o['native_fake_quant_floor_s']:.4f} | "
                         f"{o['ratio_native_fake_quant']:.2f}x | {statistics.median(o['snapshot_s']):.2f} | "
                         f"{statistics.median(o['snapshot_floor_s']):.2f} | {o['snapshot_ratio']:.2f}x | "
                         f"{o['load_avg']:.1f} |")
    if r.get("snapshot_floor"):
        lines += ["", "## The snapshot against the issue's floor read literally", "",
                  "`python benchmarks/speed.py --groups snapshot_floor`: one Fisher snapshot pass of the engine "
                  "(compiled kernels, QDrop on, over the block's images: cifar10_vit's 1024 optimisation images, "
                  "DeiT-S's 125 ImageNet sample images) against two floors, alternating, "
                  "the median of three each. **rest**: the float model from the block's output to the logits and "
                  "back (the floor of the tables above, which leaves the block itself out). **literal**: 'the model "
                  "from that block to the logits', the block included, fake-quantized with PyTorch's own ops as "
                  "the iteration's issue floor is (`native_twin`, no gradient inside the block, which a snapshot "
                  "does not need), then the same float rest.", "",
                  "| model | block | images | machine | snapshot s | rest floor s | snapshot / rest | literal floor s | "
                  "snapshot / literal | load |", "|---|---|---|---|---|---|---|---|---|---|"]
        for which, o in r["snapshot_floor"].items():
            lines.append(f"| {which} | {o['block']} | {o['images']} | {o['machine']['cpu']} | "
                         f"{statistics.median(o['snapshot_s']):.2f} | "
                         f"{statistics.median(o['rest_floor_s']):.2f} | {o['ratio_rest']:.2f}x | "
                         f"{statistics.median(o['literal_floor_s']):.2f} | {o['ratio_literal']:.2f}x | "
                         f"{o['load_avg']:.1f} |")
    if r.get("estimate_block"):
        e = r["estimate_block"]
        lines += ["", "## The cost model on one DeiT-S block", "",
                  f"`python benchmarks/speed.py --groups estimate_block`: `estimate_reconstruction` for "
                  f"deit_small_patch16_224 (random weights, the {e['images']} ImageNet sample images, fimaq loss, "
                  f"{e['iters']} iterations, k = {e['snapshots']} snapshots over every image), then {e['block']} "
                  f"reconstructed for real in the same run ({e['machine']['cpu']}, load {e['load_avg']:.1f}).", "",
                  "| block | predicted s | measured s | error | iteration ratio | snapshot ratio | estimate took s |",
                  "|---|---|---|---|---|---|---|",
                  f"| {e['block']} | {e['predicted_block_s']:.1f} | {e['measured_block_s']:.1f} | "
                  f"{100 * (e['predicted_block_s'] / e['measured_block_s'] - 1):+.0f}% | {e['iter_ratio']:.2f}x | "
                  f"{e['snap_ratio']:.2f}x | {e['estimate_s']:.0f} |"]
    if r.get("e2e"):
        lines += _e2e_table(r["e2e"], "## cifar10_vit W3A3 fimaq, 500 iterations, seed 0 (`quantize_with_summary`, "
                            "the CLI's path)")
    if r.get("e2e_before"):
        lines += _e2e_table(r["e2e_before"], "## The same, measured before the compiled kernels (an earlier run, "
                            "another machine of this kind: its ratios compare its own two cells)")
    if r.get("agreement"):
        a = r["agreement"]
        lines += ["", f"## Do the kernel paths learn the same? ({a['iters']} steps on {a['block']}, against the "
                  "reference path at seed 0)", "",
                  "`python benchmarks/speed.py --groups agreement`: cifar10_vit, W3A3, mse loss with QDrop; each path "
                  "from the same minmax-calibrated block, seeded as the engine seeds a block. A change of seed is the "
                  "scale of an honest difference.", "",
                  "| run | largest parameter difference | weights rounded differently | block output, relative difference |",
                  "|---|---|---|---|"]
        for label in ("fast", "compiled", "reference seed 1"):
            c = a[label]
            lines.append(f"| {label} | {c['max_param_diff']:.2e} | {100 * c['rounding_differs']:.4f}% | "
                         f"{c['output_rel_diff']:.2e} |")
    if r.get("notes"):  # what the numbers mean, written after the run (kept in the JSON)
        lines += ["", "## Reading the numbers", ""] + [f"- {n}" for n in r["notes"]]
    lines += ["", f"Versions: {r.get('versions')}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", nargs="*", default=["blocks", "e2e"])
    ap.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS, help="the e2e group's kernel paths")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = args.out / "speed.json"
    r = json.loads(path.read_text()) if path.is_file() else {}
    # the machine of the groups measured first; a group measured later on another records its own
    r.update(command="python benchmarks/speed.py", versions=versions())
    r.setdefault("machine", machine())

    def save() -> None:
        atomic_write_bytes(path, lambda fh: fh.write(json.dumps(r, indent=2).encode()))
        atomic_write_bytes(args.out / "speed.md", lambda fh: fh.write(summarise(r).encode()))

    if "blocks" in args.groups:
        for which, short, long in (("cifar10_vit", 40, 120), ("deit_small_patch16_224", 4, 12)):
            if which not in r.setdefault("blocks", {}):
                r["blocks"][which] = measure_block(which, short, long)
                save()
                print(which, {k: v for k, v in r["blocks"][which].items() if k != "profile_compiled"}, flush=True)
    if "overhead" in args.groups:
        for which, iters in (("cifar10_vit", 60), ("deit_small_patch16_224", 10)):
            r.setdefault("overhead", {})[which] = measure_overhead(which, iters)
            save()
            print(which, r["overhead"][which], flush=True)
    if "qat_floor" in args.groups:
        for which, iters in (("cifar10_vit", 60), ("deit_small_patch16_224", 10)):
            if which in r.setdefault("qat_floor", {}):
                continue  # the run resumes per model, as the blocks group does
            r["qat_floor"][which] = measure_qat_floor(which, iters)
            save()
            print(which, r["qat_floor"][which], flush=True)
    if "snapshot_floor" in args.groups:
        for which in ("cifar10_vit", "deit_small_patch16_224"):
            if which in r.setdefault("snapshot_floor", {}):
                continue
            r["snapshot_floor"][which] = measure_snapshot_floor(which)
            save()
            print(which, r["snapshot_floor"][which], flush=True)
    if "estimate_block" in args.groups:
        if "estimate_block" not in r:
            r["estimate_block"] = measure_estimate_block()
            save()
            print(r["estimate_block"], flush=True)
    if "estimate" in args.groups:  # the cost model again for the measured runs (after a change to it)
        for label, cell in r.get("e2e", {}).items():
            if label != "reference" and "predicted_iteration_ratio" not in cell:
                if "predicted_reconstruction_s" in cell:  # the constant-ratio model's, kept for the record
                    cell["predicted_reconstruction_s_constant_ratio"] = cell.pop("predicted_reconstruction_s")
                with kernel_path(label):
                    cell.update(predict(*e2e_setup(label)))
                save()
    if "agreement" in args.groups:
        r["agreement"] = measure_agreement()
        save()
        print(r["agreement"], flush=True)
    if "e2e" in args.groups:
        for label in args.paths:
            if label not in r.setdefault("e2e", {}):
                r["e2e"][label] = measure_e2e(label)
                save()
                print(label, r["e2e"][label], flush=True)
    save()


if __name__ == "__main__":
    main()
