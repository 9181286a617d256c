"""How much of calibration's subset-to-subset spread is the test set's noise? (issue 11)

``mse`` calibration of ``cifar10_vit`` on two calibration subsets (seeds 0 and 1) of 128 and of
1,024 training images. For each pair: both top-1s on the 10,000 test images, the share of test
images on which the two models disagree, and the share on which exactly one of them is right.
When two models are equally good, their top-1 difference is a sum over those images only: its
standard deviation is ``sqrt(one_right / N)``, and a max - min over 5 such models has an expected
value of about ``2.33 * sqrt(one_right / (2 N))`` (the range of 5 normal draws). Then the same
swap per part: model A with B's matmul quantizers (q @ k^T, attn @ v), and B with A's.

Reproduce:

    python benchmarks/calib_agreement.py --out benchmarks

Each calibrated model is cached in ``--work`` as soon as it is done (a stopped run resumes); the
JSON and markdown are written after every cell.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitq  # noqa: E402
from vitq.data import atomic_write_bytes, build_dataset, make_loader, resolve_data  # noqa: E402
from vitq.models import eval_transform  # noqa: E402
from vitq.qmodules import QuantMatMul, QuantMode, quant_modules, set_mode  # noqa: E402
from vitq.report import versions  # noqa: E402

RANGE_OF_5 = 2.326  # expected max - min of 5 standard normal draws


def calibrated_state(fp: torch.nn.Module, n: int, seed: int, bits: int, work: Path) -> tuple[dict, float]:
    """The state dict of ``mse`` calibrated on ``n`` training images drawn with ``seed`` (cached)."""
    path = work / f"mse-w{bits}a{bits}-n{n}-s{seed}.pt"
    if path.is_file():
        saved = torch.load(path)
        return saved["state"], saved["seconds"]
    # without bias correction, as measured (the mse recipe's default since)
    recipe = vitq.get_recipe("mse", w_bits=bits, a_bits=bits, seed=seed, calib_size=n,
                             calibration={"bias_correction": False})
    pool = vitq.calibration_images(fp, "cifar10", n, seed=seed)
    model = copy.deepcopy(fp)
    t0 = time.perf_counter()
    vitq.quantize_with_summary(model, pool, recipe, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda fh: torch.save({"state": model.state_dict(), "seconds": seconds}, fh))
    return model.state_dict(), seconds


@torch.no_grad()
def predict(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 classes, labels) of ``model`` as it is over ``loader``."""
    model.eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def predictions(model: torch.nn.Module, state: dict, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.load_state_dict(state)
    set_mode(model, QuantMode.QUANT)
    return predict(model, loader)


def pair_stats(pa: torch.Tensor, pb: torch.Tensor, y: torch.Tensor) -> dict:
    n = len(y)
    one_right = ((pa == y) != (pb == y)).float().mean().item()
    return {"top1_a": 100 * (pa == y).float().mean().item(), "top1_b": 100 * (pb == y).float().mean().item(),
            "disagree_pct": 100 * (pa != pb).float().mean().item(), "one_right_pct": 100 * one_right,
            "noise_sd_of_difference": 100 * math.sqrt(one_right / n),
            "expected_noise_spread_of_5": 100 * RANGE_OF_5 * math.sqrt(one_right / (2 * n))}


def write_outputs(out: Path, results: dict) -> None:
    atomic_write_bytes(out / "calib_agreement.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    lines = ["# Calibration: how much of the subset spread is test-set noise", "",
             f"Command: `{results['command']}`", "",
             "`mse` calibration of `cifar10_vit` on two calibration subsets (seeds 0 and 1) drawn from the training "
             "split, evaluated on the 10,000 test images. *One right* is the share of test images on which exactly "
             "one of the two models is right: for two equally good models the top-1 difference is a sum over those "
             "images alone, with standard deviation sqrt(one right / N), and the max - min of 5 such models is "
             "expected near 2.33 sqrt(one right / 2N). The swap rows put one part of model B into model A.", "",
             "| bits | images | top-1 A (s0) | top-1 B (s1) | disagree % | one right % | noise sd of A - B | "
             "expected noise spread of 5 | calib s (A) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(results["pairs"].items()):
        lines.append(f"| W{r['bits']}A{r['bits']} | {r['images']} | {r['top1_a']:.2f} | {r['top1_b']:.2f} | "
                     f"{r['disagree_pct']:.2f} | {r['one_right_pct']:.2f} | {r['noise_sd_of_difference']:.2f} | "
                     f"{r['expected_noise_spread_of_5']:.2f} | {r['seconds_a']:.0f} |")
    swaps = [(k, r) for k, r in sorted(results["pairs"].items()) if "swap" in r]
    if swaps:
        lines += ["", "| bits | images | model | top-1 | disagree % with A | disagree % with B |", "|---|---|---|---|---|---|"]
        for _, r in swaps:
            for name, s in r["swap"].items():
                lines.append(f"| W{r['bits']}A{r['bits']} | {r['images']} | {name} | {s['top1']:.2f} | "
                             f"{s['disagree_a']:.2f} | {s['disagree_b']:.2f} |")
    lines += ["", f"Versions: {results['versions']}; {results['threads']} thread(s).", ""]
    atomic_write_bytes(out / "calib_agreement.md", lambda fh: fh.write("\n".join(lines).encode()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_calib_agreement"))
    ap.add_argument("--bits", nargs="*", type=int, default=[3])
    ap.add_argument("--images", nargs="*", type=int, default=[128, 1024])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_json = args.out / "calib_agreement.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"pairs": {}}
    results.update(command="python benchmarks/calib_agreement.py --out benchmarks", versions=versions(),
                   threads=torch.get_num_threads())
    fp = vitq.load_model("cifar10_vit")
    loader = make_loader(build_dataset(resolve_data("cifar10"), "eval", eval_transform(fp)), 100)
    for bits in args.bits:
        # a model with the quantizers' shapes (token-wise scales follow the input) to load states into
        shell = copy.deepcopy(fp)
        small = vitq.calibration_images(fp, "cifar10", 8, seed=0)
        vitq.quantize_with_summary(shell, small, vitq.get_recipe("mse", w_bits=bits, a_bits=bits, calib_size=8),
                                   device="cpu", progress=False)
        matmul = [name for name, m in quant_modules(shell) if isinstance(m, QuantMatMul)]
        for n in args.images:
            (sa, ta), (sb, _) = (calibrated_state(fp, n, s, bits, args.work) for s in (0, 1))
            (pa, y), (pb, _) = predictions(shell, sa, loader), predictions(shell, sb, loader)
            row = {"bits": bits, "images": n, "seconds_a": ta, **pair_stats(pa, pb, y), "swap": {}}

            def is_matmul(key: str) -> bool:
                return any(key.startswith(name + ".") for name in matmul)

            for name, base, donor in (("A with B's matmul quantizers", sa, sb),
                                      ("B with A's matmul quantizers", sb, sa)):
                mixed = {k: (donor[k] if is_matmul(k) else v) for k, v in base.items()}
                p, _ = predictions(shell, mixed, loader)
                row["swap"][name] = {"top1": 100 * (p == y).float().mean().item(),
                                     "disagree_a": 100 * (p != pa).float().mean().item(),
                                     "disagree_b": 100 * (p != pb).float().mean().item()}
            results["pairs"][f"w{bits}-n{n}"] = row
            write_outputs(args.out, results)
            print(f"W{bits}A{bits} {n} images: {row['top1_a']:.2f} / {row['top1_b']:.2f}, "
                  f"disagree {row['disagree_pct']:.2f}%", flush=True)


if __name__ == "__main__":
    main()
