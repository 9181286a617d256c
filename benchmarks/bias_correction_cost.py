"""What bias correction costs the `mse` calibration: the same calibration with and without it, alternated
in one process (one thread), so both see the same machine.

Reproduce:

    python benchmarks/bias_correction_cost.py            # -> bias_correction_cost.json / .md

`cifar10_vit` at W4A4 on seed 0's 128 calibration images, ``--repeats`` pairs (off, on); the ratio is
the mean of the on / off seconds over the pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitq  # noqa: E402
from vitq.data import atomic_write_bytes  # noqa: E402
from vitq.report import machine, versions  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = "python benchmarks/bias_correction_cost.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fp = vitq.load_model("cifar10_vit")
    calib = vitq.calibration_images(fp, "cifar10", 128, seed=0)
    runs: list[dict] = []
    for rep in range(args.repeats):
        for on in (False, True):
            model = copy.deepcopy(fp)
            t0 = time.perf_counter()
            vitq.quantize(model, calib, "mse", w_bits=args.bits, a_bits=args.bits, seed=0, calib_size=128,
                          device="cpu", progress=False, calibration={"bias_correction": on})
            runs.append({"repeat": rep, "bias_correction": on, "seconds": time.perf_counter() - t0})
            print(runs[-1], flush=True)
    off = [r["seconds"] for r in runs if not r["bias_correction"]]
    on = [r["seconds"] for r in runs if r["bias_correction"]]
    ratio = statistics.mean(b / a for a, b in zip(off, on))
    results = {"command": COMMAND, "bits": args.bits, "runs": runs, "ratio_on_over_off": ratio,
               "machine": machine(), "versions": versions()}
    atomic_write_bytes(args.out / "bias_correction_cost.json", lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    lines = ["# What bias correction costs the `mse` calibration", "", f"Command: `{COMMAND}`", "",
             f"`cifar10_vit`, W{args.bits}A{args.bits}, seed 0's 128 calibration images, one thread, the two settings "
             "alternated in one process (another single-threaded benchmark ran on the other core).", "",
             "| pair | without (s) | with (s) | ratio |", "|---|---|---|---|"]
    lines += [f"| {i} | {a:.1f} | {b:.1f} | {b / a:.2f} |" for i, (a, b) in enumerate(zip(off, on))]
    lines += ["", f"Mean ratio with / without: **{ratio:.2f}**. With bias correction the search's coordinate descent "
              "can stop at another round (its choices differ), so the ratio is not only the correction's own pass.", "",
              f"Machine: {results['machine']}", "", f"Versions: {results['versions']}", ""]
    atomic_write_bytes(args.out / "bias_correction_cost.md", lambda fh: fh.write("\n".join(lines).encode()))


if __name__ == "__main__":
    main()
