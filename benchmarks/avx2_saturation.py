"""Why the ``int8`` ONNX profile stores uint8 weights: onnxruntime's u8s8 GEMM on AVX2-only CPUs, emulated.

On x86 CPUs without VNNI / AMX-INT8, onnxruntime's u8s8 integer GEMM (uint8 activations x int8
weights) multiplies with AVX2's ``vpmaddubsw``, which adds the products of adjacent byte pairs
(k, k+1) in *saturating* int16 before widening to int32: 255 * 127 * 2 = 64770 > 32767, so a pair of
large activation codes against large weight codes is clipped. Its u8u8 GEMM widens both operands to
16 bits first and is exact. The ``int8`` profile therefore stores weights as uint8 (u8u8 kernels,
exact everywhere); ``int8-vnni`` keeps int8 weights (u8s8 kernels, faster on CPUs with VNNI, where
the dot-product instruction accumulates in int32).

This script runs on any CPU: it replaces every quantized Linear of a W8A8 ``--target ort-int8``
``cifar10_vit`` by the two kernels' integer arithmetic on exactly the codes each profile's file
stores (vitq's own storage rule), with the zero-point corrections done as onnxruntime does (row and
column sums, exact), and compares the logits with vitq's fake-quant model on a strided sample of the
CIFAR-10 test images. (The attention matmuls are uint8 x uint8 in both profiles, so they are left as
they are.) On an AVX2-only AMD EPYC the int8-vnni file's logits were measured wrong (median
per-image max abs difference 0.0196 on the test suite's tiny model, whose logits reach 0.196); this emulation, run once on that
model (not part of this script), gave 0.01955.

Command: ``python benchmarks/avx2_saturation.py --out benchmarks`` -> avx2_saturation.md/json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitq  # noqa: E402
from vitq.data import atomic_write_bytes, build_dataset, resolve_data  # noqa: E402
from vitq.export.onnx_plans import _weight_storage  # noqa: E402
from vitq.models import eval_transform  # noqa: E402
from vitq.qmodules import QuantLinear  # noqa: E402
from vitq.report import machine, versions  # noqa: E402

INT16 = (-32768, 32767)


def pair_saturating_gemm(a: torch.Tensor, b: torch.Tensor, saturate: bool) -> torch.Tensor:
    """``a @ b`` for integer codes a (M, K) and b (K, N), adjacent k pairs summed in int16 if ``saturate``."""
    if a.shape[1] % 2:  # kernels pad K with zeros
        a, b = torch.nn.functional.pad(a, (0, 1)), torch.nn.functional.pad(b, (0, 0, 0, 1))
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64)
    for k in range(0, a.shape[1], 2):
        pair = a[:, k, None] * b[None, k] + a[:, k + 1, None] * b[None, k + 1]
        acc += pair.clamp(*INT16) if saturate else pair
    return acc


def integer_linear(module: QuantLinear, x: torch.Tensor, profile: str, saturate: bool) -> torch.Tensor:
    """The Linear as onnxruntime's integer GEMM computes it from the ``profile`` file's stored codes."""
    aq, wq = module.a_quantizer, module.w_quantizer
    av, wv = aq.integer_view(), wq.integer_view()
    za, sa = int(av.zero_point.reshape(-1)[0]), float(av.scale.reshape(-1)[0])
    codes = wq.codes(module.weight.detach()).long().numpy()
    _, stored, zw = _weight_storage(codes, wv.zero_point.reshape(-1).long().numpy(), wv, profile)
    b, zb = torch.from_numpy(stored).long().T, torch.from_numpy(zw).long().reshape(1, -1)  # (K, N), (1, N)
    a = aq.codes(x).long().reshape(-1, x.shape[-1])                                        # (M, K) in 0..255
    raw = pair_saturating_gemm(a, b, saturate)
    k = a.shape[1]
    exact = raw - za * b.sum(0, keepdim=True) - a.sum(1, keepdim=True) * zb + k * za * zb
    y = exact.double() * sa * wv.scale.reshape(1, -1).double()
    y = y.float().reshape(*x.shape[:-1], -1)
    return y + module.bias if module.bias is not None else y


def emulated_logits(model: torch.nn.Module, images: torch.Tensor, profile: str, saturate: bool) -> torch.Tensor:
    hooks = [m.register_forward_hook(lambda mod, inp, out: integer_linear(mod, inp[0], profile, saturate))
             for _, m in model.named_modules() if isinstance(m, QuantLinear) and m.a_quantizer is not None]
    try:
        with torch.no_grad():
            return torch.cat([model(images[i:i + 50]) for i in range(0, len(images), 50)])
    finally:
        for h in hooks:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--images", type=int, default=500, help="test images, every (10000 / N)-th")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fp = vitq.load_model("cifar10_vit")
    calib = vitq.calibration_images(fp, "cifar10", 128, seed=0)
    q = vitq.quantize(copy.deepcopy(fp), calib, "minmax", w_bits=8, a_bits=8, target="ort-int8", device="cpu",
                      progress=False)
    test = build_dataset(resolve_data("cifar10"), "eval", eval_transform(fp))
    idx = range(0, len(test), len(test) // args.images)
    images = torch.stack([test[i][0] for i in idx])
    labels = torch.tensor([test[i][1] for i in idx])
    with torch.no_grad():
        ref = torch.cat([q(images[i:i + 50]) for i in range(0, len(images), 50)])
    rows = {}
    for name, profile, saturate in (("int8 file (uint8 weights), u8u8 kernel", "int8", False),
                                    ("int8-vnni file (int8 weights), VNNI u8s8 kernel (int32 sums)", "int8-vnni", False),
                                    ("int8-vnni file (int8 weights), AVX2 u8s8 kernel (int16 pair sums)", "int8-vnni", True)):
        got = emulated_logits(q, images, profile, saturate)
        per_image = (got - ref).abs().amax(1)
        if not rows:
            exact = got  # exact integer arithmetic: what the other rows' kernel effect is measured against
        rows[name] = {"profile": profile, "saturating_pairs": saturate,
                      "median_max_abs_diff_vs_exact_integer": float((got - exact).abs().amax(1).median()),
                      "same_top1_as_exact_integer": float((got.argmax(1) == exact.argmax(1)).float().mean()),
                      "median_max_abs_logit_diff": float(per_image.median()),
                      "max_abs_logit_diff": float(per_image.max()), "max_abs_logit": float(ref.abs().max()),
                      "same_top1": float((got.argmax(1) == ref.argmax(1)).float().mean()),
                      "top1": float((got.argmax(1) == labels).float().mean() * 100)}
        print(name, rows[name], flush=True)
    results = {"command": "python benchmarks/avx2_saturation.py --out benchmarks", "versions": versions(), "machine": machine(),
               "model": "cifar10_vit, minmax W8A8 --target ort-int8, 128 calibration images (seed 0)",
               "images": len(images), "vitq_top1": float((ref.argmax(1) == labels).float().mean() * 100),
               "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(args.out / "avx2_saturation.json", lambda fh: fh.write(json.dumps(results, indent=1).encode()))
    lines = ["# Integer GEMM kernels on the int8 profiles' stored codes, emulated", "",
             f"Command: `{results['command']}` ({results['seconds']} s). {results['model']}; "
             f"{results['images']} CIFAR-10 test images (every {len(test) // args.images}th); vitq's fake-quant "
             f"top-1 on them {results['vitq_top1']:.2f}. Every quantized Linear computed as the kernel does on the "
             "file's codes; differences are against vitq's fake-quant logits.", "",
             "| file and kernel | vs fake-quant: median per-image max abs logit diff | max | same top-1 | "
             "vs exact integer GEMM: median diff | same top-1 | top-1 |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['median_max_abs_logit_diff']:.2e} | {r['max_abs_logit_diff']:.2e} | "
                     f"{100 * r['same_top1']:.1f}% | {r['median_max_abs_diff_vs_exact_integer']:.2e} | "
                     f"{100 * r['same_top1_as_exact_integer']:.1f}% | {r['top1']:.2f} |")
    lines += ["", f"Largest logit magnitude: {ref.abs().max():.2f}. The first two rows are the same integers by "
              "construction (int32 accumulation of the same products); their small difference from the fake-quant "
              "model is float rounding (the float model adds dequantized products) moving 8-bit activation codes "
              "downstream, which onnxruntime's kernels do too.", ""]
    atomic_write_bytes(args.out / "avx2_saturation.md", lambda fh: fh.write("\n".join(lines).encode()))


if __name__ == "__main__":
    main()
