"""Data parallelism on one machine: the same fimaq run as 1 process x 1 thread, 1 x 2 threads, 2 x 1.

    python benchmarks/distributed.py                   # all three layouts (about 45 min on 2 cores)
    python benchmarks/distributed.py --layouts 2x1     # one of them
    python benchmarks/distributed.py --layouts --memory  # the memory formula only (minutes)
    python benchmarks/distributed.py --layouts --iteration  # one block's iteration per layout, profiled
    python benchmarks/distributed.py --layouts --phases     # the reconstruction stage by phase per layout

Each layout runs the CLI exactly as a user would, ``cifar10_vit`` W3A3 ``fimaq`` at 500 iterations
per block, seed 0, evaluated on the 10,000 CIFAR-10 test images:

* ``1x1``: ``OMP_NUM_THREADS=1 python -m vitq quantize ...``
* ``1x2``: ``OMP_NUM_THREADS=2 python -m vitq quantize ...``
* ``2x1``: ``OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m vitq quantize ...``

and records the wall time of each stage (rank 0's report), each rank's peak memory and top-1.
Nothing else may run on the machine meanwhile: the layouts are compared by wall time.

``--memory``: the per-rank memory formula (``vitq.reconstruction.memory``) against the peak
resident memory measured in a fresh process reconstructing ``cifar10_vit`` (512 images, 20
iterations per block, fimaq), and its value for DeiT-B and Swin-B at 224 px with 1024 images.
Writes ``distributed.json`` and ``distributed.md`` next to this script after every layout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUANTIZE = ["quantize", "--model", "cifar10_vit", "--data", "cifar10", "--recipe", "fimaq", "--w-bits", "3",
            "--a-bits", "3", "--iters", "500", "--seed", "0", "--skip-fp-eval", "--quiet"]
LAYOUTS = {
    "1x1": (1, 1),
    "1x2": (1, 2),
    "2x1": (2, 1),
}


def command(layout: str, out: Path) -> tuple[list[str], dict[str, str]]:
    procs, threads = LAYOUTS[layout]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    argv = [*QUANTIZE, "--out", str(out)]
    if procs == 1:
        return [sys.executable, "-m", "vitq", *argv], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "-m", "vitq", *argv], env


def run_layout(layout: str, work: Path) -> dict:
    out = work / f"dist-{layout}"
    shutil.rmtree(out, ignore_errors=True)
    argv, env = command(layout, out)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{layout} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    return {
        "command": " ".join(f"{k}={env[k]}" for k in ("OMP_NUM_THREADS",)) + " " + " ".join(
            a if not a.startswith("/") else Path(a).name for a in argv),
        "wall_s": round(wall, 1),
        "stage_s": {k: stages[k]["seconds"] for k in ("load", "calibration_data", "quantize.calibration",
                                                      "quantize.reconstruction", "eval_quant", "save") if k in stages},
        "peak_mem_mb_per_rank": [max(s.get("peak_mem_mb", 0.0) for s in r["stages"].values()) for r in report["ranks"]],
        "top1": report["quant_top1"],
        "world_size": report.get("world_size", 1),
    }


MEASURE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import vitq
from vitq.adapters import prepare
from vitq.calibration import CalibConfig, calibrate
from vitq.reconstruction import ReconConfig, reconstruct
from vitq.report import _peak_rss_mb, _reset_peak_rss
torch.set_num_threads(1)
model = vitq.load_model("cifar10_vit")
images = vitq.calibration_images(model, "cifar10", 512, seed=0)
cfg = ReconConfig(optim_size=512, iters=20, rank=5)
prepare(model, vitq.get_recipe("fimaq", w_bits=3, a_bits=3).quant_spec())
calibrate(model, images[:32], CalibConfig(method="minmax"), "cpu", progress=False)
with open("/proc/self/status") as fh:
    rss = next(int(l.split()[1]) / 1024 for l in fh if l.startswith("VmRSS:"))
_reset_peak_rss()
reconstruct(model, images, cfg, "cpu", progress=False)
print(json.dumps({"rss_before_mb": rss, "peak_mb": _peak_rss_mb()}))
"""


