"""Where the `mse` calibration's spread comes from: the same calibration images, other candidate grids (issue 11).

``benchmarks/calib_heldout.md`` finds that `mse` models calibrated on 5 subsets of 128 images differ in
expected top-1 by more than the issue's 0.3 points, and that 4x the images does not shrink that at
W4A4, so the images' sampling is not the main source. This benchmark tests the other candidate, the
search's discrete choices: seed 0's 128 images every time, only the size of the candidate grid
(``eq_n``: 112, 120, 128 = the default, 144) changed, each model scored on the same images as
``calib_heldout.md`` (the 10,000 test images and the held-out training images outside every subset of
every size there), with the same noise-free spread estimator (``calib_heldout.spread_stats``).

Reproduce (two processes; predictions cached in --work, a stopped run resumes):

    python benchmarks/calib_grid.py --bits 4 --eq-n 128 112 & python benchmarks/calib_grid.py --bits 4 --eq-n 144 120; wait
    python benchmarks/calib_grid.py --bits 3 --eq-n 128 112 & python benchmarks/calib_grid.py --bits 3 --eq-n 144 120; wait
    python benchmarks/calib_grid.py --summarise

The same W4A4 cells with the search's finer second grid around each winner (``--refine r16``:
``fine_grid=16, fine_grid_span=1``; ``--refine r32s2``: 32 fine scales over 2 coarse scales either side):

    python benchmarks/calib_grid.py --bits 4 --refine r32s2 --eq-n 128 112 & \
        python benchmarks/calib_grid.py --bits 4 --refine r32s2 --eq-n 144 120; wait
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitq  # noqa: E402
from vitq.data import atomic_write_bytes  # noqa: E402
from vitq.report import machine, versions  # noqa: E402
import calib_heldout as heldout  # noqa: E402  (benchmarks/, the script's own folder)

HERE = Path(__file__).resolve().parent
SEED = 0
GRIDS = (112, 120, 128, 144)


REFINES = heldout.REFINES


def cell_path(work: Path, bits: int, eq_n: int, refine: str = "off") -> Path:
    return work / (f"w{bits}-eq{eq_n}" + ("" if refine == "off" else f"-{refine}") + ".pt")


def run_cell(fp: torch.nn.Module, loads: dict, bits: int, eq_n: int, work: Path, refine: str = "off") -> None:
    heldout.run_cell(fp, loads, bits, SEED, work, calibration={"eq_n": eq_n, **REFINES[refine]},
                     path=cell_path(work, bits, eq_n, refine))


def summarise(work: Path, out: Path) -> None:
    keep = heldout.heldout_mask(list(heldout.SIZES))  # calib_heldout.md's held-out images
    subsets = json.loads((HERE / "calib_heldout.json").read_text())["sizes"]["128"]
    results = {"command": "python benchmarks/calib_grid.py (see its docstring)", "versions": versions(),
               "machine": machine(), "seed": SEED, "heldout_images": int(keep.sum()), "bits": {}}
    lines = ["# The mse calibration's spread: other candidate grids, the same images", "",
             f"Command: `{results['command']}`", "",
             f"`cifar10_vit`, `mse` calibrated on seed {SEED}'s 128 training images every time, only the candidate grid's "
             "size (`eq_n`, default 128) changed; scored on the 10,000 test images plus the "
             f"{results['heldout_images']:,} held-out training images of `calib_heldout.md` (*all*). Spread columns as "
             "there: observed max - min, the noise-only spread of that many models, and the spread of the models' "
             "expected top-1 with the evaluation noise taken out (scaled to 5 models, as there). The last column "
             "repeats `calib_heldout.md`'s 5 calibration subsets (default grid) on the same images.", "",
             "| bits | refine | eq_n | top-1 on all | mean | observed spread | noise spread | true sd | expected true spread of 5 "
             "| subsets instead (calib_heldout.md): true sd / spread of 5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for bits, refine in ((b, r) for r in REFINES for b in (4, 3)):
        grids = [g for g in GRIDS if cell_path(work, bits, g, refine).is_file()]
        if len(grids) < 2:
            continue
        cells = [torch.load(cell_path(work, bits, g, refine)) for g in grids]
        labels = torch.cat([cells[0]["test"][1], cells[0]["heldout"][1][keep]])
        preds = [torch.cat([c["test"][0], c["heldout"][0][keep]]) for c in cells]
        s = heldout.spread_stats(preds, labels)
        s["eq_n"], s["calib_seconds"] = grids, [round(c["seconds"], 1) for c in cells]
        results["bits"][f"w{bits}a{bits}" + ("" if refine == "off" else f"-{refine}")] = s
        sub = subsets.get(f"w{bits}a{bits}", {}).get("all")
        ref = f"{sub['true_sd']:.2f} / {sub['expected_true_spread_of_5']:.2f}" if sub else "-"
        noise = s["expected_noise_spread_of_5"]  # of 5; for len(grids) models the expected range is smaller
        lines.append(f"| W{bits}A{bits} | {refine}: {REFINES[refine]} | {' / '.join(map(str, grids))} | {' / '.join(f'{a:.2f}' for a in s['top1'])} | "
                     f"{s['mean']:.2f} | {s['spread']:.2f} | {noise:.2f} (of 5) | {s['true_sd']:.2f} | "
                     f"{s['expected_true_spread_of_5']:.2f} | {ref} |")
    w4, w3 = results["bits"].get("w4a4"), results["bits"].get("w3a3")
    if w4 and w3:
        lines += ["", "## Reading the numbers", "",
                  f"At W4A4 the candidate grid alone moves the expected top-1 by about as much as the calibration subset "
                  f"does (true spread of 5: {w4['expected_true_spread_of_5']:.2f} from grids, "
                  f"{subsets['w4a4']['all']['expected_true_spread_of_5']:.2f} from subsets): there the spread is the "
                  "search's discrete choices (which candidate wins on a flat objective), which is why 4x the images did "
                  "not shrink it (calib_heldout.md). At W3A3 the grids' models differ by no more than evaluation noise "
                  f"({w3['spread']:.2f} observed against a noise spread of {w3['expected_noise_spread_of_5']:.2f}), while "
                  f"subsets give {subsets['w3a3']['all']['expected_true_spread_of_5']:.2f}: there the images' sampling is "
                  "the source, and 512 images shrink it (calib_heldout.md: 0.21). Rough figures, each from 4-5 models. "
                  "A W4A4 fix has to make the chosen parameters insensitive to the grid: the finer second grid below "
                  "is a first step. The default grid's seed-0 model scores "
                  f"{w4['top1'][w4['eq_n'].index(128)]:.2f} (W4A4) and {w3['top1'][w3['eq_n'].index(128)]:.2f} (W3A3) on "
                  f"these images against {subsets['w4a4']['all']['top1'][SEED]:.2f} and "
                  f"{subsets['w3a3']['all']['top1'][SEED]:.2f} in calib_heldout.md: the calibration code moved slightly "
                  "since that table."]
    r16, r32 = results["bits"].get("w4a4-r16"), results["bits"].get("w4a4-r32s2")
    if w4 and r16 and r32:
        def tops(r: dict) -> str:
            return " / ".join(f"{a:.2f}" for a in r["top1"])
        lines += ["", "### With the finer second grid (W4A4)", "",
                  f"r16 (16 fine scales over one coarse step either side of each linear-layer winner) splits the grids "
                  f"in two: {tops(r16)} (eq_n {' / '.join(map(str, r16['eq_n']))}). The refined models of grids 112 "
                  "and 128 differ most in `blocks.0.mlp.fc2`'s input quantizer (scale 0.309 / zero point 1 against "
                  "0.477 / 0): the post-GELU input, 79% of it negative, has an output-MSE objective with a narrow "
                  "basin at zero point 1 (the negative values kept) beside a flat one at zero point 0 (clipped), and "
                  "only a fine grid close enough to it finds it (112 and 120 share the same 7 coarse scales, 128 has "
                  "8, 144 has 9). r32s2 (32 fine scales over two coarse steps either side) finds it from every grid "
                  f"in a probe of that layer, and the models score {tops(r32)}: mean {r32['mean']:.2f} against "
                  f"{w4['mean']:.2f} for the one-level search (+{r32['mean'] - w4['mean']:.2f}), but 144's model "
                  f"still stands apart (estimated spread of 5 {r32['expected_true_spread_of_5']:.2f}): some other "
                  "choice still follows the grid. Calibration seconds (two processes side by side): one-level "
                  f"{' / '.join(f'{t:.0f}' for t in w4['calib_seconds'])}, r32s2 "
                  f"{' / '.join(f'{t:.0f}' for t in r32['calib_seconds'])}."]
    lines += ["", "Versions: " + str(results["versions"]), "", "Machine: " + str(results["machine"])]
    atomic_write_bytes(out / "calib_grid.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    atomic_write_bytes(out / "calib_grid.md", lambda fh: fh.write(("\n".join(lines) + "\n").encode()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, choices=(3, 4), default=4)
    ap.add_argument("--eq-n", type=int, nargs="*", default=list(GRIDS))
    ap.add_argument("--refine", choices=list(REFINES), default="off", help="the search's finer second grid")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_calib_grid"))
    ap.add_argument("--summarise", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.summarise:
        summarise(args.work, HERE)
        return
    fp = vitq.load_model("cifar10_vit")
    loads = heldout.loaders(fp)
    for eq_n in args.eq_n:
        run_cell(fp, loads, args.bits, eq_n, args.work, args.refine)


if __name__ == "__main__":
    main()
