"""Calibration recipes on the reference model, and calibration cost at full size.

Part 1: ``cifar10_vit`` at W8A8, W6A6, W4A4, W3A3 with each calibration recipe (128 calibration
images from the training split, seed 0), top-1 on the 10,000 test images, with calibration time
and peak memory. Part 2: timm ``deit_small_patch16_224`` (random weights; accuracy is
meaningless, only the cost is reported) calibrated on the 125 real ImageNet images of
``../shared/data/imagenet-sample-128.tar.gz`` at 224 px, next to the reference model's cost
measured in the same run.

Reproduce:

    python benchmarks/calibration.py --out benchmarks            # both parts
    python benchmarks/calibration.py --skip-deit                  # part 1 only

Results go to ``calibration.json`` / ``calibration.md`` after every run (partial results survive
a crash; an interrupted sweep resumes, skipping the cells already in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
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


def write_outputs(out: Path, results: dict) -> None:
    atomic_write_bytes(out / "calibration.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    lines = ["# Calibration recipes", "",
             "Command: `python benchmarks/calibration.py --out benchmarks`", "",
             f"Reference model `cifar10_vit`, FP top-1 **{results.get('fp_top1', float('nan')):.2f}%** "
             f"on the 10,000 CIFAR-10 test images; 128 calibration images from the training split (seed 0); "
             f"CPU, {results.get('threads', 2)} thread(s). Peak memory is the process's resident peak during calibration.", "",
             "| recipe | " + " | ".join(f"W{b}A{b} top-1" for b in BITS) + " | " +
             " | ".join(f"W{b}A{b} calib s" for b in BITS) + " | peak MB (W4A4) |",
             "|---|" + "---|" * (2 * len(BITS) + 1)]
    for r in RECIPES:
        cells = [results["cells"].get(f"{r}-w{b}a{b}") for b in BITS]
        acc = " | ".join(f"{c['quant_top1']:.2f}" if c else "-" for c in cells)
        sec = " | ".join(f"{c['calib_seconds']:.1f}" if c else "-" for c in cells)
        w4 = results["cells"].get(f"{r}-w4a4")
        lines.append(f"| {r} | {acc} | {sec} | {w4['calib_peak_mb']:.0f} |" if w4 else f"| {r} | {acc} | {sec} | - |")
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
    args = ap.parse_args()
    out_json = args.out / "calibration.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"cells": {}}
    results["versions"] = versions()
    if not (args.skip_cifar and args.skip_deit):  # timings are only comparable at one thread count
        results["threads"] = torch.get_num_threads()
    spec = resolve_data("cifar10")

    if not args.skip_cifar:
        fp_model = vitq.load_model("cifar10_vit")
        loader = make_loader(build_dataset(spec, "eval", eval_transform(fp_model)), 250)
        if "fp_top1" not in results:
            results["fp_top1"] = evaluate(fp_model, loader, progress=False)["top1"]
        calib = vitq.calibration_images(fp_model, "cifar10", 128, seed=0)
        for bits in args.bits:
            for recipe in args.recipes:
                key = f"{recipe}-w{bits}a{bits}"
                if key in results["cells"]:
                    continue
                model = copy.deepcopy(fp_model)
                stages: dict = {}
                with stage(stages, "calibrate"):
                    vitq.quantize(model, calib, recipe, w_bits=bits, a_bits=bits, seed=0, device="cpu", progress=False)
                res = evaluate(model, loader, progress=False)
                results["cells"][key] = {"recipe": recipe, "w_bits": bits, "a_bits": bits, "quant_top1": res["top1"],
                                         "quant_top5": res["top5"], "calib_seconds": stages["calibrate"]["seconds"],
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