ITERATION = """
import copy, json, os, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
import speed  # benchmarks/speed.py: the minmax-calibrated cifar10_vit block it times
from dataclasses import replace
from torch.profiler import ProfilerActivity, profile
import vitq
from vitq import distributed
from vitq.quantizers.kernels import compiled_kernels
from vitq.reconstruction import reconstruct_block
iters = int(sys.argv[2])
summing = []  # seconds inside each gradient all-reduce, waiting for the other rank included
plain_sum = distributed.sum_grads_
def timed_sum(params, what="a sum"):
    t0 = time.perf_counter()
    if not os.environ.get("SKIP_GRAD_SUM"):  # the bound: what a step costs with a free all-reduce
        plain_sum(params, what)
    summing.append(time.perf_counter() - t0)
distributed.sum_grads_ = timed_sum
device = distributed.init_from_env(torch.device("cpu"))
# the fimaq recipe's block loss (DPLR Fisher); its snapshots over 32 images, so the profiled
# steps are the iteration itself (the median step leaves the snapshot steps out anyway)
cfg = replace(vitq.get_recipe("fimaq", w_bits=3, a_bits=3).reconstruction, snapshot_images=32)
with distributed.active(), compiled_kernels():
    model, name, x, targets = speed.block_setup("cifar10_vit")
    def run(n, on_step=None):
        m = copy.deepcopy(model)
        reconstruct_block(m, name, m.get_submodule(name), x, x, targets, replace(cfg, iters=n),
                          device, torch.Generator().manual_seed(0), progress=False, on_step=on_step)
    run(3)  # compiles
    stamps = []
    summing.clear()
    # recorded from the second step on: the block's setup (float targets) and first step are left out
    with profile(activities=[ProfilerActivity.CPU], acc_events=True,
                 schedule=torch.profiler.schedule(wait=0, warmup=1, active=iters - 3, repeat=1)) as prof:
        run(iters, lambda it: (stamps.append(time.perf_counter()), prof.step()))
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    ops = {}
    for e in prof.key_averages():
        ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    total = sum(ops.values())
    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "qdrop draws": ("aten::uniform_", "aten::random_")}
    shares = {g: sum(v for k, v in ops.items() if k in keys) / total for g, keys in groups.items()}
    shares["fused fake-quant kernels"] = sum(v for k, v in ops.items() if "CompiledFxGraph" in k) / total
    out = distributed.gather_objects({"step_s": step, "shares": shares,
                                      "grad_sum_s": statistics.median(summing) if summing else 0.0})
    if distributed.is_main():
        print("RESULT " + json.dumps(out))
distributed.shutdown()
"""

# the iteration's layouts: the three of the table and a bound that is not a valid run (two ranks
# whose gradients are not summed: what a step would cost if the all-reduce were free)
ITERATION_LAYOUTS = {**{k: (v, {}) for k, v in LAYOUTS.items()}, "2x1 no all-reduce": ((2, 1), {"SKIP_GRAD_SUM": "1"})}


def run_probe(what: str, layout: str, script: str, procs: int, threads: int, args: list[str],
              extra_env: dict | None = None) -> list:
    """Run ``script`` (a module's text) as ``procs`` processes of ``threads`` threads each (torchrun for
    several) and return what rank 0 printed after ``RESULT `` (one entry per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src"), **(extra_env or {})}
    if procs == 1:
        argv = [sys.executable, "-c", script, *args]
    else:  # torchrun runs a script file, not -c
        worker = ROOT / "runs" / f"{what}_worker.py"
        worker.parent.mkdir(parents=True, exist_ok=True)
        worker.write_text(script)
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                str(worker), *args]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{layout} {what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def measure_iteration(layout: str, iters: int = 60) -> dict:
    """One reconstruction iteration of cifar10_vit blocks.1 (batch 32, compiled kernels, the fimaq
    loss) in ``layout``: the median step time of each rank, the median time inside the gradient
    all-reduce and where the profiled time goes."""
    (procs, threads), extra = ITERATION_LAYOUTS[layout]
    ranks = run_probe("iteration", layout, ITERATION, procs, threads, [str(HERE), str(iters)], extra)
    return {"ranks": ranks, "iters": iters}


PHASES = """
import collections, json, sys, time, torch
from dataclasses import replace
import vitq
from vitq import distributed
from vitq.adapters import prepare
from vitq.calibration import CalibConfig, calibrate
from vitq.reconstruction import reconstruct
import vitq.reconstruction.block as block_module
import vitq.reconstruction.engine as engine_module
seconds = collections.defaultdict(float)
def timed(module, name, key):
    fn = getattr(module, name)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            seconds[key] += time.perf_counter() - t0
    setattr(module, name, wrapper)
