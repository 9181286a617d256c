"""AIQViT ablation on the reference model, its combinations with FIMA-Q, and the LRC overhead.

Cells (each: quantize ``cifar10_vit`` from scratch with the recipe, top-1 on the 10,000 test images):

* ``ablation`` (W3A3, seed 0): AIQViT's base and one component at a time on top of it, then all
  of them; the ``aiqvit`` preset; the combinations ``fimaq+dfq``, ``fimaq+lrc``, ``fimaq+aiq``.
  The base is the ``aiqvit`` preset with DFQ, low-rank compensation and the curriculum off and
  the activation scales learned (aiqvit.md §5: RepQ-ViT calibration, block reconstruction of the
  quantizer parameters with the MSE loss on the quantized-prefix input, no AdaRound); without
  DFQ its post-softmax quantizer is the plain uniform one. The ``aiqvit`` preset itself freezes
  the activation scales (only the low-rank factors and the DFQ bounds are trained).
* ``w4`` (W4A4, seed 0): the same variants, the presets first.
* ``seeds`` (W3A3, seeds 1 and 2): ``aiqvit`` and ``fimaq+aiq``.
* ``overhead``: inference overhead of the two LRC forms with the ranks the searched cell chose
  (merged: none, folded into the weights; side branch: extra parameters, weight bits, FLOPs
  and the measured CPU latency of the fake-quantized model with and without the branches).

``mse`` (calibration only) and ``fimaq`` come from ``fimaq.json`` (same budget, same seeds), so
run ``benchmarks/fimaq.py`` first. Budget: ``--iters`` fine-tuning iterations per block (default
500, the same for every recipe), 1024 optimisation and 128 calibration images, batch 32, and for
the rank search ``--search-iters`` (default 150: aiqvit.md's 300 search per 1000 fine-tuning
iterations, scaled to 500) of which the first quarter trains only the factors. Results are
written after every cell to ``aiqvit.json`` / ``aiqvit.md``; a rerun skips finished cells and a
killed cell resumes from its last finished block (``--work``).

Reproduce:

    python benchmarks/aiqvit.py --iters 500 --groups ablation w4 seeds overhead
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
from vitq.api import images_needed  # noqa: E402
from vitq.data import build_dataset, make_loader, resolve_data  # noqa: E402
from vitq.evaluation import evaluate  # noqa: E402
from vitq.models import eval_transform  # noqa: E402
from vitq.qmodules import quant_modules  # noqa: E402
from vitq.report import stage, versions  # noqa: E402
from sweep import open_results, save_results  # noqa: E402  (benchmarks/, the script's own folder)

# base: the aiqvit preset with its three components off and the activation scales learned
# (overrides as get_recipe takes them: top-level fields, nested configs as dicts of their fields)
LEARN_SCALES = {"reconstruction": {"learn_act_scales": True}}
BASE = {"softmax_quantizer": "uniform", "aiq": {"lrc": False, "curriculum": False}, **LEARN_SCALES}
VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("aiqvit", BASE),
    "base + LRC fixed r=20": ("aiqvit", {**BASE, "aiq": {"curriculum": False, "rank_policy": "fixed"}}),
    "base + LRC searched": ("aiqvit", {**BASE, "aiq": {"curriculum": False}}),
    "base + DFQ": ("aiqvit", {**BASE, "softmax_quantizer": "dfq"}),
    "base + curriculum": ("aiqvit", {**BASE, "aiq": {"lrc": False}}),
    "base + all three": ("aiqvit", LEARN_SCALES),
    "aiqvit": ("aiqvit", {}),
    "fimaq+dfq": ("fimaq+dfq", {}),
    # fimaq's own post-softmax quantizer is per head; this separates DFQ's interval from its granularity
    "fimaq+dfq per head": ("fimaq+dfq", {"softmax_options": {"granularity": "head"}}),
    "fimaq+lrc": ("fimaq+lrc", {}),
    "fimaq+aiq": ("fimaq+aiq", {}),
}
# W4A4: the same variants, the presets first, then the components cheapest first
W4_ORDER = ("aiqvit", "base", "fimaq+aiq", "base + LRC fixed r=20", "base + DFQ", "base + curriculum",
            "base + LRC searched", "base + all three", "fimaq+lrc", "fimaq+dfq per head", "fimaq+dfq")
# W3A3 cells in the order that answers the most first (the done-when cell leads)
ABLATION = ("aiqvit", "base", "base + LRC searched", "base + DFQ", "fimaq+aiq", "base + LRC fixed r=20",
            "base + curriculum", "base + all three", "fimaq+dfq", "fimaq+lrc", "fimaq+dfq per head")
TOKENS = 65  # cifar10_vit: 8 x 8 patches + the class token


def cells(groups: list[str], iters: int) -> list[dict]:
    out = []
    if "ablation" in groups:
        out += [dict(variant=v, bits=3, seed=0, iters=iters) for v in ABLATION]
    if "w4" in groups:
        out += [dict(variant=v, bits=4, seed=0, iters=iters) for v in W4_ORDER]
    if "seeds" in groups:
        # the cheap preset over both seeds first, then the combination
        out += [dict(variant=v, bits=3, seed=s, iters=iters) for v in ("aiqvit", "fimaq+aiq") for s in (1, 2)]
    return out


def cell_key(c: dict) -> str:
    return f"{c['variant']}|w{c['bits']}a{c['bits']}|s{c['seed']}|i{c['iters']}"


def cell_recipe(c: dict, search_iters: int) -> vitq.Recipe:
    name, overrides = VARIANTS[c["variant"]]
    overrides = dict(overrides)
    recon = {"iters": c["iters"], **overrides.pop("reconstruction", {})}
    # fimaq+dfq has no AIQViT stage (DFQ is a quantizer choice), so no rank search to size
    aiq = overrides.pop("aiq", {})
    if vitq.get_recipe(name).aiq is not None:
        aiq = {"search_iters": search_iters, **aiq}
    return vitq.get_recipe(name, w_bits=c["bits"], a_bits=c["bits"], seed=c["seed"], reconstruction=recon,
                           aiq=aiq or None, **overrides)


def run_cell(c: dict, recipe: vitq.Recipe, fp_model, loader, work: Path) -> dict:
    model = copy.deepcopy(fp_model)
    images = vitq.calibration_images(fp_model, "cifar10", images_needed(recipe), seed=c["seed"])
    stages: dict = {}
    safe = cell_key(c).replace("|", "_").replace(" ", "").replace("+", "plus").replace("=", "")
    with stage(stages, "quantize"):
        result = vitq.quantize_with_summary(model, images, recipe, device="cpu", progress=False, work_dir=work / safe)
    res = evaluate(model, loader, progress=False)
    blocks = result.reconstruction["blocks"]
    ranks = {k: v for b in blocks for k, v in b.get("lrc_ranks", {}).items()}
    return {**c, "recipe": recipe.name, "top1": res["top1"], "top5": res["top5"],
            "seconds": stages["quantize"]["seconds"], "peak_mem_mb": stages["quantize"]["peak_mem_mb"],
            "block_seconds": {b["block"]: b["seconds"] for b in blocks},
            "search_seconds": sum(b.get("lrc_search_seconds", 0.0) for b in blocks), "lrc_ranks": ranks}


@torch.no_grad()
def lrc_overhead(fp_model, ranks: dict[str, int], repeats: int = 20) -> dict:
    """Side-branch overhead for ``ranks`` (layer -> rank): parameters, bits and FLOPs from
    :func:`vitq.methods.aiqvit.lowrank_overhead`, and the CPU latency of a batch of 64 with and without the
    branches (fake-quantized W3A3 ``mse`` model; the ratio is what matters)."""
    from vitq.methods.aiqvit import attach_lowrank, lowrank_overhead

    model = copy.deepcopy(fp_model)
    vitq.quantize(model, vitq.calibration_images(fp_model, "cifar10", 128, seed=0), "minmax", w_bits=3, a_bits=3,
                  device="cpu", progress=False)
    base_params = sum(m.weight.numel() for _, m in quant_modules(model) if hasattr(m, "weight"))
    rows = {"merged": {"params": 0, "flops": 0, "weight_bits": 0}}
    for label, factor_bits in (("side, FP16 factors", None), ("side, int8 factors", 8)):
        tot = {"params": 0, "flops": 0, "weight_bits": 0}
        for name, r in ranks.items():
            d_out, d_in = model.get_submodule(name).weight.shape
            for k, v in lowrank_overhead(d_in, d_out, r, TOKENS, factor_bits, "side").items():
                tot[k] += v
        rows[label] = tot
    x = torch.randn(64, 3, 32, 32)

    def latency(m) -> float:
        m(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            m(x)
        return (time.perf_counter() - t0) / repeats

    plain = latency(model)
    for name, r in ranks.items():
        if r > 0:
            attach_lowrank(model.get_submodule(name), "side", rank=r)
    side = latency(model)
    return {"ranks": ranks, "quantized_weight_params": base_params, "quantized_weight_bits": 3 * base_params,
            "rows": rows, "latency_ratio_side": side / plain, "latency_plain_ms": plain * 1e3,
            "latency_side_ms": side * 1e3}


def summarise(results: dict, fimaq: dict) -> str:
    rows, iters = results["cells"], results["iters"]
    fp = results.get("fp_top1", float("nan"))
    fcells = fimaq.get("cells", {})

    def fimaq_cell(recipe: str, bits: int, seed: int) -> dict | None:
        return fcells.get(f"{recipe}-w{bits}a{bits}-s{seed}-i{iters}")

    def get(variant: str, bits: int, seed: int = 0) -> dict | None:
        if variant in ("mse", "repq", "qdrop", "fimaq"):
            return fimaq_cell(variant, bits, seed)
        return rows.get(cell_key(dict(variant=variant, bits=bits, seed=seed, iters=iters)))

    lines = ["# AIQViT on the reference model", "", f"Command: `{results['command']}`", "",
             f"`cifar10_vit`, FP top-1 **{fp:.2f}%** on the 10,000 CIFAR-10 test images. Budget for every recipe: "
             f"{iters} fine-tuning iterations per block, 1024 optimisation and 128 calibration images from the "
             f"training split, batch 32; the rank search adds {results['search_iters']} iterations per block (the "
             "first quarter trains only the factors). `mse`, `repq`, `qdrop` and `fimaq` are from "
             "`fimaq.json` (same budget). Seconds and peak memory cover the whole quantization.", "",
             "## Ablation (seed 0)", "", "| variant | W3A3 top-1 | W4A4 top-1 | W3A3 s | search s | peak MB |",
             "|---|---|---|---|---|---|"]
    for v in ("mse", "repq", "qdrop", "fimaq") + tuple(VARIANTS):
        c3, c4 = get(v, 3), get(v, 4)
        if not (c3 or c4):
            continue
        f = lambda c, k, fmt: fmt.format(c[k]) if c and k in c else "-"  # noqa: E731
        lines.append(f"| {v} | {f(c3, 'top1', '{:.2f}')} | {f(c4, 'top1', '{:.2f}')} | {f(c3, 'seconds', '{:.0f}')} "
                     f"| {f(c3, 'search_seconds', '{:.0f}')} | {f(c3, 'peak_mem_mb', '{:.0f}')} |")
    lines += ["", "## W3A3 over seeds 0, 1, 2", "", "| recipe | mean | std | runs |", "|---|---|---|---|"]
    for v in ("mse", "fimaq", "aiqvit", "fimaq+aiq"):
        accs = [c["top1"] for c in (get(v, 3, s) for s in (0, 1, 2)) if c]
        if accs:
            sd = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
            lines.append(f"| {v} | {statistics.mean(accs):.2f} | {sd} | {len(accs)} |")
    searched = get("base + LRC searched", 3)
    if searched and searched.get("lrc_ranks"):
        roles = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        by_block: dict[str, dict[str, int]] = {}
        for layer, rank in searched["lrc_ranks"].items():
            block, _, role = layer.partition(".")[2].partition(".")
            by_block.setdefault(f"blocks.{block}", {})[role] = rank
        lines += ["", "## Ranks chosen by the search (base + LRC searched, W3A3)", "",
                  "| block | " + " | ".join(roles) + " |", "|---" * (len(roles) + 1) + "|"]
        lines += [f"| {b} | " + " | ".join(str(r.get(role, "-")) for role in roles) + " |" for b, r in by_block.items()]
    ov = results.get("overhead")
    if ov:
        wb = ov["quantized_weight_bits"]
        lines += ["", "## Inference overhead of the two LRC forms (searched ranks)", "",
                  f"Relative to the {ov['quantized_weight_params'] / 1e6:.2f} M quantized weights at 3 bits; FLOPs "
                  f"per image ({TOKENS} tokens). Side-branch latency measured on this CPU (batch 64, fake-quant "
                  f"model): {ov['latency_plain_ms']:.1f} ms without, {ov['latency_side_ms']:.1f} ms with the branches "
                  f"(**{ov['latency_ratio_side']:.2f}x**).", "",
                  "| form | extra params | extra weight storage | extra MFLOPs / image |", "|---|---|---|---|"]
        for label, r in ov["rows"].items():
            lines.append(f"| {label} | {r['params']:,} | {100 * r['weight_bits'] / wb:.1f}% | {r['flops'] / 1e6:.2f} |")
    missing = [cell_key(c) for c in cells(["ablation", "w4", "seeds"], iters) if cell_key(c) not in rows]
    if missing:
        lines += ["", "## Not measured yet", "",
                  "These cells have not run (10-25 minutes of one CPU core each here); the command above runs them "
                  "and resumes this table: " + ", ".join(f"`{m}`" for m in missing) + "."]
    lines += ["", f"Versions: {results['versions']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--search-iters", type=int, default=150)
    ap.add_argument("--groups", nargs="*", default=["ablation", "w4", "seeds", "overhead"])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_aiqvit"))
    args = ap.parse_args()
    out_json = args.out / "aiqvit.json"
    results, groups = open_results(out_json, ("ablation", "w4", "seeds", "overhead"), args.groups)
    results.update(iters=args.iters, search_iters=args.search_iters, versions=versions(),
                   command="python benchmarks/aiqvit.py --iters {} --search-iters {} --groups {}".format(
                       args.iters, args.search_iters, " ".join(groups)))

    def save() -> None:
        fimaq_json = args.out / "fimaq.json"
        fimaq = json.loads(fimaq_json.read_text()) if fimaq_json.is_file() else {}
        save_results(out_json, results, args.out / "aiqvit.md", lambda r: summarise(r, fimaq))

    todo = [c for c in cells(args.groups, args.iters) if cell_key(c) not in results["cells"]]
    fp_model = vitq.load_model("cifar10_vit")
    if todo:
        loader = make_loader(build_dataset(resolve_data("cifar10"), "eval", eval_transform(fp_model)), 250)
        if "fp_top1" not in results:
            results["fp_top1"] = evaluate(fp_model, loader, progress=False)["top1"]
        for i, c in enumerate(todo):
            t0 = time.time()
            results["cells"][cell_key(c)] = run_cell(c, cell_recipe(c, args.search_iters), fp_model, loader, args.work)
            save()
            print(f"[{i + 1}/{len(todo)}] {cell_key(c)}: {results['cells'][cell_key(c)]['top1']:.2f}% "
                  f"({time.time() - t0:.0f}s)", flush=True)
    searched = results["cells"].get(cell_key(dict(variant="base + LRC searched", bits=3, seed=0, iters=args.iters)))
    if "overhead" in args.groups and searched and "overhead" not in results:
        results["overhead"] = lrc_overhead(fp_model, searched["lrc_ranks"])
        print("overhead:", results["overhead"], flush=True)
    save()


if __name__ == "__main__":
    main()
