"""Which quantizers carry a reference model's error after calibration: each group back to float.

    python benchmarks/error_sources.py [--model cifar10_vit] [--bits 4 3] [--softmax uniform log2 logsqrt2]

`mse` calibration with rotated linear inputs (the subsampled search of benchmarks/beyond.py, seed 0),
then every group of quantizers (one role of one slot across the blocks: ``attn.qkv.w`` the qkv
weights, ``attn.matmul2.a`` the post-softmax attention, ...) switched back to float in turn, and
the model scored against the float model on every 5th of beyond.py's held-out training images
(1,000): KL(float || quantized) and top-1 agreement. The softmax-quantizer rows calibrate again
with that post-softmax grid. Sections are cifar10_vit's unless their title names another model.
Writes error_sources.json / .md beside this script; resumes per row.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import beyond  # noqa: E402  (benchmarks/)
import vitq  # noqa: E402
from vitq.data import ArrayImageDataset, atomic_write_bytes, load_cifar10  # noqa: E402
from vitq.models import eval_transform  # noqa: E402
from vitq.qmodules import QuantModule  # noqa: E402
from vitq.report import machine, versions  # noqa: E402

BATCH = 200


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + BATCH]) for i in range(0, len(x), BATCH)])


def score(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, fp: torch.Tensor) -> dict:
    """KL(float || quantized) and top-1 agreement with the float model (beyond.py's paired scores)."""
    got = beyond.scores(logits(model, x), labels, fp)
    return {"kl": got["kl"], "agree": got["agree"]}


def quantizer_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, str]]]:
    """Role (the module's name inside its block) + slot initial -> the (module, slot) pairs."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            role = re.sub(r"^.*blocks\.\d+\.", "", name)
            for slot in ("w_quantizer", "a_quantizer", "b_quantizer"):
                if getattr(mod, slot, None) is not None:
                    groups.setdefault(f"{role}.{slot[0]}", []).append((name, slot))
    return groups


def without(model: torch.nn.Module, pairs: list[tuple[str, str]]) -> torch.nn.Module:
    m = copy.deepcopy(model)
    for name, slot in pairs:
        setattr(m.get_submodule(name), slot, None)  # a quant module with no quantizer passes its input on
    return m


def summarise(r: dict) -> str:
    lines = ["# Where the quantization error sits (calibration only)", "",
             "Commands: " + ", ".join(f"`{c}`" for c in r["commands"]), "", __doc__.split("\n\n", 2)[2].strip(), ""]
    for key, rows in r["runs"].items():
        lines += [f"## {key}", "", "| float again | KL | agree % |", "|---|---|---|"]
        lines += [f"| {k} | {v['kl']:.4f} | {v['agree']:.2f} |" for k, v in rows.items()]
        lines.append("")
    if r.get("notes"):  # what the numbers mean, written after the run (kept in the JSON)
        lines += ["## Reading the numbers", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += [f"Machine: {r['machine']['cpu']}. Versions: {r['versions']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10_vit", choices=beyond.MODELS)
    ap.add_argument("--bits", nargs="*", type=int, default=[4, 3])
    ap.add_argument("--softmax", nargs="*", default=["uniform", "log2", "logsqrt2"])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = args.out / "error_sources.json"
    r = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    command = "python benchmarks/error_sources.py" + "".join(
        f" --{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k != "out" and v != ap.get_default(k))
    commands = r.setdefault("commands", [])
    if command not in commands:
        commands.append(command)
    r.update(versions=versions(), machine=machine())

    def save() -> None:
        atomic_write_bytes(path, lambda fh: fh.write(json.dumps(r, indent=2).encode()))
        atomic_write_bytes(args.out / "error_sources.md", lambda fh: fh.write(summarise(r).encode()))

    fp_model = vitq.load_model(args.model).eval()
    images, labels = load_cifar10("train")
    idx = beyond.heldout_indices(len(images), 1024)[::5]
    data = ArrayImageDataset(images[idx], labels[idx], eval_transform(fp_model))
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.as_tensor(labels[idx])
    fp = logits(fp_model, x)
    pool = vitq.calibration_images(fp_model, "cifar10", 128, seed=0)
    for bits in args.bits:
        for softmax in args.softmax:
            key = f"W{bits}A{bits}, {softmax} post-softmax"
            if args.model != "cifar10_vit":  # the first sections, cifar10_vit's, keep their names
                key = f"{args.model}: {key}"
            rows = r["runs"].setdefault(key, {})
            if key in r.setdefault("complete", []):
                continue
            recipe = vitq.get_recipe("mse", w_bits=bits, a_bits=bits, seed=0, calib_size=128,
                                     calibration=beyond.CALIB_SEARCH, rotation="hadamard", softmax_quantizer=softmax)
            q = vitq.quantize(copy.deepcopy(fp_model), pool, recipe, device="cpu", progress=False)
            groups = quantizer_groups(q)
            # the per-group rows for the default grid only; the other grids, the whole model
            wanted = ["none"] + (["weights", "activations"] + list(groups) if softmax == "uniform" else [])
            for w in wanted:
                if w in rows:
                    continue
                if w == "none":
                    pairs = []
                elif w == "weights":
                    pairs = [p for k, v in groups.items() if k.endswith(".w") for p in v]
                elif w == "activations":
                    pairs = [p for k, v in groups.items() if not k.endswith(".w") for p in v]
                else:
                    pairs = groups[w]
                rows[w] = score(without(q, pairs), x, y, fp)
                save()
                print(key, w, rows[w], flush=True)
            r["complete"].append(key)
            save()
    save()


if __name__ == "__main__":
    main()
