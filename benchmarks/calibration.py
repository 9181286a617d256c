"""Calibration recipes on the reference model, and calibration cost at full size.

Part 1: ``cifar10_vit`` at W8A8, W6A6, W4A4, W3A3 with each calibration recipe, each on 5
calibration subsets (128 images from the training split, seeds 0..4), top-1 on the 10,000 test
images as mean ± sd over the subsets, with calibration time and peak memory; and the ``mse``
search's old subsampling on the same subsets (``--tag before``). Part 2: timm ``deit_small_patch16_224`` (random weights; accuracy is
meaningless, only the cost is reported) calibrated on the 125 real ImageNet images of
``../shared/data/imagenet-sample-128.tar.gz`` at 224 px, next to the reference model's cost
measured in the same run.

Reproduce:

    python benchmarks/calibration.py --out benchmarks            # both parts
    python benchmarks/calibration.py --skip-deit                  # part 1 only
    python benchmarks/calibration.py --skip-deit --recipes mse --bits 4 3 --tag before

Results go to ``calibration.json`` / ``calibration.md`` after every run (partial results survive
a crash; an interrupted sweep resumes, skipping the cells already in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import tarfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitq  # noqa: E402
from vitq.data import atomic_write_bytes, build_dataset, make_loader, resolve_data  # noqa: E402
from vitq.evaluation import evaluate  # noqa: E402
from vitq.models import eval_transform  # noqa: E402
from vitq.report import stage, versions  # noqa: E402

RECIPES = ("minmax", "percentile", "repq", "mse")
BITS = (8, 6, 4, 3)
EVAL_BATCH = 100  # the CLI's default evaluation batch
FORMAT = 2        # results file: one cell per (recipe, bits, calibration subset)
# The mse search's subsampling before this version (kept to measure what the change bought)
SEARCH_BEFORE = {"max_search_tokens": 2048, "max_search_samples": 16, "max_search_elements": None,
                 "bias_correction": False}
# The mse recipe before bias correction became its default (the cells measured then carry this tag)
TAGS = {"": {}, "before": SEARCH_BEFORE, "no-bc": {"bias_correction": False}}


def imagenet_sample(path: Path, model: torch.nn.Module) -> torch.Tensor:
    """The sample's images, preprocessed with the model's timm eval transform."""
    from PIL import Image

    tf = eval_transform(model)
    images = []
    with tarfile.open(path) as tf_archive:
        for member in sorted(tf_archive.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.lower().endswith((".jpeg", ".jpg", ".png")):
                img = Image.open(io.BytesIO(tf_archive.extractfile(member).read())).convert("RGB")
                images.append(tf(img))
    return torch.stack(images)


def _cells(results: dict, recipe: str, bits: int, tag: str = "", model: str = "cifar10_vit") -> list[dict]:
    return [c for c in results["cells"].values()
            if c["recipe"] == recipe and c["w_bits"] == bits and c.get("tag", "") == tag
            and c.get("model", "cifar10_vit") == model]


def cell_key(model: str, recipe: str, bits: int, seed: int, tag: str = "") -> str:
    # cifar10_vit's keys carry no model name: they were measured before the Swin column existed
    prefix = "" if model == "cifar10_vit" else f"{model}-"
    return f"{prefix}{recipe}-w{bits}a{bits}-s{seed}" + (f"-{tag}" if tag else "")


def recipe_table(results: dict, model: str) -> list[str]:
    """One model's table: top-1 mean ± sd over the subsets per recipe and bits, spreads, seconds, and
    the per-subset numbers."""
    n_sub = results.get("subsets", 1)
    lines = ["| recipe | " + " | ".join(f"W{b}A{b} top-1" for b in BITS) + " | W4A4 spread | W3A3 spread | " +
             " | ".join(f"W{b}A{b} calib s" for b in BITS) + " | peak MB (W4A4) |",
             "|---|" + "---|" * (2 * len(BITS) + 3)]
    for r in RECIPES:
        acc, sec, spread = [], [], {}
        for b in BITS:
            cells = _cells(results, r, b, model=model)
            tops = [c["quant_top1"] for c in cells]
            acc.append(_mean_sd(tops))
            sec.append(f"{statistics.mean(c['calib_seconds'] for c in cells):.1f}" if cells else "-")
            spread[b] = f"{max(tops) - min(tops):.2f}" if len(tops) > 1 else "-"
        w4 = _cells(results, r, 4, model=model)
        peak = f"{max(c['calib_peak_mb'] for c in w4):.0f}" if w4 else "-"
        lines.append(f"| {r} | {' | '.join(acc)} | {spread[4]} | {spread[3]} | {' | '.join(sec)} | {peak} |")
    counts = {b: sorted({len(_cells(results, r, b, model=model)) for r in RECIPES} - {0}) for b in BITS}
    lines += ["", "Subsets measured per cell: " + ", ".join(
        f"W{b}A{b} {'/'.join(map(str, counts[b])) or '0'}" for b in BITS) + ".", ""]
    lines += ["Per subset (top-1):", "", "| recipe | bits | " + " | ".join(f"seed {s}" for s in range(n_sub)) + " |",
              "|---|---|" + "---|" * n_sub]
    for r in RECIPES:
        for b in BITS:
            by_seed = {c["seed"]: c["quant_top1"] for c in _cells(results, r, b, model=model)}
            if by_seed:
                lines.append(f"| {r} | W{b}A{b} | " + " | ".join(f"{by_seed[s]:.2f}" if s in by_seed else "-"
                                                             for s in range(n_sub)) + " |")
    return lines


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_outputs(out: Path, results: dict) -> None:
    atomic_write_bytes(out / "calibration.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    n_sub = results.get("subsets", 1)
    lines = ["# Calibration recipes", "",
             f"Command: `{results.get('command', 'python benchmarks/calibration.py')}`", "",
             f"Reference model `cifar10_vit`, FP top-1 **{results.get('fp_top1', float('nan')):.2f}%** "
             f"on the 10,000 CIFAR-10 test images. Each cell calibrates on 128 images drawn from the training "
             f"split with seeds 0..{n_sub - 1} (one random subset per seed, the same subsets for every recipe) and "
             f"reports top-1 as mean ± sample standard deviation over the subsets; `spread` is max - min. CPU, "
             f"{results.get('threads', 1)} thread(s); seconds are the mean calibration time, peak memory the "
             f"process's resident peak during calibration.", ""] + recipe_table(results, "cifar10_vit")
    swin_fp = results.get("fp_top1_by_model", {}).get("cifar10_swin")
    if swin_fp is not None:
        lines += ["", "## `cifar10_swin`", "",
                  f"The second reference model (a timm Swin: 4x4 windows on 8x8 tokens, then one 4x4 window), FP "
                  f"top-1 **{swin_fp:.2f}%**, calibrated on the same subsets "
                  "(`python benchmarks/calibration.py --skip-deit --model cifar10_swin`):", ""]
        lines += recipe_table(results, "cifar10_swin")
    before = {b: _cells(results, "mse", b, "before") for b in (4, 3)}
    if any(before.values()):
        lines += ["", "## The mse recipe's defaults, then and now", "",
                  "Until the core redesign the search scored activation candidates on a random 2,048 of the linear "
                  "layers' input rows and matmul candidates on 16 of the 128 images (`max_search_tokens=2048`, "
                  "`max_search_samples=16`), a random draw on top of the choice of calibration images; since then it "
                  "scores them on all of them (up to caps that only bite on full-size models). Since this version "
                  "the `mse` recipe also corrects each linear layer's bias (`bias_correction`: the mean output error "
                  "on the calibration images added back, the search scoring what is left; calib_heldout.md). The "
                  "same subsets with each setting (tags `before` and `no-bc` in the JSON) and with today's default:",
                  "", "| setting | W4A4 mean ± sd | W4A4 spread | W3A3 mean ± sd | W3A3 spread | calib s (W4A4) |",
                  "|---|---|---|---|---|---|"]
        for tag, label in (("before", "16 images / 2,048 rows, no bias correction"),
                           ("no-bc", "every image and row, no bias correction"),
                           ("", "every image and row, bias correction (default)")):
            row = [label]
            for b in (4, 3):
                tops = [c["quant_top1"] for c in _cells(results, "mse", b, tag)]
                row += [_mean_sd(tops), f"{max(tops) - min(tops):.2f}" if len(tops) > 1 else "-"]
            w4 = _cells(results, "mse", 4, tag)
            row.append(f"{statistics.mean(c['calib_seconds'] for c in w4):.1f}" if w4 else "-")
            lines.append("| " + " | ".join(row) + " |")
        high = [(b, c) for b in (8, 6) for c in _cells(results, "mse", b, "before")]
        if high:
            lines += ["", "mse with the old subsample at " + ", ".join(f"W{b}A{b} {c['quant_top1']:.2f}" for b, c in high)
                      + " (seed 0); cells marked `carried_from` in the JSON were measured before the redesign."]
    heldout = out / "calib_heldout.json"
    if heldout.is_file():  # the same 5 seeds' mse calibrations on 512 images
        sizes = json.loads(heldout.read_text()).get("sizes", {})
        if "512" in sizes:
            lines += ["", "## `mse` on 512 images (tried as the default, not taken)", "",
                      "The same seeds' subsets grown to 512 images (seed s's 128 lie inside its 512), calibrated and "
                      "scored on the same 10,000 test images by `benchmarks/calib_heldout.py`, which also scores them "
                      "on held-out training images and separates the real spread from the evaluation noise:", "",
                      "| images | bits | top-1 per seed | mean ± sd | spread | calib s |", "|---|---|---|---|---|---|"]
            for size in ("128", "512"):
                for key, r in sizes.get(size, {}).items():
                    tops = r["test"]["top1"]
                    lines.append(f"| {size} | {key.upper()} | {' / '.join(f'{t:.2f}' for t in tops)} | "
                                 f"{_mean_sd(tops)} | {max(tops) - min(tops):.2f} | {r['calib_seconds']:.0f} |")
            lines += ["", "Seconds there: one thread per process, two processes side by side. Its 128-image rows were "
                      "calibrated again on its own CPU, so they differ a little from the table above (the kernels "
                      "sum in another order and the grid search's choices follow)."]
    deit = results.get("deit_small")
    if deit:
        lines += ["", "## Full size: calibration cost of `deit_small_patch16_224`", "",
                  f"timm `deit_small_patch16_224` with random weights (cost only), {deit['images']} real ImageNet "
                  "images at 224 px from `imagenet-sample-128.tar.gz`, versus `cifar10_vit` with the same "
                  "number of calibration images, measured in the same run.", "",
                  "| model | recipe | params (M) | calibration s | ratio to cifar10_vit | peak MB |", "|---|---|---|---|---|---|"]
        for row in deit["rows"]:
            lines.append(f"| {row['model']} | {row['recipe']} | {row['params_m']:.1f} | {row['seconds']:.1f} | "
                         f"{row['ratio']:.1f}x | {row['peak_mb']:.0f} |")
    lines += ["", f"Versions: {results['versions']}", ""]
    atomic_write_bytes(out / "calibration.md", lambda fh: fh.write("\n".join(lines).encode()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--skip-deit", action="store_true")
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument("--imagenet-sample", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample-128.tar.gz")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--bits", nargs="*", type=int, default=list(BITS))
    ap.add_argument("--subsets", type=int, default=5, help="calibration subsets (seeds 0..N-1) per cell")
    ap.add_argument("--model", choices=("cifar10_vit", "cifar10_swin"), default="cifar10_vit",
                    help="the reference model of part 1")
    ap.add_argument("--tag", choices=list(TAGS), default="",
                    help="'before': the mse search's old subsampling (16 images / 2,048 rows); 'no-bc': the mse "
                         "recipe without bias correction (its default before); for the comparison")
    args = ap.parse_args()
    out_json = args.out / "calibration.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"cells": {}}
    if results.get("format") != FORMAT:  # cells of the single-subset format are not comparable
        results = {"format": FORMAT, "cells": {}}
    results["command"] = ("python benchmarks/calibration.py --out benchmarks && python benchmarks/calibration.py "
                          "--skip-deit --recipes mse --bits 4 3 --tag before")
    results["versions"] = versions()
    if not (args.skip_cifar and args.skip_deit):  # timings are only comparable at one thread count
        results["threads"] = torch.get_num_threads()
    spec = resolve_data("cifar10")

    if not args.skip_cifar:
        fp_model = vitq.load_model(args.model)
        loader = make_loader(build_dataset(spec, "eval", eval_transform(fp_model)), EVAL_BATCH)
        if args.model == "cifar10_vit" and "fp_top1" not in results:
            results["fp_top1"] = evaluate(fp_model, loader, progress=False)["top1"]
        by_model = results.setdefault("fp_top1_by_model", {})
        if args.model != "cifar10_vit" and args.model not in by_model:
            by_model[args.model] = evaluate(fp_model, loader, progress=False)["top1"]
        results["subsets"] = max(results.get("subsets", 1), args.subsets)
        search = TAGS[args.tag]
        for seed in range(args.subsets):
            calib = vitq.calibration_images(fp_model, "cifar10", 128, seed=seed)
            for bits in args.bits:
                for recipe in args.recipes:
                    key = cell_key(args.model, recipe, bits, seed, args.tag)
                    if key in results["cells"]:
                        continue
                    model = copy.deepcopy(fp_model)
                    stages: dict = {}
                    with stage(stages, "calibrate"):
                        vitq.quantize(model, calib, recipe, w_bits=bits, a_bits=bits, seed=seed, device="cpu",
                                      progress=False, calib_size=128, calibration=search or None)
                    res = evaluate(model, loader, progress=False)
                    results["cells"][key] = {"model": args.model, "recipe": recipe, "w_bits": bits, "a_bits": bits, "seed": seed,
                                             "tag": args.tag, "quant_top1": res["top1"], "quant_top5": res["top5"],
                                             "calib_seconds": stages["calibrate"]["seconds"],
                                             "calib_peak_mb": stages["calibrate"]["peak_mem_mb"]}
                    print(f"{key}: {res['top1']:.2f}% (calibration {stages['calibrate']['seconds']:.1f}s)", flush=True)
                    write_outputs(args.out, results)

    if not args.skip_deit:
        import timm

        deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        images = imagenet_sample(args.imagenet_sample, deit)
        ref = vitq.load_model("cifar10_vit")
        ref_images = vitq.calibration_images(ref, "cifar10", len(images), seed=0)
        rows = []
        for recipe in ("minmax", "mse"):
            timing = {}
            for name, model, imgs in (("cifar10_vit", ref, ref_images), ("deit_small_patch16_224", deit, images)):
                stages: dict = {}
                with stage(stages, "calibrate"):
                    vitq.quantize(copy.deepcopy(model), imgs, recipe, w_bits=4, a_bits=4, calib_size=len(imgs),
                                  device="cpu", progress=True)
                timing[name] = stages["calibrate"]
                rows.append({"model": name, "recipe": recipe, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                             "seconds": stages["calibrate"]["seconds"], "peak_mb": stages["calibrate"]["peak_mem_mb"]})
                print(rows[-1], flush=True)
            for row in rows[-2:]:
                row["ratio"] = row["seconds"] / timing["cifar10_vit"]["seconds"]
            results["deit_small"] = {"images": len(images), "rows": rows}
            write_outputs(args.out, results)
    write_outputs(args.out, results)


if __name__ == "__main__":
    main()
