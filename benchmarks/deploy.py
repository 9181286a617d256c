"""Deployment: vitq's ONNX profiles beside onnxruntime FP32 and onnxruntime's own ``quantize_static``.

For ``cifar10_vit`` (top-1 on the 10,000 test images) and ``deit_small_patch16_224`` at 224 px (random
weights, timing only): latency and throughput at batch 1 and 64 on 1 and 2 threads, file size, top-1 and
the integer-kernel share read from onnxruntime's optimised graph, for

* onnxruntime FP32 (the float model exported by torch.onnx);
* vitq W8A8 ``int8`` profile (quantized with ``--target ort-int8``, onnxruntime integer kernels, uint8
  weights: exact on every CPU) and ``int8-vnni`` (the same file with int8 weights: onnxruntime's u8s8
  kernels, faster with VNNI, inexact on AVX2-only CPUs; benchmarks/avx2_saturation.md);
* vitq W4 ``w4`` profile (weight-only, ``--target ort-w4``, MatMulNBits; fp32 compute, i.e. exactly vitq's
  model, and onnxruntime's int8-compute default);
* vitq W4A4 ``exact`` profile (the simulated model as a QDQ graph);
* ``quantize_static`` (QDQ, per-channel weights, min-max and percentile calibration on the same 128
  calibration images) at W8A8 and at W4A4 (QInt4 weights, QUInt4 activations: the lowest it offers);
* onnxruntime's 4-bit weight-only quantizer (``MatMulNBitsQuantizer``, round to nearest) per output
  channel (vitq's granularity) and in blocks of 32.

It also checks the exact profile on the 10k test images at W8A8, W6A6, W4A4 and W3A3 (onnxruntime's top-1
against vitq's own evaluation of the same model).

Command: ``python benchmarks/deploy.py`` (models in ``runs/deploy``: the cifar10 quantize runs are made
with the commands in ``CIFAR_RUNS`` if missing; a rerun reuses finished cells of deploy.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import vitq  # noqa: E402
from vitq.data import atomic_write_bytes, build_dataset, make_loader, resolve_data  # noqa: E402
from vitq.evaluation import evaluate  # noqa: E402
from vitq.export.onnx_file import kernel_report, ort_session  # noqa: E402
from vitq.models import eval_transform  # noqa: E402
from vitq.report import versions  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = Path("runs/deploy")
Q = "vitq quantize --model cifar10_vit --data cifar10 --recipe fimaq --seed 0 --quiet"
# the cifar10_vit models of the table: run folder -> the command that makes it (one thread each)
CIFAR_RUNS = {
    "fimaq-w8a8-ort-int8": f"{Q} --w-bits 8 --a-bits 8 --target ort-int8 --iters 300",
    "fimaq-w4-ort-w4": f"{Q} --w-bits 4 --target ort-w4 --iters 500",
    "fimaq-w4a4": f"{Q} --w-bits 4 --a-bits 4 --iters 500",
}
RUN_PROFILES = {"fimaq-w8a8-ort-int8": ("int8", "int8-vnni"), "fimaq-w4-ort-w4": ("w4",), "fimaq-w4a4": ("exact",)}
PROFILE_ROWS = {"int8": "vitq-w8a8-int8", "int8-vnni": "vitq-w8a8-int8-vnni", "w4": "vitq-w4-weight-only",
                "exact": "vitq-w4a4-exact"}
EXACT_BITS = (8, 6, 4, 3)  # exact-profile check: repq calibration (log-sqrt2 softmax, LayerNorm fold)
BATCHES, THREADS = (1, 64), (1, 2)
EVAL_BATCH = 250


def save(results: dict, out: Path) -> None:
    atomic_write_bytes(out / "deploy.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    atomic_write_bytes(out / "deploy.md", lambda fh: fh.write(summarise(results).encode()))


def export_float(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The float model as ONNX (opset 21, batch dynamic), as a user would export it with torch.onnx."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=21, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
    program.save(str(path))
    return path


def ort_static(fp_path: Path, calib: torch.Tensor, out: Path, method: str, bits: int) -> Path:
    """onnxruntime's own static quantization: QDQ, per-channel weights, on ``calib`` (batches of 16)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp_path), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calib[i:i + 16].numpy()} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    types = {8: (QuantType.QInt8, QuantType.QUInt8), 4: (QuantType.QInt4, QuantType.QUInt4)}[bits]
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=types[0], activation_type=types[1],
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method])
    pre.unlink()
    return out