timed(engine_module, "_block_inputs", "block inputs")
timed(engine_module, "float_block_outputs", "float outputs")
timed(engine_module, "reconstruct_block", "blocks")
timed(block_module, "refresh_snapshots", "Fisher snapshots")
device = distributed.init_from_env(torch.device("cpu"))
with distributed.active():
    model = vitq.load_model("cifar10_vit")
    recipe = vitq.get_recipe("fimaq", w_bits=3, a_bits=3)
    images = vitq.calibration_images(model, "cifar10", recipe.reconstruction.optim_size, seed=0)
    prepare(model, recipe.quant_spec())
    calibrate(model, images[:128], CalibConfig(method="minmax"), "cpu", progress=False)  # fast: not timed
    t0 = time.perf_counter()
    reconstruct(model, images, replace(recipe.reconstruction, iters=int(sys.argv[1])), device, progress=False)
    seconds["reconstruction"] = time.perf_counter() - t0
    seconds["iterations and checks"] = seconds["blocks"] - seconds["Fisher snapshots"]
    out = distributed.gather_objects(dict(seconds))
    if distributed.is_main():
        print("RESULT " + json.dumps(out))
distributed.shutdown()
"""


def measure_phases(layout: str, iters: int = 100) -> dict:
    """The fimaq reconstruction of cifar10_vit (1024 images, ``iters`` per block, minmax
    calibration) in ``layout``, its seconds split by phase: Fisher snapshots (5 per block), block
    inputs, float outputs, the iterations with the before/after checks."""
    procs, threads = LAYOUTS[layout]
    return {"ranks": run_probe("phases", layout, PHASES, procs, threads, [str(iters)]), "iters": iters}


def measure_memory() -> dict:
    import timm
    import torch

    import vitq
    from vitq.reconstruction import ReconConfig
    from vitq.reconstruction.memory import measure_footprint, reconstruction_memory, summary

    proc = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT / "src")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = ReconConfig(optim_size=512, iters=20, rank=5)
    est = reconstruction_memory(vitq.load_model("cifar10_vit"), cfg, image_shape=(3, 32, 32))
    out = {"check": {"model": "cifar10_vit", "optim_size": 512, "measured_increase_mb": round(
        measured["peak_mb"] - measured["rss_before_mb"], 1), **measured,
        "predicted_increase_mb": round((est.total_bytes - est.parts["model"]) / 2**20, 1), "formula": summary(est)}}
    torch.set_num_threads(1)
    for name in ("deit_base_patch16_224", "swin_base_patch4_window7_224"):
        model = timm.create_model(name, pretrained=False).eval()
        cfg = ReconConfig(optim_size=1024)
        footprint = measure_footprint(model, (3, 224, 224), cfg.adaround, cfg.drop_prob)  # once per model
        row = {}
        for world in (1, 2, 8):
            for cache in ("memory", "disk"):
                e = reconstruction_memory(None, cfg, (3, 224, 224), world_size=world, cache=cache,
                                          footprint=footprint)
                row[f"{world}x_{cache}"] = summary(e)
        out[name] = row
    return out


def summarise(r: dict) -> str:
    rows = r.get("layouts", {})
    base, two_threads = rows.get("1x1"), rows.get("1x2")
    lines = ["# Data parallelism on one machine (torch.distributed, gloo)", "",
             f"`cifar10_vit` W3A3 `fimaq`, 500 iterations per block, seed 0, top-1 on the 10,000 CIFAR-10 test "
             f"images, on this {os.cpu_count()}-core CPU. Reproduce: `{r['command']}`. Each layout is the CLI "
             "as a user runs it (commands below); wall time is the whole command, stage times are rank 0's.", "",
             "| layout | wall s | calibration s | reconstruction s | eval s | speed-up vs 1x1 | vs 1x2 | "
             "peak MB per rank | top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        st = row["stage_s"]
        up = f"{base['wall_s'] / row['wall_s']:.2f}x" if base else "-"
        up2 = f"{two_threads['wall_s'] / row['wall_s']:.2f}x" if two_threads else "-"
        mem = " / ".join(f"{m:.0f}" for m in row["peak_mem_mb_per_rank"])
        lines.append(f"| {name} | {row['wall_s']:.0f} | {st.get('quantize.calibration', 0):.0f} | "
                     f"{st.get('quantize.reconstruction', 0):.0f} | {st.get('eval_quant', 0):.0f} | {up} | {up2} | "
                     f"{mem} | {row['top1']:.2f} |")
    if r.get("layouts_machine"):
        lines += ["", f"Machine of the layout rows: {r['layouts_machine']}"]
    lines += ["", "Commands:", ""] + [f"    {row['command']}" for row in rows.values()]
    mem = r.get("memory")
    if mem:
        c = mem["check"]
        lines += ["", "## Memory per rank", "",
                  "Every rank holds the full caches (any rank may draw any sample of the global batch), so the "
                  "per-rank memory does not shrink with the ranks; `--cache-on-disk` moves the caches to "
                  "memory-mapped files. Formula: `vitq.reconstruction.memory.reconstruction_memory` (its docstring "
                  "lists the parts).", "",
                  f"Check: `{c['model']}`, {c['optim_size']} images, fimaq, in a fresh process: peak resident memory "
                  f"rose by **{c['measured_increase_mb']:.0f} MB** during reconstruction; the formula predicts "
                  f"**{c['predicted_increase_mb']:.0f} MB** (without the model, already resident).", "",
                  "| model (224 px, 1024 images, batch 32, k = 5) | ranks | caches in memory | caches on disk | "
                  "largest block |", "|---|---|---|---|---|"]
        for name in ("deit_base_patch16_224", "swin_base_patch4_window7_224"):
            for world in (1, 2, 8):
                a, b = mem[name][f"{world}x_memory"], mem[name][f"{world}x_disk"]
                lines.append(f"| {name} | {world} | {a['total_mib'] / 1024:.2f} GiB | {b['total_mib'] / 1024:.2f} GiB "
                             f"| {a['largest_block']} |")
    its = r.get("iteration")
    if its:
        def step_ms(row: dict) -> float:  # the median over the runs of the slowest rank's median step
            return 1e3 * statistics.median(max(rk["step_s"] for rk in run["ranks"]) for run in row["runs"])
        one, two = (step_ms(its[k]) if k in its else None for k in ("1x1", "1x2"))
        lines += ["", "## One reconstruction iteration", "",
                  "`cifar10_vit` blocks.1, global batch 32, the fimaq loss, compiled kernels, QDrop on "
                  f"(`python benchmarks/distributed.py --layouts --iteration`; machine: {r.get('iteration_machine')}): "
                  "each layout run "
                  f"{len(next(iter(its.values()))['runs'])} times, alternating; the median over the runs of the slowest "
                  "rank's median step, the median time a step spends in the gradient all-reduce (waiting for the "
                  "other rank included), and rank 0's profiled time by kind (self CPU time, the first run). "
                  "`2x1 no all-reduce` is not a valid run: two ranks that skip the gradient sum, the step's cost "
                  "if the all-reduce were free.", "",
                  "| layout | step ms | vs 1x1 | vs 1x2 | in the all-reduce ms | matmul | QDrop draws | "
                  "fused fake-quant |", "|---|---|---|---|---|---|---|---|"]
        for name, row in its.items():
            ms = step_ms(row)
            first = row["runs"][0]["ranks"][0]
            sh = first["shares"]
            grad = statistics.median(rk["grad_sum_s"] for run in row["runs"] for rk in run["ranks"])
            lines.append(f"| {name} | {ms:.1f} | {one / ms:.2f}x | {two / ms:.2f}x | {1e3 * grad:.1f} | "
                         f"{100 * sh['matmul']:.0f}% | {100 * sh['qdrop draws']:.0f}% | "
                         f"{100 * sh['fused fake-quant kernels']:.0f}% |" if one and two else f"| {name} | {ms:.1f} |")
    phases = r.get("phases")
    if phases:
        keys = ("Fisher snapshots", "block inputs", "float outputs", "iterations and checks")
        base = phases.get("1x2", {}).get("ranks", [{}])[0].get("reconstruction")
        lines += ["", "## The reconstruction stage by phase", "",
                  f"fimaq on `cifar10_vit`, 1024 images, {next(iter(phases.values()))['iters']} iterations per block, "
                  "minmax calibration (`python benchmarks/distributed.py --layouts --phases`): rank 0's seconds.", "",
                  "| layout | reconstruction s | vs 1x2 | " + " | ".join(keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for name, row in phases.items():
            p0 = row["ranks"][0]
            up = f"{base / p0['reconstruction']:.2f}x" if base else "-"
            lines.append(f"| {name} | {p0['reconstruction']:.1f} | {up} | "
                         + " | ".join(f"{p0.get(k, 0.0):.1f}" for k in keys) + " |")
    if r.get("notes"):
        lines += ["", "## Reading the numbers", "", r["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--work", type=Path, default=ROOT / "runs")
    ap.add_argument("--memory", action="store_true", help="also the memory formula check and table")
    ap.add_argument("--iteration", action="store_true",
                    help="also one block's reconstruction iteration in each layout, profiled (about 10 minutes)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each iteration layout, alternating")
    ap.add_argument("--phases", action="store_true",
                    help="also the reconstruction stage split by phase in each layout (about 10 minutes)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from vitq.data import atomic_write_bytes
    from vitq.report import machine, versions

    path = HERE / "distributed.json"
    r = json.loads(path.read_text()) if path.is_file() else {}
    r.update(command="python benchmarks/distributed.py", versions=versions())

    def cpu() -> dict:  # each layout sets its own threads: the benchmark process's count means nothing
        return {**machine(), "torch_threads": "per layout (OMP_NUM_THREADS)"}

    def save() -> None:
        atomic_write_bytes(path, lambda fh: fh.write(json.dumps(r, indent=2).encode()))
        atomic_write_bytes(HERE / "distributed.md", lambda fh: fh.write(summarise(r).encode()))

    for layout in args.layouts:
        r.setdefault("layouts", {})[layout] = run_layout(layout, args.work)
        r["layouts_machine"] = cpu()  # the CPU the layout rows ran on (the speed-ups depend on it)
        r["layouts"] = {k: r["layouts"][k] for k in LAYOUTS if k in r["layouts"]}
        save()
        print(layout, r["layouts"][layout], flush=True)
    if args.iteration:
        r["iteration"] = {}
        r["iteration_machine"] = cpu()
        for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits every layout
            for layout in ITERATION_LAYOUTS:
                r["iteration"].setdefault(layout, {"runs": []})["runs"].append(measure_iteration(layout))
                save()
                print(layout, r["iteration"][layout]["runs"][-1], flush=True)
    if args.phases:
        r["phases"] = {}
        for layout in LAYOUTS:
            r["phases"][layout] = measure_phases(layout)
            r["phases_machine"] = cpu()
            save()
            print(layout, r["phases"][layout], flush=True)
    if args.memory:
        r["memory"] = measure_memory()
        save()


if __name__ == "__main__":
    main()
