"""Is the default `mse` calibration robust to its calibration subset? Its spread measured on 3x the images,
with the evaluation noise taken out (issue 11).

``benchmarks/calibration.md`` measures `mse` on 5 calibration subsets of 128 training images (seeds
0..4) and finds a max - min of 0.54 (W4A4) and 0.59 (W3A3) points on the 10,000 test images, above
the issue's 0.3 goal; ``calib_agreement.md`` shows that two such models disagree on ~11% of the
images, which alone puts an expected 0.48 into a 5-model range on 10,000 images. This benchmark
separates the two: the same 5 models per bit width are scored on the test images *and* on 30,000
training images outside all 5 subsets (40,000 in all), and the spread of their *expected* top-1 is
estimated without the evaluation noise. For models i, j with top-1s a_i, a_j (fractions) on N images,
of which a share o_ij is right for exactly one of them, E[(a_i - a_j)^2] = (mu_i - mu_j)^2 + o_ij / N
when the images are a random sample, so

    s_true^2 = 1 / (n (n - 1)) * sum over pairs i < j of [(a_i - a_j)^2 - o_ij / N]

is an unbiased estimate of the sample variance of the models' expected top-1s mu_i, and 2.326 s_true
the expected max - min of 5 such models on an infinite evaluation set.

Reproduce (the two processes split the cells; each model's predictions are cached in --work, so a
stopped run resumes; the summary is written from whatever is cached):

    python benchmarks/calib_heldout.py --cells 3:0 3:1 3:2 3:3 3:4 4:3 4:4 &
    python benchmarks/calib_heldout.py --cells 4:0 4:1 4:2 ; wait
    python benchmarks/calib_heldout.py --summarise
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitq  # noqa: E402
from vitq.data import (ArrayImageDataset, atomic_write_bytes, build_dataset, fixed_subset, load_cifar10,  # noqa: E402
                       make_loader, resolve_data)
from vitq.models import eval_transform  # noqa: E402
from vitq.report import machine, versions  # noqa: E402
from calib_agreement import predict  # noqa: E402  (benchmarks/, the script's own folder)

HERE = Path(__file__).resolve().parent
SEEDS = range(5)
CALIB = 128       # calibration.md's subset size, drawn by vitq.calibration_images with the seed
HELDOUT = 30_000  # training images outside every seed's subset, a fixed random draw
RANGE_OF_5 = 2.326  # expected max - min of 5 standard normal draws
EVAL_BATCH = 200


def heldout_indices(n_train: int) -> np.ndarray:
    used = set()
    for s in SEEDS:
        used.update(fixed_subset(n_train, CALIB, s).tolist())
    free = np.array(sorted(set(range(n_train)) - used))
    return np.sort(np.random.default_rng(2026).permutation(free)[:HELDOUT])


def loaders(fp: torch.nn.Module) -> dict:
    tf = eval_transform(fp)
    images, labels = load_cifar10("train")
    idx = heldout_indices(len(images))
    return {"test": make_loader(build_dataset(resolve_data("cifar10"), "eval", tf), EVAL_BATCH),
            "heldout": make_loader(ArrayImageDataset(images[idx], labels[idx], tf), EVAL_BATCH)}


def run_cell(fp: torch.nn.Module, loads: dict, bits: int, seed: int, work: Path) -> None:
    """Calibrate `mse` at W{bits}A{bits} on seed's subset (as calibration.py does) and cache the predictions."""
    path = work / f"mse-w{bits}-s{seed}.pt"
    if path.is_file():
        return
    calib = vitq.calibration_images(fp, "cifar10", CALIB, seed=seed)
    model = copy.deepcopy(fp)
    t0 = time.perf_counter()
    vitq.quantize(model, calib, "mse", w_bits=bits, a_bits=bits, seed=seed, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    for split, loader in loads.items():
        out[split] = predict(model, loader)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda fh: torch.save(out, fh))
    print(f"W{bits}A{bits} seed {seed}: test {100 * (out['test'][0] == out['test'][1]).float().mean():.2f} "
          f"({seconds:.0f} s calibration)", flush=True)


def spread_stats(preds: list[torch.Tensor], labels: torch.Tensor) -> dict:
    """Observed top-1s and spread, and the evaluation-noise-free estimates (module docstring)."""
    n = len(labels)
    right = [(p == labels).double() for p in preds]
    acc = [r.mean().item() for r in right]
    pair_terms, noise = [], []
    for i, j in itertools.combinations(range(len(preds)), 2):
        one_right = (right[i] != right[j]).double().mean().item()
        pair_terms.append((acc[i] - acc[j]) ** 2 - one_right / n)
        noise.append(one_right / n)
    k = len(preds)
    var_true = sum(pair_terms) / (k * (k - 1))
    noise_sd_single = math.sqrt(statistics.mean(noise) / 2)  # one model's evaluation noise, about
    # how often evaluation noise alone (k equally good models) gives a max - min this large
    draws = np.random.default_rng(0).normal(0.0, noise_sd_single, size=(200_000, k))
    p_noise = float(((draws.max(1) - draws.min(1)) >= max(acc) - min(acc)).mean())
    return {"images": n, "top1": [100 * a for a in acc], "mean": 100 * statistics.mean(acc),
            "sd": 100 * statistics.stdev(acc), "spread": 100 * (max(acc) - min(acc)),
            "noise_sd": 100 * noise_sd_single, "expected_noise_spread_of_5": 100 * RANGE_OF_5 * noise_sd_single,
            "true_var": 1e4 * var_true, "true_sd": 100 * math.sqrt(max(var_true, 0.0)),
            "expected_true_spread_of_5": 100 * RANGE_OF_5 * math.sqrt(max(var_true, 0.0)),
            "p_noise_alone": p_noise}