def ort_weight_only(fp_path: Path, out: Path, block_size: int | None) -> Path:
    """onnxruntime's own 4-bit weight-only quantizer (round to nearest, asymmetric, MatMulNBits):
    blocks of ``block_size`` along the input, or one scale per output channel (None, vitq's granularity)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # per channel only in its QDQ form (blocked int4 DequantizeLinear, which onnxruntime fuses back)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp_path)), bits=4, block_size=block_size or 128,
                                     is_symmetric=False, channel_wised_quantize=block_size is None,
                                     quant_format=QuantFormat.QDQ if block_size is None else QuantFormat.QOperator)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def ort_top1(path: Path, loader, nbits_accuracy: int = 1, level: str = "all") -> float:
    """Top-1 through onnxruntime: ``all`` optimisations (its fused integer kernels, what a user runs) or
    ``basic`` (no QDQ fusions: the graph's own arithmetic)."""
    session = ort_session(path, threads=2, nbits_accuracy=nbits_accuracy, level=level)
    correct = seen = 0
    for x, y in loader:
        logits = session.run(None, {"images": x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        seen += len(y)
    return 100.0 * correct / seen


def time_model(path: Path, image: torch.Tensor, nbits_accuracy: int = 1, budget_s: float = 2.0) -> dict:
    """Median seconds per run at each (batch, threads), after warm-up; at least 3 runs or ``budget_s``."""
    rows = {}
    for threads in THREADS:
        session = ort_session(path, threads=threads, nbits_accuracy=nbits_accuracy)
        for batch in BATCHES:
            x = np.ascontiguousarray(image.expand(batch, -1, -1, -1).numpy())
            for _ in range(2):
                session.run(None, {"images": x})
            times, start = [], time.perf_counter()
            while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 200):
                t0 = time.perf_counter()
                session.run(None, {"images": x})
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            # the 1-minute load average says whether another process shared the 2 cores meanwhile
            rows[f"b{batch}-t{threads}"] = {"seconds": med, "images_per_s": batch / med, "runs": len(times),
                                            "load_avg_1min": round(os.getloadavg()[0], 2)}
    return rows


def cifar_models(fp, calib: torch.Tensor) -> dict[str, dict]:
    """Every cifar10_vit ONNX file of the table (made if missing) with how it was made."""
    models: dict[str, dict] = {}
    fp_path = WORK / "onnx" / "cifar10_vit-fp32.onnx"
    if not fp_path.exists():
        export_float(fp, calib[:2], fp_path)
    models["ort-fp32"] = {"path": fp_path, "how": "torch.onnx.export of the float model"}
    for run, command in CIFAR_RUNS.items():
        folder = WORK / run
        if not (folder / "model" / "config.json").is_file():
            print("making", run, flush=True)
            subprocess.run(f"OMP_NUM_THREADS=1 {command} --out {folder}", shell=True, check=True)
        report = json.loads((folder / "report.json").read_text())
        for profile in RUN_PROFILES[run]:
            onnx_dir = WORK / "onnx" / f"{run}-{profile}"
            if not (onnx_dir / "model.onnx").is_file():
                vitq.export(folder, onnx_dir, "onnx", profile=profile, check_images=calib[:8])
            name = PROFILE_ROWS[profile]
            models[name] = {"path": onnx_dir / "model.onnx",
                            "how": f"{command} ; vitq export --format onnx --profile {profile}",
                            "vitq_top1": report["quant_top1"]}
            if profile == "w4":  # onnxruntime's default MatMulNBits compute: int8 activations on the fly
                models["vitq-w4-weight-only-int8compute"] = {**models[name], "nbits_accuracy": 4}
    for bits in (8, 4):
        for method in ("minmax", "percentile"):
            path = WORK / "onnx" / f"cifar10_vit-ort-static-{method}-w{bits}a{bits}.onnx"
            if not path.exists():
                ort_static(fp_path, calib, path, method, bits)
            models[f"ort-static-{method}-w{bits}a{bits}"] = {"path": path, "how": f"quantize_static {method} QDQ per-channel"}
    for label, block in (("per-channel", None), ("block32", 32)):
        path = WORK / "onnx" / f"cifar10_vit-ort-weight-only-w4-{label}.onnx"
        if not path.exists():
            ort_weight_only(fp_path, path, block)
        models[f"ort-weight-only-w4-{label}"] = {"path": path, "how": f"MatMulNBitsQuantizer RTN {label}"}
    return models


def deit_models(images: torch.Tensor) -> dict[str, dict]:
    import timm

    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    d = WORK / "onnx" / "deit_small"
    models: dict[str, dict] = {}
    fp_path = d / "fp32.onnx"
    if not fp_path.exists():
        export_float(deit, images[:2], fp_path)
    models["ort-fp32"] = {"path": fp_path}
    quantized: dict[str, torch.nn.Module] = {}
    for profile, kw in (("int8", dict(w_bits=8, a_bits=8, target="ort-int8")),
                        ("int8-vnni", dict(w_bits=8, a_bits=8, target="ort-int8")),
                        ("w4", dict(w_bits=4, target="ort-w4")), ("exact", dict(w_bits=4, a_bits=4))):
        name = PROFILE_ROWS[profile]
        out = d / name
        if not (out / "model.onnx").is_file():
            key = json.dumps(kw, sort_keys=True)  # both int8 files from one calibration
            if key not in quantized:
                quantized[key] = vitq.quantize(copy.deepcopy(deit), images, "minmax", calib_size=len(images),
                                               device="cpu", progress=False, **kw)
            vitq.export(quantized[key], out, "onnx", profile=profile, check_images=images[:2])
        models[name] = {"path": out / "model.onnx", "how": f"minmax calibration on {len(images)} ImageNet images"}
        if profile == "w4":
            models["vitq-w4-weight-only-int8compute"] = {**models[name], "nbits_accuracy": 4}
    for bits in (8, 4):
        path = d / f"ort-static-minmax-w{bits}a{bits}.onnx"
        if not path.exists():
            ort_static(fp_path, images, path, "minmax", bits)
        models[f"ort-static-minmax-w{bits}a{bits}"] = {"path": path}
    path = d / "ort-weight-only-w4-block32.onnx"
    if not path.exists():
        ort_weight_only(fp_path, path, 32)
    models["ort-weight-only-w4-block32"] = {"path": path}
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--parts", nargs="*", default=["exact", "cifar", "deit"])
    ap.add_argument("--retime", nargs="*", default=[], choices=["cifar", "deit"],
                    help="measure the timings of these parts' finished cells again (accuracy kept)")
    ap.add_argument("--imagenet-sample", type=Path, default=HERE.parents[1] / "shared/data/imagenet-sample-128.tar.gz")
    args = ap.parse_args()
    path = args.out / "deploy.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(command="python benchmarks/deploy.py", versions={**versions(), **_ort_versions()})
    fp = vitq.load_model("cifar10_vit")
    calib = vitq.calibration_images(fp, "cifar10", 128, seed=0)
    loader = make_loader(build_dataset(resolve_data("cifar10"), "eval", eval_transform(fp)), EVAL_BATCH)
    if "fp_top1" not in results:
        results["fp_top1"] = evaluate(fp, loader, progress=False)["top1"]

    if "exact" in args.parts:
        cells = results.setdefault("exact", {})
        for bits in EXACT_BITS:
            key = f"repq-w{bits}a{bits}"
            out = WORK / "onnx" / f"cifar10_vit-{key}-exact"
            if key in cells:
                if "ort_top1_basic" not in cells[key]:
                    cells[key]["ort_top1_basic"] = ort_top1(out / "model.onnx", loader, level="basic")
                    save(results, args.out)
                continue
            q = vitq.quantize(copy.deepcopy(fp), calib, "repq", w_bits=bits, a_bits=bits, device="cpu", progress=False)
            vitq.export(q, out, "onnx", check_images=calib[:8])
            cells[key] = {"vitq_top1": evaluate(q, loader, progress=False)["top1"],
                          "ort_top1": ort_top1(out / "model.onnx", loader),
                          "ort_top1_basic": ort_top1(out / "model.onnx", loader, level="basic"),
                          "file_bytes": (out / "model.onnx").stat().st_size}
            print(key, cells[key], flush=True)
            save(results, args.out)

    for part, make in (("cifar", lambda: cifar_models(fp, calib)),
                       ("deit", lambda: deit_models(_imagenet(args.imagenet_sample)))):
        if part not in args.parts:
            continue
        cells = results.setdefault(part, {})
        image = calib[:1] if part == "cifar" else None
        for name, m in make().items():
            if name in cells and part in args.retime and not cells[name].get("retimed"):
                if image is None:
                    image = _imagenet(args.imagenet_sample)[:1]
                cells[name]["timing"] = time_model(m["path"], image, nbits_accuracy=m.get("nbits_accuracy", 1))
                cells[name]["retimed"] = True  # in a later pass with nothing else on the cores
                print(part, name, "timed again", flush=True)
                save(results, args.out)
            if name in cells:
                continue
            if image is None:
                image = _imagenet(args.imagenet_sample)[:1]
            acc = m.get("nbits_accuracy", 1)
            cell = {"how": m.get("how", ""), "file_bytes": m["path"].stat().st_size,
                    "timing": time_model(m["path"], image, nbits_accuracy=acc), "nbits_accuracy": acc,
                    **{k: v for k, v in kernel_report(m["path"]).items() if k != "optimized_node_types"}}
            if part == "cifar":
                cell["ort_top1"] = ort_top1(m["path"], loader, nbits_accuracy=acc)
                if "vitq_top1" in m:
                    cell["vitq_top1"] = m["vitq_top1"]
            cells[name] = cell
            print(part, name, {k: cell[k] for k in ("file_bytes", "integer_matmul_share") if k in cell},
                  cell.get("ort_top1"), flush=True)
            save(results, args.out)
    save(results, args.out)


_IMAGES: dict[str, torch.Tensor] = {}


def _imagenet(path: Path) -> torch.Tensor:
    """32 ImageNet sample images at 224 px (calibration of the timing-only DeiT-S models)."""
    if "x" not in _IMAGES:
        import timm
        from calibration import imagenet_sample

        _IMAGES["x"] = imagenet_sample(path, timm.create_model("deit_small_patch16_224", pretrained=False))[:32]
    return _IMAGES["x"]


def _ort_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def summarise(results: dict) -> str:
    lines = ["# Deployment: vitq's ONNX profiles in onnxruntime", "", f"Command: `{results['command']}`", "",
             "CPU: this machine's 2 cores (AVX512-VNNI, AMX-INT8), onnxruntime's CPU execution provider, all graph "
             "optimisations. Latency is the median wall time of one `session.run` after two warm-up runs; "
             "ratios are FP32's latency over the model's (higher is faster), from the same run. Integer share: "
             "integer matmul/conv kernels over all matmul/conv kernels in onnxruntime's optimised graph (a node "
             "count). Top-1 on the 10,000 CIFAR-10 test images through onnxruntime.", "",
             "The first pass over `cifar10_vit` shared the cores with another benchmark, so its timings were taken "
             "again with nothing else running (`python benchmarks/deploy.py --retime cifar`; each cell's load "
             "average is in deploy.json).", "",
             "`vitq-w8a8-int8-vnni` is the file the `int8` profile made before it stored its weights as uint8 "
             "(2026-12-02): int8 weights, onnxruntime's u8s8 kernels, whose AVX2 path (CPUs without VNNI) "
             "saturates int16 pair sums and puts the logits off (benchmarks/avx2_saturation.md). The `int8` "
             "profile's uint8 weights run on the u8u8 kernels, exact on every CPU; on a VNNI CPU they were "
             "1.6-1.8x slower than int8 weights for deit_small (b1 and b16, one thread, a quick side-by-side on "
             "cores shared with a training run). A row missing below is not measured yet "
             "(`python benchmarks/deploy.py` adds it).", ""]
    fp_top1 = results.get("fp_top1")
    for part, title in (("cifar", "cifar10_vit (32 px, 2.7 M parameters)"),
                        ("deit", "deit_small_patch16_224 (224 px, random weights: timing only)")):
        cells = results.get(part)
        if not cells:
            continue
        base = cells.get("ort-fp32", {}).get("timing", {})
        keys = [f"b{b}-t{t}" for t in THREADS for b in BATCHES]
        lines += [f"## {title}", "", "| model | top-1 | MB | integer share | " +
                  " | ".join(f"{k} ms (x FP32)" for k in keys) + " |", "|---" * (4 + len(keys)) + "|"]
        for name, c in cells.items():
            top1 = f"{c['ort_top1']:.2f}" if "ort_top1" in c else "-"
            if "vitq_top1" in c:
                top1 += f" (vitq {c['vitq_top1']:.2f})"
            times = []
            for k in keys:
                t = c["timing"][k]["seconds"]
                ratio = base[k]["seconds"] / t if k in base else float("nan")
                times.append(f"{t * 1e3:.1f} ({ratio:.2f}x)")
            lines.append(f"| {name} | {top1} | {c['file_bytes'] / 1e6:.2f} | {c['integer_matmul_share']:.0%} | "
                         + " | ".join(times) + " |")
        lines += ["", "Integer kernels: " + "; ".join(
            f"{n}: {', '.join(f'{v} {k}' for k, v in c['integer_kernels'].items()) or 'none'}"
            for n, c in cells.items()), ""]
    exact = results.get("exact")
    if exact:
        lines += ["## Exact profile on the 10k test images (repq calibration)", "",
                  (f"FP32 top-1 {fp_top1:.2f}. " if fp_top1 else "") + "onnxruntime with all its optimisations "
                  "(fused integer kernels, which requantize in their own order of float operations) and with basic "
                  "ones only (the graph's own arithmetic).", "",
                  "| model | vitq top-1 | onnxruntime top-1 | difference | onnxruntime, basic | difference | MB |",
                  "|---|---|---|---|---|---|---|"]
        for k, c in exact.items():
            basic = c.get("ort_top1_basic")
            b_txt = f"{basic:.2f} | {basic - c['vitq_top1']:+.2f}" if basic is not None else "- | -"
            lines.append(f"| {k} | {c['vitq_top1']:.2f} | {c['ort_top1']:.2f} | {c['ort_top1'] - c['vitq_top1']:+.2f} | "
                         f"{b_txt} | {c['file_bytes'] / 1e6:.2f} |")
    lines += ["", f"Versions: {results.get('versions')}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
