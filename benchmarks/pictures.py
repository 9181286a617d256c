"""Benchmark pictures: accuracy vs bits per recipe and accuracy vs iterations, from the benchmark JSON.

Reads ``calibration.json`` (calibration-only recipes, mean ± sd over calibration subsets) and
``fimaq.json`` (reconstruction recipes at W4A4 / W3A3, seed 0; QDrop and FIMA-Q at 250..2000
iterations per block) and writes ``pictures_bits.png`` and ``pictures_iters.png`` beside them. Nothing is
measured here: every point is a cell of those files.

With ``--run RUN_DIR`` it also writes ``pictures_run_loss_curves.png`` and ``pictures_run_output_error.png``:
the per-block loss curves and output error before -> after reconstruction of that run, the same
plots ``vitq report`` puts on its page.

Command: ``python benchmarks/pictures.py --run runs/deploy/fimaq-w4a4`` (the run made by
``vitq quantize --model cifar10_vit --data cifar10 --recipe fimaq --w-bits 4 --a-bits 4 --iters 500 --seed 0``)
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "src"))
from vitq.reporting.plots import Plotter  # noqa: E402

CALIB_RECIPES = ("minmax", "percentile", "repq", "mse")
RECON_RECIPES = ("qdrop", "brecq", "fimaq-diag", "fimaq")


def calibration_points(results: dict) -> dict[str, list[tuple[int, float, float]]]:
    """recipe -> [(bits, mean top-1, sd)] over the default-search calibration subsets."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for recipe in CALIB_RECIPES:
        for bits in (8, 6, 4, 3):
            accs = [c["quant_top1"] for c in results["cells"].values()
                    if c["recipe"] == recipe and c["w_bits"] == bits and not c.get("tag")]
            if accs:
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                out.setdefault(recipe, []).append((bits, statistics.mean(accs), sd))
    return out


def reconstruction_points(results: dict) -> dict[str, list[tuple[int, float]]]:
    """recipe -> [(bits, top-1)] of the seed-0, 500-iteration cells (before the redesign's search change)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for recipe in RECON_RECIPES:
        for bits in (4, 3):
            cell = results["cells"].get(f"{recipe}-w{bits}a{bits}-s0-i{results['iters']}")
            if cell:
                out.setdefault(recipe, []).append((bits, cell["top1"]))
    return out


def save_img_tag(tag: str, path: Path) -> None:
    """Write the PNG inside an ``<img src="data:image/png;base64,...">`` tag (what the report page embeds)."""
    data = re.search(r'base64,([^"]+)"', tag)
    if data is None:
        raise SystemExit(f"no image in the report plot for {path.name}")
    path.write_bytes(base64.b64decode(data.group(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="a `vitq quantize` run folder with reconstruction")
    args = ap.parse_args()
    calib = json.loads((HERE / "calibration.json").read_text())
    fimaq = json.loads((HERE / "fimaq.json").read_text())
    p = Plotter()
    fp = calib.get("fp_top1", fimaq.get("fp_top1"))

    fig = p.figure(7.0, 4.0)
    ax = fig.add_subplot()
    cal = calibration_points(calib)
    rec = reconstruction_points(fimaq)
    colours = p.colours(len(cal) + len(rec))
    for colour, (recipe, pts) in zip(colours, cal.items()):
        ax.errorbar([b for b, _, _ in pts], [m for _, m, _ in pts], yerr=[s for _, _, s in pts], marker="o",
                    capsize=3, color=colour, label=f"{recipe} (calibration only)")
    for colour, (recipe, pts) in zip(colours[len(cal):], rec.items()):
        ax.plot([b for b, _ in pts], [t for _, t in pts], marker="s", linestyle="--", color=colour,
                label=f"{recipe} (reconstruction, seed 0)")
    if fp is not None:
        ax.axhline(fp, color="black", linewidth=0.8, linestyle=":", label=f"FP32 {fp:.2f}")
    ax.set_xlabel("bits (W = A)")
    ax.set_ylabel("top-1 % (10k CIFAR-10 test images)")
    ax.set_xticks([3, 4, 6, 8])
    ax.set_ylim(60, 76.5)
    ax.set_title("cifar10_vit: accuracy vs bits (calibration: mean ± sd over subsets; 3 bits minmax/percentile "
                 "below the axis)", fontsize=8)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    p.Canvas(fig).print_png(str(HERE / "pictures_bits.png"))

    fig = p.figure(6.0, 3.6)
    ax = fig.add_subplot()
    for colour, recipe in zip(p.colours(2), ("qdrop", "fimaq")):
        pts = sorted((c["iters"], c["top1"]) for c in fimaq["cells"].values()
                     if c["recipe"] == recipe and c["bits"] == 3 and c["seed"] == 0 and c.get("group") in ("main", "iters")
                     and "rank" not in c and "lowrank_form" not in c and "calib_search" not in c)
        ax.plot([i for i, _ in pts], [t for _, t in pts], marker="o", color=colour, label=recipe)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([250, 500, 1000, 2000], labels=["250", "500", "1000", "2000"])
    ax.set_xlabel("iterations per block")
    ax.set_ylabel("W3A3 top-1 %")
    ax.set_title("cifar10_vit W3A3, seed 0: accuracy vs reconstruction budget", fontsize=9)
    ax.legend(fontsize=8)
    p.Canvas(fig).print_png(str(HERE / "pictures_iters.png"))
    print("wrote", HERE / "pictures_bits.png", HERE / "pictures_iters.png")
    if args.run is not None:
        blocks = json.loads((args.run / "report.json").read_text()).get("reconstruction_blocks")
        if not blocks:
            raise SystemExit(f"{args.run} has no reconstruction blocks in its report.json")
        save_img_tag(p.loss_curves(blocks), HERE / "pictures_run_loss_curves.png")
        save_img_tag(p.output_error(blocks), HERE / "pictures_run_output_error.png")
        print("wrote the run's plots from", args.run)


if __name__ == "__main__":
    main()
