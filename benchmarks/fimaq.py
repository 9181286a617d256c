"""FIMA-Q and its baselines on the reference model, plus the cost of one DeiT-S block.

Cells (each: calibrate + reconstruct ``cifar10_vit``, top-1 on the 10,000 test images):

* ``main``: W4A4 and W3A3 x {mse, repq, brecq, qdrop, fimaq-diag, fimaq-lowrank, fimaq}, seed 0;
* ``seeds``: W3A3 x the reconstruction recipes x seeds 1, 2 (seed 0 comes from ``main``);
* ``rank``: fimaq W3A3 with k in {1, 15} (k = 5 is in ``main``);
* ``form``: fimaq W3A3 with the paper-era ``identity`` low-rank form;
* ``iters``: qdrop and fimaq at W3A3 with 250 / 1000 / 2000 iterations (500 is in ``main``);
* ``swin``: the ``main`` rows on the second reference model ``cifar10_swin``, with today's ``mse``
  search (every calibration image);
* ``deit``: seconds per reconstruction iteration of one ``deit_small_patch16_224`` block at 224 px
  (random weights) on the real ImageNet sample images, and of one Fisher snapshot pass, to project
  the cost of the full recipe.

Every recipe uses the same budget: ``--iters`` per block (default 500), 1024 optimisation images,
128 calibration images, batch 32. Results are written after every cell to ``fimaq.json`` and
``fimaq.md``; a rerun skips cells already in the JSON, so a stopped sweep resumes.

Reproduce:

    python benchmarks/fimaq.py --iters 500 --groups main seeds rank form iters deit
    python benchmarks/fimaq.py --iters 500 --groups swin
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitq  # noqa: E402
from vitq.data import build_dataset, make_loader, resolve_data  # noqa: E402
from vitq.evaluation import evaluate  # noqa: E402
from vitq.models import eval_transform  # noqa: E402
from vitq.api import images_needed  # noqa: E402
from vitq.report import versions  # noqa: E402
from sweep import open_results, save_results  # noqa: E402  (benchmarks/, the script's own folder)

CALIB_ONLY = ("mse", "repq")
RECON = ("brecq", "qdrop", "fimaq-diag", "fimaq-lowrank", "fimaq-dplr-lowrank", "fimaq")
EVAL_BATCH = 100  # the CLI's default evaluation batch
# The mse calibration search's data: today's default, or the subsampling the cells before the
# redesign were measured with ('before': 16 images / 2,048 rows, see benchmarks/calibration.md); the
# `mse` rows without bias correction, as they were measured (the mse recipe's default since)
CALIB_SEARCH = {"": {"bias_correction": False},
                "before": {"max_search_tokens": 2048, "max_search_samples": 16, "max_search_elements": None,
                           "bias_correction": False}}
# The W3A3 seed-0 cells the redesign must reproduce (issue 11), measured again with the old search
REPRODUCE = ("mse", "qdrop", "fimaq-diag", "fimaq")
SCHEMA = 2  # cells measured with today's loss names (before: 'fimaq-lowrank' meant 'fimaq-dplr-lowrank')


def cells(groups: list[str], iters: int) -> list[dict]:
    out = []
    if "main" in groups:
        # the cells the comparison hinges on first (W3A3 is where the methods separate), so a
        # sweep stopped early still answers fimaq vs mse and qdrop
        first = [(3, "mse"), (3, "repq"), (3, "brecq"), (3, "fimaq"), (3, "qdrop"), (4, "fimaq"), (4, "qdrop"),
                 (4, "mse"), (4, "repq")]
        rest = [(b, r) for b in (3, 4) for r in CALIB_ONLY + RECON if (b, r) not in first]
        for bits, r in first + rest:
            out.append(dict(group="main", recipe=r, bits=bits, seed=0, iters=iters, **_late(r)))
    if "seeds" in groups:
        # fimaq vs qdrop (the closest pair) over both seeds first, then the other reconstructions
        pairs = [(s, r) for s in (1, 2) for r in ("fimaq", "qdrop")]
        pairs += [(s, r) for s in (1, 2) for r in RECON if r not in ("fimaq", "qdrop")]
        pairs = [(s, "mse") for s in (1, 2)] + pairs  # calibration only: minutes, not tens of minutes
        for seed, r in pairs:
            out.append(dict(group="seeds", recipe=r, bits=3, seed=seed, iters=iters, **_late(r)))
    if "rank" in groups:
        for k in (1, 15):
            out.append(dict(group="rank", recipe="fimaq", bits=3, seed=0, iters=iters, rank=k))
    if "form" in groups:
        # measured after the loss names were fixed (issue 11) with the mse search the rest of this
        # table was measured with, so a row differs from k=5 only by its loss
        out.append(dict(group="form", recipe="fimaq-lowrank", bits=3, seed=0, iters=iters, calib_search="before"))
        for form in ("identity", "paper_rms", "secant"):
            out.append(dict(group="form", recipe="fimaq", bits=3, seed=0, iters=iters, lowrank_form=form,
                            calib_search="before"))
    if "reproduce" in groups:
        for r in REPRODUCE:
            out.append(dict(group="reproduce", recipe=r, bits=3, seed=0, iters=iters, calib_search="before"))
    if "iters" in groups:
        for n in (250, 1000, 2000):
            for r in ("qdrop", "fimaq"):
                out.append(dict(group="iters", recipe=r, bits=3, seed=0, iters=n))
    if "swin" in groups:
        first = [(3, "mse"), (3, "fimaq"), (3, "qdrop"), (4, "mse"), (4, "fimaq"), (4, "qdrop")]
        rest = [(b, r) for b in (3, 4) for r in CALIB_ONLY + RECON if (b, r) not in first]
        for bits, r in first + rest:
            out.append(dict(group="swin", model="cifar10_swin", recipe=r, bits=bits, seed=0, iters=iters))
    return out


def _late(recipe: str) -> dict:
    """fimaq-lowrank (the official fisher_lr) joined after the redesign: its main / seeds cells use the
    mse search the rest of those groups was measured with, so its rows differ from theirs only by the loss."""
    return {"calib_search": "before"} if recipe == "fimaq-lowrank" else {}


def cell_key(c: dict) -> str:
    extra = "".join(f"-{k}{c[k]}" for k in ("rank", "lowrank_form") if k in c)
    if c.get("calib_search"):
        extra += f"-cs{c['calib_search']}"
    # cifar10_vit's keys carry no model name: they were measured before the Swin column existed
    model = "" if c.get("model", "cifar10_vit") == "cifar10_vit" else f"{c['model']}-"
    return f"{model}{c['recipe']}-w{c['bits']}a{c['bits']}-s{c['seed']}-i{c['iters']}{extra}"


def run_cell(c: dict, fp_model, loader, work: Path) -> dict:
    """One cell through exactly the path ``vitq quantize`` takes (the same images, calibration,
    reconstruction and evaluation batch), so the CLI reproduces every number here."""
    # 128 calibration images for every row: the `mse` row is the calibration the others start from
    recipe = vitq.get_recipe(c["recipe"], w_bits=c["bits"], a_bits=c["bits"], seed=c["seed"], calib_size=128,
                             calibration=CALIB_SEARCH[c.get("calib_search", "")])
    if recipe.reconstruction is not None:
        recon = {"iters": c["iters"], **{k: c[k] for k in ("rank", "lowrank_form") if k in c}}
        recipe = vitq.get_recipe(recipe, reconstruction=recon)
    model = copy.deepcopy(fp_model)
    pool = vitq.calibration_images(fp_model, "cifar10", images_needed(recipe), seed=c["seed"])
    result = vitq.quantize_with_summary(model, pool, recipe, device="cpu", progress=False,
                                        work_dir=work / cell_key(c) if recipe.reconstruction is not None else None)
    blocks = result.reconstruction["blocks"] if result.reconstruction else []
    # the engine's per-block seconds, so a cell resumed after a stop still reports its full cost
    seconds = result.stages["calibration"]["seconds"] + sum(b["seconds"] for b in blocks)
    peak = max(s["peak_mem_mb"] for s in result.stages.values())
    res = evaluate(model, loader, progress=False)
    return {**c, "top1": res["top1"], "top5": res["top5"], "seconds": seconds, "peak_mem_mb": peak,
            "block_seconds": {b["block"]: b["seconds"] for b in blocks}, "schema": SCHEMA}


def deit_block_cost(sample: Path, iters: int = 20) -> dict:
    """Seconds per reconstruction iteration and per snapshot pass of DeiT-S blocks.0 at 224 px."""
    import timm

    from calibration import imagenet_sample  # noqa: E402  (benchmarks/calibration.py)
    from vitq.adapters import prepare
    from vitq.calibration import CalibConfig, calibrate
    from vitq.qmodules import QuantMode, set_mode
    from vitq.reconstruction import ReconConfig, capture_block_input, reconstruct_block

    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    images = imagenet_sample(sample, model)
    prepare(model, vitq.get_recipe("fimaq", w_bits=3, a_bits=3).quant_spec())
    calibrate(model, images[:32], CalibConfig(method="minmax", reparam=False), "cpu", progress=False)
    block = model.blocks[0]
    set_mode(model, QuantMode.FLOAT)
    x = capture_block_input(model, "blocks.0", block, images, 32, torch.device("cpu"), torch.device("cpu"))
    logits = torch.cat([model(images[i:i + 32]) for i in range(0, len(images), 32)]).detach()
    targets = torch.softmax(logits / 20, -1)
    out = {"images": len(images)}
    for label, cfg in (("iteration", ReconConfig(loss="mse", iters=iters)),
                       ("iteration_with_snapshot", ReconConfig(loss="fimaq_dplr", iters=iters, rank=1))):
        m = copy.deepcopy(model)
        blk = m.blocks[0]
        t0 = time.perf_counter()
        reconstruct_block(m, "blocks.0", blk, x, x, targets, cfg, torch.device("cpu"),
                          torch.Generator().manual_seed(0), progress=False)
        out[label + "_total_s"] = time.perf_counter() - t0
    out["seconds_per_iteration"] = out["iteration_total_s"] / iters
    out["seconds_per_snapshot_125_images"] = out["iteration_with_snapshot_total_s"] - out["iteration_total_s"]
    # projection of the paper's recipe: 14 blocks x 20,000 iterations, k=5 snapshots over 1024 images
    out["projected_hours_full_recipe"] = (14 * 20000 * out["seconds_per_iteration"]
                                          + 13 * 5 * out["seconds_per_snapshot_125_images"] * 1024 / len(images)) / 3600
    return out


def summarise(results: dict) -> str:
    rows = results["cells"]
    fp = results.get("fp_top1", float("nan"))
    lines = ["# FIMA-Q and baselines on the reference model", "",
             f"Command: `{results['command']}`", "",
             f"`cifar10_vit`, FP top-1 **{fp:.2f}%** on the 10,000 CIFAR-10 test images. Budget for every recipe: "
             f"{results['iters']} iterations per block, 1024 optimisation and 128 calibration images from the training "
             "split, batch 32; CPU, one thread per process. Seconds and peak memory are for the whole quantization "
             "(calibration + reconstruction).", "",
             "Every cell below starts from the `mse` calibration whose search scores candidates on a subsample "
             "(16 images / 2,048 rows): the cells of groups main, seeds, rank and iters were measured with it "
             "before the core redesign (issue 11), and groups `reproduce` and `form` with today's code on the "
             "same subsample (`calib_search: before`), so every row differs from the others only by its recipe. "
             "`reproduce` shows today's code gives the same numbers; `form` was measured after the loss names "
             "were fixed (their seconds were taken with a second benchmark on the other core, so they run "
             "high). Today's default scores the search on every calibration image (benchmarks/calibration.md); "
             "the reconstruction recipes have not been swept from it yet (one data point: fimaq W4A4, seed 0, "
             "74.61 in benchmarks/deploy.md).", "",
             "## W4A4 and W3A3 (seed 0)", "", "| recipe | W4A4 top-1 | W3A3 top-1 | W4A4 s | W3A3 s | peak MB |",
             "|---|---|---|---|---|---|"]
    def cell(**c):  # a cell, or the same cell measured on the subsample search after the redesign
        return rows.get(cell_key(c)) or rows.get(cell_key({**c, "calib_search": "before"}))

    for r in CALIB_ONLY + RECON:
        c4 = cell(recipe=r, bits=4, seed=0, iters=results["iters"])
        c3 = cell(recipe=r, bits=3, seed=0, iters=results["iters"])
        f = lambda c, k, fmt: fmt.format(c[k]) if c else "-"  # noqa: E731
        lines.append(f"| {r} | {f(c4, 'top1', '{:.2f}')} | {f(c3, 'top1', '{:.2f}')} | {f(c4, 'seconds', '{:.0f}')} | "
                     f"{f(c3, 'seconds', '{:.0f}')} | {f(c3 or c4, 'peak_mem_mb', '{:.0f}')} |")
    swin_fp = results.get("fp_top1_by_model", {}).get("cifar10_swin")
    if swin_fp is not None:
        lines += ["", "## `cifar10_swin` (seed 0)", "",
                  f"The second reference model, FP top-1 **{swin_fp:.2f}%**, the same budget, with today's `mse` "
                  "search (every calibration image) under every row (`--groups swin`).", "",
                  "| recipe | W4A4 top-1 | W3A3 top-1 | W4A4 s | W3A3 s | peak MB |", "|---|---|---|---|---|---|"]
        for r in CALIB_ONLY + RECON:
            c4, c3 = (rows.get(cell_key(dict(model="cifar10_swin", recipe=r, bits=b, seed=0, iters=results["iters"])))
                      for b in (4, 3))
            f = lambda c, k, fmt: fmt.format(c[k]) if c and c.get(k) is not None else "-"  # noqa: E731
            lines.append(f"| {r} | {f(c4, 'top1', '{:.2f}')} | {f(c3, 'top1', '{:.2f}')} | "
                         f"{f(c4, 'seconds', '{:.0f}')} | {f(c3, 'seconds', '{:.0f}')} | "
                         f"{f(c3 or c4, 'peak_mem_mb', '{:.0f}')} |")
        # a cell whose process was paused mid-run keeps its top-1; its seconds are struck, with why;
        # a cell whose peak memory is not its need says why beside it
        notes = [(k, what, c[f"{field}_note"]) for k, c in rows.items() if c.get("model") == "cifar10_swin"
                 for field, what in (("seconds", "seconds not shown"), ("peak", "peak MB")) if c.get(f"{field}_note")]
        lines += [""] if notes else []
        lines += [f"- `{k}`: {what}: {note}" for k, what, note in notes]
    lines += ["", "## W3A3 over seeds 0, 1, 2", "", "| recipe | mean | std | runs |", "|---|---|---|---|"]
    for r in ("mse",) + RECON:
        accs = [c["top1"] for c in (cell(recipe=r, bits=3, seed=s, iters=results["iters"]) for s in (0, 1, 2)) if c]
        if accs:
            sd = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
            lines.append(f"| {r} | {statistics.mean(accs):.2f} | {sd} | {len(accs)} |")
    lines += ["", "## fimaq W3A3: rank k and low-rank form", "", "| setting | top-1 | seconds |", "|---|---|---|"]
    for label, extra in (("k=1", {"rank": 1}), ("k=5 (default)", {}), ("k=15", {"rank": 15}),
                         ("form identity: M = I", {"lowrank_form": "identity"}),
                         ("form paper_rms: M = I, RMS-normalised snapshots (paper-era code)", {"lowrank_form": "paper_rms"}),
                         ("form secant: M = (G Dᵀ)⁻¹", {"lowrank_form": "secant"}),
                         ("fimaq-lowrank: the official `fisher_lr`, no diagonal", {"recipe": "fimaq-lowrank"})):
        c = cell(**{"recipe": "fimaq", "bits": 3, "seed": 0, "iters": results["iters"], **extra})
        if c:
            lines.append(f"| {label} | {c['top1']:.2f} | {c['seconds']:.0f} |")
    lines += ["", "## W3A3 accuracy vs iterations per block", "", "| iterations | qdrop | fimaq |", "|---|---|---|"]
    for n in (250, results["iters"], 1000, 2000):
        cs = [rows.get(cell_key(dict(recipe=r, bits=3, seed=0, iters=n))) for r in ("qdrop", "fimaq")]
        if any(cs):
            lines.append(f"| {n} | " + " | ".join(f"{c['top1']:.2f}" if c else "-" for c in cs) + " |")
    pairs = [(cell_key(dict(recipe=r, bits=3, seed=0, iters=results["iters"])),
              cell_key(dict(recipe=r, bits=3, seed=0, iters=results["iters"], calib_search="before")))
             for r in REPRODUCE]
    pairs = [(old, new) for old, new in pairs if new in rows]
    if pairs:
        lines += ["", "## Measured again after the core redesign (issue 11)", "",
                  "The W3A3 seed-0 cells above were measured before the redesign (one quantizer interface, AIQViT "
                  "as a plug-in, the adapter registry, one code path for the CLI and the benchmarks). The same "
                  "cells through today's code, with the mse search on the data it used then (16 images / 2,048 "
                  "rows; group `reproduce`):", "",
                  "| cell | before the redesign | after | difference |", "|---|---|---|---|"]
        for old, new in pairs:
            b = rows.get(old) or results.get("before_redesign", {}).get(old)
            lines.append(f"| {old} | {b['top1']:.2f} | {rows[new]['top1']:.2f} | {rows[new]['top1'] - b['top1']:+.2f} |")
        cli = results.get("cli_check")
        if cli:
            lines += ["", f"The same fimaq cell through the command line, `{cli['command']}`: top-1 "
                      f"**{cli['top1']:.2f}** ({cli['seconds']:.0f} s), the number above. The CLI and the "
                      "benchmark scripts now take one code path (`vitq.quantize_with_summary`, the CLI's "
                      "evaluation batch); before the redesign the benchmark calibrated once per (bits, seed) and "
                      "reconstructed a copy, and a CLI run of this setting was reported at 73.09."]
    deit = results.get("deit")
    if deit:
        lines += ["", "## Cost of one DeiT-S block at 224 px (this CPU)", "",
                  f"`deit_small_patch16_224` (random weights), `blocks.0`, batch 32, {deit['images']} ImageNet sample "
                  f"images: **{deit['seconds_per_iteration']:.2f} s per iteration**, "
                  f"{deit['seconds_per_snapshot_125_images']:.1f} s per Fisher snapshot pass over {deit['images']} "
                  f"images. Projected cost of the paper's recipe (14 blocks x 20,000 iterations, k=5 over 1024 images) "
                  f"on this CPU: **{deit['projected_hours_full_recipe']:.0f} hours**; on a GPU see benchmarks/imagenet.md."]
    missing = [cell_key(c) for c in cells(["main", "seeds", "rank", "form", "reproduce", "iters", "swin"], results["iters"])
               if cell_key(c) not in rows and cell_key({**c, "calib_search": "before"}) not in rows]
    if missing or not deit:
        lines += ["", "## Not measured yet", "",
                  "These cells of the full sweep have not run (each reconstruction cell costs 10-20 minutes of one "
                  "CPU core here); `python benchmarks/fimaq.py --iters {} --groups main seeds rank form iters swin deit` "
                  "runs them and resumes this table: {}.".format(results["iters"], ", ".join(
                      missing + ([] if deit else ["deit"])))]
    lines += ["", f"Versions: {results['versions']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--groups", nargs="*", default=["main", "seeds", "rank", "form", "iters", "deit"])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_fimaq"))
    ap.add_argument("--remeasure", nargs="*", default=[],
                    help="cell keys to measure again; their old numbers move to 'before_redesign' in the JSON")
    ap.add_argument("--imagenet-sample", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample-128.tar.gz")
    args = ap.parse_args()
    out_json = args.out / "fimaq.json"
    results, groups = open_results(out_json, ("main", "seeds", "rank", "form", "reproduce", "iters", "swin", "deit"),
                                   args.groups)
    results.update(iters=args.iters, versions=versions(),
                   command="python benchmarks/fimaq.py --iters {} --groups {}".format(args.iters, " ".join(groups)))

    def save() -> None:
        save_results(out_json, results, args.out / "fimaq.md", summarise)

    # the loss names changed meaning in the redesign (vitq.reconstruction.config.LOSSES): the old
    # 'fimaq-lowrank' cells computed what is now 'fimaq-dplr-lowrank'; the old identity form
    # rescaled the diagonal too, so it matches no form of today and is kept only as history
    def retire(key: str) -> dict:
        results.setdefault("retired_keys", []).append(key)
        return results["cells"].pop(key)

    old = [k for k, c in results["cells"].items() if c.get("schema") != SCHEMA]
    for key in [k for k in old if k.startswith("fimaq-lowrank-")]:
        cell = retire(key)
        new_key = "fimaq-dplr-lowrank-" + key[len("fimaq-lowrank-"):]
        results["cells"][new_key] = {**cell, "recipe": "fimaq-dplr-lowrank", "renamed_from": key}
    for key in [k for k in old if k.endswith("-lowrank_formidentity")]:
        results.setdefault("before_redesign", {})[key] = retire(key)
    for key in args.remeasure:
        if key in results["cells"]:
            results.setdefault("before_redesign", {})[key] = retire(key)
    results["retired_keys"] = sorted(set(results.get("retired_keys", [])))

    todo = [c for c in cells(args.groups, args.iters) if cell_key(c) not in results["cells"]]
    models: dict = {}  # name -> (float model, test loader), loaded when a cell first needs it

    def reference(name: str):
        if name not in models:
            fp_model = vitq.load_model(name)
            loader = make_loader(build_dataset(resolve_data("cifar10"), "eval", eval_transform(fp_model)), EVAL_BATCH)
            if name == "cifar10_vit" and "fp_top1" not in results:
                results["fp_top1"] = evaluate(fp_model, loader, progress=False)["top1"]
            by_model = results.setdefault("fp_top1_by_model", {})
            if name != "cifar10_vit" and name not in by_model:
                by_model[name] = evaluate(fp_model, loader, progress=False)["top1"]
            models[name] = (fp_model, loader)
        return models[name]

    if todo:
        for i, c in enumerate(todo):
            t0 = time.time()
            fp_model, loader = reference(c.get("model", "cifar10_vit"))
            results["cells"][cell_key(c)] = run_cell(c, fp_model, loader, args.work)
            if cell_key(c) in results["retired_keys"]:  # measured anew: other sweeps may merge it again
                results["retired_keys"].remove(cell_key(c))
            save()
            print(f"[{i + 1}/{len(todo)}] {cell_key(c)}: {results['cells'][cell_key(c)]['top1']:.2f}% "
                  f"({time.time() - t0:.0f}s)", flush=True)
    if "deit" in args.groups and "deit" not in results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        results["deit"] = deit_block_cost(args.imagenet_sample)
        print("deit:", results["deit"], flush=True)
    save()


if __name__ == "__main__":
    main()
