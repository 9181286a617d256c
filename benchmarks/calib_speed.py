"""The `mse` calibration search with its elementwise kernels eager or through torch.compile.

`cifar10_vit`, the `mse` recipe on 512 calibration images of the training split (seed 0),
W3A3, one thread per process: the calibration seconds (compilation included) with
``compile_kernels`` off and on, and whether the two searches chose the same grids (every
quantizer parameter compared) and give the same top-1 on the 10,000 test images.

Reproduce (the two cells side by side, one per core, so both share the machine's load; each
cell's result is cached in --work, the summary is written from whatever is cached):

    python benchmarks/calib_speed.py --mode off &
    python benchmarks/calib_speed.py --mode on ; wait
    python benchmarks/calib_speed.py --summarise

Without an ``off`` cell the eager side is ``calib_heldout.py``'s W3A3 seed-0 cell at 512 images
(the same calibration, eager, one thread beside another benchmark process), compared by its
seconds and its test predictions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitq  # noqa: E402
from vitq.data import atomic_write_bytes, build_dataset, make_loader, resolve_data  # noqa: E402
from vitq.models import eval_transform  # noqa: E402
from vitq.report import machine, versions  # noqa: E402
from calib_agreement import predict  # noqa: E402  (benchmarks/, the script's own folder)

HERE = Path(__file__).resolve().parent
BITS = 3
COMMAND = ("python benchmarks/calib_speed.py --mode off & python benchmarks/calib_speed.py --mode on; wait; "
           "python benchmarks/calib_speed.py --summarise")


def run(mode: str, work: Path) -> None:
    path = work / f"calib-{mode}.pt"
    if path.is_file():
        return
    fp = vitq.load_model("cifar10_vit")
    recipe = vitq.get_recipe("mse", w_bits=BITS, a_bits=BITS, seed=0, calib_size=512,
                             calibration={"compile_kernels": mode, "bias_correction": False})  # as measured
    calib = vitq.calibration_images(fp, "cifar10", recipe.calib_size, seed=0)
    model = copy.deepcopy(fp)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = vitq.quantize_with_summary(model, calib, recipe, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    loader = make_loader(build_dataset(resolve_data("cifar10"), "eval", eval_transform(fp)), 200)
    pred, labels = predict(model, loader)
    top1 = 100 * (pred == labels).float().mean().item()
    out = {"mode": mode, "images": recipe.calib_size, "seconds": seconds, "load_at_start": load,
           "kernels": result.calibration["kernels"], "top1": top1, "test": (pred, labels),
           "state": {k: v.clone() for k, v in model.state_dict().items()}}
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda fh: torch.save(out, fh))
    print(f"{mode}: {seconds:.0f} s, {out['kernels']}, top-1 {top1:.2f}", flush=True)


def summarise(work: Path, out: Path, heldout: Path) -> None:
    cells = {m: torch.load(work / f"calib-{m}.pt") for m in ("off", "on") if (work / f"calib-{m}.pt").is_file()}
    borrowed = heldout / f"mse-w{BITS}-s0-c512.pt"
    if "off" not in cells and borrowed.is_file():
        h = torch.load(borrowed)
        pred, labels = h["test"]
        cells = {"off": {"mode": "off", "images": 512, "seconds": h["seconds"], "kernels": "eager (calib_heldout.py)",
                         "top1": 100 * (pred == labels).float().mean().item(), "test": h["test"]}, **cells}
    results = {"command": COMMAND, "versions": versions(), "machine": machine(),
               "cells": {m: {k: v for k, v in c.items() if k not in ("state", "test")} for m, c in cells.items()}}
    lines = ["# The mse search: eager or compiled kernels", "", f"Command: `{COMMAND}`", "",
             f"`cifar10_vit`, recipe `mse` on {next(iter(cells.values()))['images'] if cells else 512} "
             f"calibration images (seed 0), W{BITS}A{BITS}, one thread per process, the two processes side by side. "
             "Seconds include the compilation.", "",
             "| kernels | calibration s | top-1 |", "|---|---|---|"]
    for m, c in cells.items():
        lines.append(f"| {c['kernels']} | {c['seconds']:.0f} | {c['top1']:.2f} |")
    if len(cells) == 2:
        results["speedup"] = cells["off"]["seconds"] / cells["on"]["seconds"]
        differ = (cells["off"]["test"][0] != cells["on"]["test"][0]).float().mean().item()
        results["test_predictions_differ_pct"] = 100 * differ
        lines += ["", f"Compiled against eager: **{results['speedup']:.2f}x** faster; the two models' top-1 classes "
                  f"differ on {100 * differ:.2f}% of the test images."]
        if cells["off"]["kernels"].startswith("eager (calib_heldout"):
            lines[-1] += (" The eager cell is calib_heldout.py's (beside another of its calibrations), the compiled "
                          "one ran beside other one-thread jobs: the ratio carries that noise.")
        if "state" in cells["off"]:
            a, b = cells["off"]["state"], cells["on"]["state"]
            same = [k for k in a if torch.equal(a[k], b[k])]
            results["equal_tensors"], results["tensors"] = len(same), len(a)
            lines[-1] += (f" {len(same)} of {len(a)} tensors of the calibrated model are identical (weights, folded "
                          "LayerNorms and every quantizer parameter).")
    lines += ["", f"Machine: {results['machine']}", "", f"Versions: {results['versions']}", ""]
    atomic_write_bytes(out / "calib_speed.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    atomic_write_bytes(out / "calib_speed.md", lambda fh: fh.write("\n".join(lines).encode()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("off", "on"))
    ap.add_argument("--summarise", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_calib_speed"))
    ap.add_argument("--heldout-work", type=Path, default=Path("runs/bench_calib_heldout"),
                    help="calib_heldout.py's cache: its eager W3A3 seed-0 cell stands in for a missing off cell")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mode:
        run(args.mode, args.work)
    summarise(args.work, args.out, args.heldout_work)


if __name__ == "__main__":
    main()
