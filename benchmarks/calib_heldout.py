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

The same with ``--calib-size 512`` (512 images per subset), ``--rotation hadamard`` (the mse recipe
with rotated linear inputs), ``--refine r32s2`` (the search's finer second grid, see calib_grid.py) or
``--refine bc`` (bias correction, the `mse` recipe's default since it was measured here) measures those
settings on the same held-out images; every ``--refine`` setting names ``bias_correction`` (``--refine``
is a historical name: it selects CalibConfig overrides, not only finer grids). A setting summarised
earlier whose cells are not cached in --work keeps its rows from the earlier calib_heldout.json.
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
SIZES = (128, 512)  # subset sizes compared (512: tried as the mse recipe's default, not taken)
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


ROTATIONS = ("none", "hadamard")  # the mse recipe as it is, and with rotated linear inputs (vitq.rotation)
# CalibConfig overrides by name: the mse search's finer second grid around each winner (fine_grid /
# fine_grid_span) and bias correction; every setting names bias_correction, since the mse recipe's
# default changed from off to on after "off", "r16" and "r32s2" ran
REFINES = {"off": {"fine_grid": 0, "bias_correction": False},
           "r16": {"fine_grid": 16, "fine_grid_span": 1, "bias_correction": False},
           "r32s2": {"fine_grid": 32, "fine_grid_span": 2, "bias_correction": False},
           "bc": {"fine_grid": 0, "bias_correction": True}}


def cell_path(work: Path, bits: int, seed: int, size: int, rotation: str = "none", refine: str = "off") -> Path:
    """The cached predictions of one cell (the first measurement, 128 images, keeps its names)."""
    name = f"mse-w{bits}-s{seed}" + ("" if size == CALIB else f"-c{size}")
    return work / (name + ("" if rotation == "none" else f"-rot{rotation}") + ("" if refine == "off" else f"-{refine}")
                   + ".pt")


def setting_key(size: int, rotation: str, refine: str = "off") -> str:
    return str(size) + ("" if rotation == "none" else f"+{rotation}") + ("" if refine == "off" else f"+refine-{refine}")


def overrides_label(name: str) -> str:
    """A REFINES entry in words: 'r32s2' -> 'fine_grid=32, fine_grid_span=2'."""
    return ", ".join(f"{k}={v}" for k, v in REFINES[name].items())


def setting_label(key: str) -> str:
    """'512' -> '512 images'; '128+hadamard' -> '128 images, rotated (hadamard)'; '+refine-r16': calibration overrides."""
    size, *extras = key.split("+")
    return f"{size} images" + "".join(f", {overrides_label(e[7:])}" if e.startswith("refine-")
                                      else f", rotated ({e})" for e in extras)


def run_cell(fp: torch.nn.Module, loads: dict, bits: int, seed: int, work: Path, size: int = CALIB,
             rotation: str = "none", calibration: dict | None = None, path: Path | None = None) -> None:
    """Calibrate `mse` at W{bits}A{bits} on seed's subset of ``size`` images and cache the predictions
    (in ``path``, by default this benchmark's cell file; ``calibration``: CalibConfig overrides).

    ``vitq.calibration_images`` draws the first ``size`` of one seeded permutation, so seed s's
    128 images lie inside its 512.
    """
    path = path or cell_path(work, bits, seed, size, rotation)
    if path.is_file():
        return
    calib = vitq.calibration_images(fp, "cifar10", size, seed=seed)
    model = copy.deepcopy(fp)
    t0 = time.perf_counter()
    vitq.quantize(model, calib, "mse", w_bits=bits, a_bits=bits, seed=seed, calib_size=size, device="cpu",
                  progress=False, rotation=rotation, calibration=calibration)  # None: the recipe's own
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    for split, loader in loads.items():
        out[split] = predict(model, loader)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda fh: torch.save(out, fh))
    print(f"W{bits}A{bits} seed {seed} ({size} images, rotation {rotation}, {calibration or 'default'}): test "
          f"{100 * (out['test'][0] == out['test'][1]).float().mean():.2f} ({seconds:.0f} s calibration)", flush=True)


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


def heldout_mask(sizes: list[int]) -> torch.Tensor:
    """Which of the held-out images lie outside every seed's subset of every size in ``sizes``."""
    n_train = len(load_cifar10("train")[1])
    idx = heldout_indices(n_train)
    used = set()
    for size in sizes:
        for s in SEEDS:
            used.update(fixed_subset(n_train, size, s).tolist())
    return torch.from_numpy(~np.isin(idx, np.array(sorted(used))))


def same_seeds_mean(plain: dict, other: dict) -> float:
    """The mean top-1 (all images) of ``plain``'s models on the seeds ``other`` has."""
    ids = plain.get("seed_ids", list(SEEDS))
    return statistics.mean(plain["all"]["top1"][ids.index(i)] for i in other.get("seed_ids", ids))


def summarise(work: Path, out: Path) -> None:
    results: dict = {"command": "python benchmarks/calib_heldout.py (see its docstring: two processes per size, "
                                "then --summarise)", "versions": versions(), "machine": machine(), "sizes": {}}
    found = {(size, rot, ref): {bits: [torch.load(cell_path(work, bits, s, size, rot, ref)) for s in SEEDS
                                       if cell_path(work, bits, s, size, rot, ref).is_file()] for bits in (4, 3)}
             for size in SIZES for rot in ROTATIONS for ref in REFINES}
    settings = [k for k in found if any(len(c) >= 2 for c in found[k].values())]
    # every setting is scored on the same images: outside all subsets of every size
    keep = heldout_mask(list(SIZES))
    results["heldout_images"] = int(keep.sum())
    # settings summarised earlier whose cells are no longer cached here keep their rows (same images)
    earlier = out / "calib_heldout.json"
    if earlier.is_file():
        old = json.loads(earlier.read_text())
        if old.get("heldout_images") == results["heldout_images"]:
            recomputed = {setting_key(*k) for k in settings}
            results["sizes"] = {k: v for k, v in old["sizes"].items() if k not in recomputed}
            results["carried_from_earlier_summary"] = list(results["sizes"])
            results["earlier_versions"] = old.get("earlier_versions", old.get("versions"))
    for size, rot, ref in settings:
        per_bits = {}
        for bits in (4, 3):
            cells = found[size, rot, ref][bits]
            if len(cells) < 2:
                continue
            labels = {"test": cells[0]["test"][1], "heldout": cells[0]["heldout"][1][keep]}
            preds = {"test": [c["test"][0] for c in cells], "heldout": [c["heldout"][0][keep] for c in cells]}
            r = {"seeds": len(cells), "calib_seconds": statistics.mean(c["seconds"] for c in cells),
                 "seed_ids": [s for s in SEEDS if cell_path(work, bits, s, size, rot, ref).is_file()]}
            for split in ("test", "heldout"):
                r[split] = spread_stats(preds[split], labels[split])
            r["all"] = spread_stats([torch.cat([a, b]) for a, b in zip(preds["test"], preds["heldout"])],
                                    torch.cat([labels["test"], labels["heldout"]]))
            per_bits[f"w{bits}a{bits}"] = r
        results["sizes"][setting_key(size, rot, ref)] = per_bits
    atomic_write_bytes(out / "calib_heldout.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    n_all = 10_000 + results["heldout_images"]
    lines = ["# Calibration spread without the evaluation noise", "", f"Command: `{results['command']}`", "",
             "`cifar10_vit`, `mse` calibrated on 5 subsets of the training split (seeds 0..4; 128 images, as in "
             "benchmarks/calibration.md, and 512, tried as a default; seed s's 128 "
             "lie inside its 512); rows without `+bc` ran without bias correction, the `mse` recipe's default "
             "then (`+bc`: with it, its default now). Each model scored on the 10,000 test images and on "
             f"{results['heldout_images']:,} training images outside every subset of every size (*held-out*). "
             "*Observed spread*: max - min of the 5 top-1s. "
             "*Noise spread*: the max - min that evaluation noise alone gives 5 equally good models on these images "
             "(from how often two models are right on different images). *True sd / spread*: the spread of the "
             "models' expected top-1 with the evaluation noise subtracted (the estimator in the script's "
             "docstring); negative variance estimates mean no spread is detectable beyond the noise. One thread per "
             "process, two processes side by side, so the seconds run high; the machine is in the JSON.", "",
             "*p(noise)*: how often noise alone gives 5 equally good models an observed spread this large "
             "(simulated).", "",
             "Settings: images per subset, + rotation, + calibration overrides by name (`--refine`: r32s2 = "
             f"{overrides_label('r32s2')}; bc = {overrides_label('bc')}).", "",
             "| images (+ setting) | bits | scored on | top-1 per seed | mean | observed spread | noise spread of 5 | p(noise) | "
             "true sd | expected true spread of 5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size, per_bits in results["sizes"].items():
        for key, r in per_bits.items():
            for split, label in (("test", "test 10k"), ("heldout", "held-out"), ("all", f"both, {n_all:,}")):
                s = r[split]
                ids = r.get("seed_ids", list(SEEDS))
                tops = " / ".join(f"{a:.2f}" for a in s["top1"]) if len(ids) == len(SEEDS) else \
                    " / ".join(f"s{i} {a:.2f}" for i, a in zip(ids, s["top1"]))
                lines.append(f"| {size.replace('+refine-', '+')} | {key.upper()} | {label} | {tops} | "
                             f"{s['mean']:.2f} | {s['spread']:.2f} | {s['expected_noise_spread_of_5']:.2f} | "
                             f"{s['p_noise_alone']:.3f} | {s['true_sd']:.2f} (var {s['true_var']:+.3f}) | "
                             f"{s['expected_true_spread_of_5']:.2f} |")
    lines += ["", "## Reading the numbers", ""]
    for size, per_bits in results["sizes"].items():
        for key, r in per_bits.items():
            a, t = r["all"], r["test"]
            lines.append(f"- {setting_label(size)}, {key.upper()}: on all {n_all:,} images the {r['seeds']} calibrations span "
                         f"{a['spread']:.2f} points where evaluation noise alone gives "
                         f"{a['expected_noise_spread_of_5']:.2f} (and gives {a['spread']:.2f} or more in "
                         f"{100 * a['p_noise_alone']:.1f}% of draws); the estimated spread of their expected top-1 is "
                         f"{a['expected_true_spread_of_5']:.2f} (sd {a['true_sd']:.2f}, from {r['seeds']} models: a "
                         f"rough figure). On the test images alone they span {t['spread']:.2f}, which noise alone "
                         f"would give in {100 * t['p_noise_alone']:.0f}% of draws.")
    both = results["sizes"]
    if "128" in both and "512" in both:
        lines += ["", "More images do not make the search robust: from 128 to 512 images the estimated spread of the "
                  "expected top-1 " + ", ".join(
                      f"{k.upper()} {both['128'][k]['all']['expected_true_spread_of_5']:.2f} -> "
                      f"{both['512'][k]['all']['expected_true_spread_of_5']:.2f}" for k in both["512"] if k in both["128"])
                  + ", and the mean on the same images " + ", ".join(
                      f"{k.upper()} {both['128'][k]['all']['mean']:.2f} -> {both['512'][k]['all']['mean']:.2f}"
                      for k in both["512"] if k in both["128"])
                  + ". Four times the images did not shrink the W4A4 spread, so the images' sampling is not its "
                  "main source (the search's discrete choices are a candidate, untested); with lower means at both "
                  "widths and 2.4x the time, the default stays at 128."]
    for key in [k for k in both if "+refine-" in k]:
        plain = key.split("+refine-")[0]
        if plain in both:
            lines += ["", f"With {overrides_label(key.split('+refine-')[1])} ({setting_label(plain)}): the "
                      "estimated spread of the expected top-1 " + ", ".join(
                          f"{k.upper()} {both[plain][k]['all']['expected_true_spread_of_5']:.2f} -> "
                          f"{both[key][k]['all']['expected_true_spread_of_5']:.2f}"
                          + ("" if both[key][k]["seeds"] == len(SEEDS) else f" (from {both[key][k]['seeds']} models)")
                          for k in both[key] if k in both[plain])
                      + ", the mean on the same seeds " + ", ".join(
                          f"{k.upper()} {same_seeds_mean(both[plain][k], both[key][k]):.2f} -> "
                          f"{both[key][k]['all']['mean']:.2f} (seeds {', '.join(map(str, both[key][k]['seed_ids']))})"
                          for k in both[key] if k in both[plain]) + "."]
    rotated = [k for k in both if "+" in k and "refine" not in k]
    for key in rotated:
        plain = key.split("+")[0]
        if plain in both:
            lines += ["", f"With rotated linear inputs (`rotation={key.split('+')[1]}`, {plain} images): the estimated "
                      "spread of the expected top-1 " + ", ".join(
                          f"{k.upper()} {both[plain][k]['all']['expected_true_spread_of_5']:.2f} -> "
                          f"{both[key][k]['all']['expected_true_spread_of_5']:.2f}" for k in both[key] if k in both[plain])
                      + ", the mean " + ", ".join(
                          f"{k.upper()} {both[plain][k]['all']['mean']:.2f} -> {both[key][k]['all']['mean']:.2f}"
                          for k in both[key] if k in both[plain]) + "."]
    lines += ["", "Mean calibration seconds (one thread): " + "; ".join(
        f"{setting_label(size)} " + ", ".join(f"{k.upper()} {r['calib_seconds']:.0f}" for k, r in per_bits.items())
        for size, per_bits in results["sizes"].items()), "", f"Versions: {results['versions']}", ""]
    atomic_write_bytes(out / "calib_heldout.md", lambda fh: fh.write("\n".join(lines).encode()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="*", default=[f"{b}:{s}" for b in (3, 4) for s in SEEDS],
                    help="BITS:SEED cells this process runs")
    ap.add_argument("--summarise", action="store_true", help="only write the summary of the cached cells")
    ap.add_argument("--calib-size", type=int, choices=SIZES, default=CALIB, help="images per calibration subset")
    ap.add_argument("--rotation", choices=ROTATIONS, default="none", help="the mse recipe's rotation setting")
    ap.add_argument("--refine", choices=list(REFINES), default="off",
                    help="CalibConfig overrides by name: the mse search's finer second grid, bias correction")
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
            run_cell(fp, loads, bits, seed, args.work, args.calib_size, args.rotation,
                     calibration=REFINES[args.refine],
                     path=cell_path(args.work, bits, seed, args.calib_size, args.rotation, args.refine))
    summarise(args.work, args.out)


if __name__ == "__main__":
    main()