def summarise(work: Path, out: Path) -> None:
    results: dict = {"command": "python benchmarks/calib_heldout.py (see its docstring: two processes, then "
                                "--summarise)", "versions": versions(), "machine": machine(), "bits": {}}
    for bits in (4, 3):
        cells = [torch.load(work / f"mse-w{bits}-s{s}.pt") for s in SEEDS if (work / f"mse-w{bits}-s{s}.pt").is_file()]
        if len(cells) < 2:
            continue
        labels = {split: cells[0][split][1] for split in ("test", "heldout")}
        both = torch.cat([labels["test"], labels["heldout"]])
        r = {"seeds": len(cells), "calib_seconds": statistics.mean(c["seconds"] for c in cells)}
        for split in ("test", "heldout"):
            r[split] = spread_stats([c[split][0] for c in cells], labels[split])
        r["all"] = spread_stats([torch.cat([c["test"][0], c["heldout"][0]]) for c in cells], both)
        results["bits"][f"w{bits}a{bits}"] = r
    atomic_write_bytes(out / "calib_heldout.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    lines = ["# Calibration spread without the evaluation noise", "", f"Command: `{results['command']}`", "",
             "`cifar10_vit`, `mse` (today's default search) calibrated on the 5 subsets of 128 training images of "
             "benchmarks/calibration.md (seeds 0..4), each model scored on the 10,000 test images and on 30,000 "
             "training images outside every subset (*held-out*). *Observed spread*: max - min of the 5 top-1s. "
             "*Noise spread*: the max - min that evaluation noise alone gives 5 equally good models on these images "
             "(from how often two models are right on different images). *True sd / spread*: the spread of the "
             "models' expected top-1 with the evaluation noise subtracted (the estimator in the script's "
             "docstring); negative variance estimates mean no spread is detectable beyond the noise. One thread per "
             "process, two processes side by side with another benchmark on and off, so the seconds run high; the "
             "machine is in the JSON.", "",
             "*p(noise)*: how often noise alone gives 5 equally good models an observed spread this large "
             "(simulated).", "",
             "| bits | images | top-1 per seed | mean | observed spread | noise spread of 5 | p(noise) | true sd | "
             "expected true spread of 5 |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["bits"].items():
        for split, label in (("test", "test 10k"), ("heldout", "held-out 30k"), ("all", "both, 40k")):
            s = r[split]
            lines.append(f"| {key.upper()} | {label} | {' / '.join(f'{a:.2f}' for a in s['top1'])} | {s['mean']:.2f} | "
                         f"{s['spread']:.2f} | {s['expected_noise_spread_of_5']:.2f} | {s['p_noise_alone']:.3f} | "
                         f"{s['true_sd']:.2f} (var {s['true_var']:+.3f}) | {s['expected_true_spread_of_5']:.2f} |")
    lines += ["", "## Reading the numbers", ""]
    for key, r in results["bits"].items():
        a, t = r["all"], r["test"]
        lines.append(f"- {key.upper()}: on all 40,000 images the 5 calibrations span {a['spread']:.2f} points where "
                     f"evaluation noise alone gives {a['expected_noise_spread_of_5']:.2f} (and gives {a['spread']:.2f} or "
                     f"more in {100 * a['p_noise_alone']:.1f}% of draws); the estimated spread of their expected top-1 is "
                     f"{a['expected_true_spread_of_5']:.2f} (sd {a['true_sd']:.2f}, from 5 models: a rough figure). On the "
                     f"test images alone the same models span {t['spread']:.2f}, which noise alone would give in "
                     f"{100 * t['p_noise_alone']:.0f}% of draws: 10,000 images cannot tell this spread from noise.")
    lines += ["", f"Mean calibration seconds: " + ", ".join(f"{k.upper()} {r['calib_seconds']:.0f}"
                                                        for k, r in results["bits"].items()),
              "", f"Versions: {results['versions']}", ""]
    atomic_write_bytes(out / "calib_heldout.md", lambda fh: fh.write("\n".join(lines).encode()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="*", default=[f"{b}:{s}" for b in (3, 4) for s in SEEDS],
                    help="BITS:SEED cells this process runs")
    ap.add_argument("--summarise", action="store_true", help="only write the summary of the cached cells")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_calib_heldout"))
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.summarise:
        fp = vitq.load_model("cifar10_vit")
        loads = loaders(fp)
        for c in args.cells:
            bits, seed = map(int, c.split(":"))
            run_cell(fp, loads, bits, seed, args.work)
    summarise(args.work, args.out)


if __name__ == "__main__":
    main()
