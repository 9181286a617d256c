"""The ``vitq`` commands (eval, demo, quantize, export, report): each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import VitqError
from .parser import DEMO_BITS, DEMO_BUDGET, DEMO_RECIPE, recipe_from_args


def _run_folder(given: str | Path | None, prefix: str) -> Path:
    """``--out``, or a fresh folder under runs/ (made by rank 0 and shared, under torchrun)."""
    from .. import distributed
    from ..report import new_run_dir

    if given:
        return Path(given)
    return distributed.broadcast_object(new_run_dir("runs", prefix) if distributed.is_main() else None)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Reports are written by one process: rank 0 under torchrun."""
    from .. import distributed
    from ..report import write_json

    if distributed.is_main():
        write_json(path, data)


def _eval_model(model, spec, limit: int | None, seed: int, batch_size: int, workers: int,
               device, progress: bool, desc: str) -> dict[str, Any]:
    from ..data import build_dataset, make_loader, subset
    from ..evaluation import evaluate
    from ..models import eval_transform

    dataset = subset(build_dataset(spec, "eval", eval_transform(model)), limit, seed)
    return evaluate(model, make_loader(dataset, batch_size, workers), device, progress=progress, desc=desc)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import resolve_data
    from ..models import load_model
    from ..report import machine, versions
    from ..runtime import resolve_device

    # cheap checks first, so a typo in --data or --device fails before a model download
    device = resolve_device(args.device)
    spec = resolve_data(args.data)
    model = load_model(args.model, checkpoint=args.checkpoint, pretrained=not args.random_weights)
    result = _eval_model(model, spec, args.limit, args.seed, args.batch_size, args.workers, device,
                         not args.quiet, f"eval {args.model}")
    out = _run_folder(args.out, "eval")
    report = {"command": "eval", "model": args.model, "data": args.data, "limit": args.limit,
              "seed": args.seed, "device": str(device), **result, "versions": versions(), "machine": machine(),
              "world_size": _world()}
    _write_json(Path(out) / "report.json", report)
    print(f"{args.model} on {args.data}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['images']} images, {result['seconds']:.1f}s)")
    print(f"report: {Path(out) / 'report.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..api import calibration_images, images_needed, quantize_with_summary, save_quantized
    from ..data import resolve_data
    from ..models import load_model
    from ..recipes import get_recipe
    from ..report import machine, stage, versions
    from ..runtime import resolve_device, seed_everything

    device = resolve_device(args.device)
    seed_everything(0)
    out = _run_folder(args.out, "demo")
    stages: dict[str, dict[str, float]] = {}
    progress = not args.quiet
    spec = resolve_data(args.data)
    budget = {"iters": args.iters or DEMO_BUDGET["reconstruction"]["iters"],
              "optim_size": args.optim_size or DEMO_BUDGET["reconstruction"]["optim_size"]}
    recipe = get_recipe(DEMO_RECIPE, w_bits=DEMO_BITS, a_bits=DEMO_BITS, seed=0,
                        calib_size=args.calib_size or DEMO_BUDGET["calib_size"], reconstruction=budget)
    r = recipe.reconstruction
    what = ("the shipped reference ViT (cifar10_vit) on the 10,000 CIFAR-10 test images"
            if (args.model, args.data, args.limit) == ("cifar10_vit", "cifar10", None) else f"{args.model} on {args.data}")
    print(f"vitq demo: {what}, FP32 vs W{DEMO_BITS}/A{DEMO_BITS}: FIMA-Q's mse calibration, then FIMA-Q block "
          f"reconstruction (DPLR Fisher loss, k={r.rank}) with a CPU budget of {r.iters} iterations per block and "
          f"{r.optim_size} optimisation images (the paper uses 20,000 and 1024)", flush=True)
    with stage(stages, "load", device):
        model = load_model(args.model)
    with stage(stages, "eval_fp", device):
        fp = _eval_model(model, spec, args.limit, 0, args.batch_size, args.workers, device, progress, "FP32 eval")
    results: dict[str, Any] = {}

    def eval_calibrated(m) -> None:
        t = stages.setdefault("eval_calibrated", {})
        results["calibrated"] = _eval_model(m, spec, args.limit, 0, args.batch_size, args.workers, device, progress,
                                            "calibrated eval")
        t["seconds"] = results["calibrated"]["seconds"]

    with stage(stages, "quantize", device):
        calib = calibration_images(model, args.data, images_needed(recipe), seed=0)
        result = quantize_with_summary(model, calib, recipe, device=device, progress=progress, work_dir=out,
                                       after_calibration=eval_calibrated)
    with stage(stages, "eval_quant", device):
        qres = _eval_model(model, spec, args.limit, 0, args.batch_size, args.workers, device, progress,
                           "quantized eval")
    if _is_main():
        save_quantized(model, out / "model")
    cal = results["calibrated"]
    report = {"command": "demo", "model": args.model, "data": args.data, "limit": args.limit, "device": str(device),
              "recipe": recipe.name, "w_bits": recipe.w_bits, "a_bits": recipe.a_bits, "seed": 0,
              "calib_size": recipe.calib_size, "fp_top1": fp["top1"], "calibrated_top1": cal["top1"],
              "quant_top1": qres["top1"], "fp": fp, "calibrated": cal, "quant": qres, "config": recipe.to_dict(),
              "calibration": result.calibration,
              "reconstruction_blocks": (result.reconstruction or {}).get("blocks"),
              "stages": stages, "versions": versions(), "machine": machine(), "world_size": _world()}
    _write_json(out / "report.json", report)
    recon_s = sum(b["seconds"] for b in report["reconstruction_blocks"] or [])
    rows = [("FP32", "32", "32", fp["top1"], fp["top5"], "-"),
            ("FIMA-Q calibration", str(recipe.w_bits), str(recipe.a_bits), cal["top1"], cal["top5"],
             f"{result.calibration['seconds']:.0f}"),
            ("+ FIMA-Q reconstruction", str(recipe.w_bits), str(recipe.a_bits), qres["top1"], qres["top5"],
             f"{recon_s:.0f}")]
    print()
    print(f"{'model':<26}{'W bits':>7}{'A bits':>7}{'top-1 %':>9}{'top-5 %':>9}{'stage s':>9}")
    for name, w, a, t1, t5, sec in rows:
        print(f"{name:<26}{w:>7}{a:>7}{t1:>9.2f}{t5:>9.2f}{sec:>9}")
    print(f"\nreport: {out / 'report.json'}   quantized model: {out / 'model'}")
    print(f"to onnxruntime: vitq export {out} --format onnx --out {out}-onnx")
    from ..reporting import plots_available, write_report

    # the demo's work is done: without the optional matplotlib it says how to get the page, not fail
    if not _is_main():
        return 0
    print(f"HTML report: {write_report([out], out / 'report.html')}" if plots_available()
          else "HTML report: skipped (pip install matplotlib, then `vitq report` on this folder)")
    return 0


# below this many iterations per block a run takes minutes: no estimate (measuring its floors costs seconds)
ESTIMATE_FROM_ITERS = 200


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..api import calibration_images, images_needed, quantize_with_summary, save_quantized
    from ..data import resolve_data
    from ..models import load_model
    from ..report import machine, stage, versions
    from ..runtime import resolve_device, seed_everything

    # every cheap check before any heavy work
    recipe = recipe_from_args(args)
    from ..recipes import target_changes

    for change in target_changes(recipe):
        print(f"target {recipe.target}: {change}")
    device = resolve_device(args.device)
    spec = resolve_data(args.data)
    if args.calib_data is not None:
        resolve_data(args.calib_data)
    seed_everything(args.seed)
    out = _run_folder(args.out, f"quantize-{recipe.name}-w{recipe.w_bits}a{recipe.a_bits}")
    stages: dict[str, dict[str, float]] = {}
    progress = not args.quiet
    report: dict[str, Any] = {"command": "quantize", "model": args.model, "data": args.data, "recipe": recipe.name,
                              "w_bits": recipe.w_bits, "a_bits": recipe.a_bits, "seed": args.seed,
                              "calib_size": recipe.calib_size, "limit": args.limit, "device": str(device),
                              "config": recipe.to_dict(), "stages": stages, "versions": versions(), "machine": machine(),
                              "world_size": _world()}
    with stage(stages, "load", device):
        model = load_model(args.model, checkpoint=args.checkpoint, pretrained=not args.random_weights)
    with stage(stages, "calibration_data", device):
        calib = calibration_images(model, args.data, images_needed(recipe), args.seed, args.calib_transform,
                                   args.calib_data)
    if not args.skip_fp_eval:
        with stage(stages, "eval_fp", device):
            fp = _eval_model(model, spec, args.limit, args.seed, args.batch_size, args.workers, device, progress,
                             "FP eval")
        report.update(fp_top1=fp["top1"], fp_top5=fp["top5"], fp=fp)
        _write_json(out / "report.json", report)  # partial report: survives a crash later on
    if recipe.reconstruction is not None:
        if recipe.reconstruction.iters >= ESTIMATE_FROM_ITERS:
            from ..reconstruction.cost import estimate_reconstruction

            est = estimate_reconstruction(model, calib, recipe.reconstruction, device, spec=recipe.quant_spec())
            report["estimated_reconstruction_s"] = est.seconds
            report["estimated_iteration_ratio"] = est.iter_ratio
            report["estimated_snapshot_ratio"] = est.snap_ratio
            print(f"reconstruction: {est.describe()} on this device ({len(est.per_block)} blocks x "
                  f"{recipe.reconstruction.iters} iterations; an iteration costs {est.iter_ratio:.1f}x the float "
                  f"forward + backward of {est.ratio_block} here; benchmarks/speed.md)", flush=True)
        print(f"writing to {out}: if this run stops, the same command with --out {out} resumes it "
              "after the last finished block", flush=True)
    with stage(stages, "quantize", device):
        result = quantize_with_summary(model, calib, recipe, device=device, progress=progress, work_dir=out,
                                       restart=args.restart)
    stages.update({f"quantize.{k}": v for k, v in result.stages.items()})
    from .. import distributed

    # under torchrun: each rank's own stage times and memory (stages above are rank 0's)
    report["ranks"] = distributed.gather_objects({"rank": 0 if distributed.current() is None
                                                  else distributed.current().rank, "stages": result.stages})
    report["calibration"] = result.calibration
    if result.reconstruction is not None:
        report["reconstruction_blocks"] = result.reconstruction["blocks"]
    if result.refinement is not None:
        report["refinement"] = result.refinement
    with stage(stages, "eval_quant", device):
        qres = _eval_model(model, spec, args.limit, args.seed, args.batch_size, args.workers, device, progress,
                           "quantized eval")
    report.update(quant_top1=qres["top1"], quant_top5=qres["top5"], quant=qres, images=qres["images"])
    with stage(stages, "save", device):
        if _is_main():
            save_quantized(model, out / "model")
    report["folded_layers"] = model.vitq_config["folded_layers"]
    _write_json(out / "report.json", report)
    fp_txt = f"FP {report['fp_top1']:.2f}% -> " if "fp_top1" in report else ""
    print(f"{args.model} {recipe.name} W{recipe.w_bits}/A{recipe.a_bits}: {fp_txt}quantized {qres['top1']:.2f}% "
          f"top-1 on {qres['images']} images (quantization {stages['quantize']['seconds']:.1f}s)")
    print(f"report: {out / 'report.json'}   model: {out / 'model'}")
    return 0


def _export_source_and_check_images(source: Path):
    """(the model to export, 8 images of the data it was quantized on to check the ONNX graph with),
    or (the folder, None) when the run does not say its data: the check then uses a fixed random batch."""
    report_path = source / "report.json"
    data = None
    if report_path.is_file():
        try:
            data = json.loads(report_path.read_text()).get("data")
        except (OSError, json.JSONDecodeError, AttributeError):
            data = None
    if data is None:
        return source, None
    from ..api import calibration_images
    from ..models import load_model

    model = load_model(str(source))
    try:
        return model, calibration_images(model, data, 8, seed=0)
    except VitqError:  # the data moved since the run: check on a random batch instead
        return model, None


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export, packed_size_report

    source, check = args.source, None
    if args.format == "onnx":
        source, check = _export_source_and_check_images(Path(args.source))
    out = export(source, args.out, format=args.format, profile=args.profile, opset=args.opset, check_images=check)
    if args.format == "onnx":
        report = json.loads((out / "export.json").read_text())
        check = report["check"]
        kernels = ", ".join(f"{n} {op}" for op, n in report["integer_kernels"].items()) or "none"
        images = f"{check['images']} {'calibration' if check['input'] == 'given' else 'random'} images"
        print(f"{args.source} -> {out / 'model.onnx'} (onnx, profile {args.profile}, opset {args.opset}): "
              f"{report['file_bytes'] / 1e6:.2f} MB; onnxruntime vs vitq on {images}: same top-1 "
              f"{check['same_top1_optimized']:.0%}, max |logit diff| {check['max_abs_logit_diff_optimized']:.2e} "
              f"of {check['max_abs_logit']:.2f}; integer kernels: {kernels} "
              f"({report['integer_matmul_share']:.0%} of matmul/conv nodes)")
        return 0
    size = packed_size_report(out)
    mb = 1e6
    headers = size["header_bytes"] + size["config_bytes"]
    print(f"{args.source} -> {out} ({args.format}): {size['total_bytes'] / mb:.2f} MB = "
          f"{size['codes_bytes'] / mb:.2f} MB codes + {size['weight_qparams_bytes'] / mb:.3f} MB scales/zero-points + "
          f"{size['float_rest_bytes'] / mb:.3f} MB float rest + {headers / mb:.3f} MB headers, "
          f"{size['ratio']:.3f} of FP32 ({size['fp32_bytes'] / mb:.2f} MB)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..reporting import write_report

    if args.out is None and len(args.runs) > 1:
        raise VitqError(f"{len(args.runs)} runs make one page: say where it goes with --out FILE")
    print(write_report(args.runs, args.out if args.out is not None else args.runs[0] / "report.html"))
    return 0


def _world() -> int:
    from .. import distributed

    return distributed.world_size()


def _is_main() -> bool:
    from .. import distributed

    return distributed.is_main()


