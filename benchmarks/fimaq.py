"""FIMA-Q and its baselines on the reference model, plus the cost of one DeiT-S block.

Cells (each: calibrate + reconstruct ``cifar10_vit``, top-1 on the 10,000 test images):

* ``main``: W4A4 and W3A3 x {mse, repq, brecq, qdrop, fimaq-diag, fimaq-lowrank, fimaq}, seed 0;
* ``seeds``: W3A3 x the reconstruction recipes x seeds 1, 2 (seed 0 comes from ``main``);
* ``rank``: fimaq W3A3 with k in {1, 15} (k = 5 is in ``main``);
* ``form``: fimaq W3A3 with the paper-era ``identity`` low-rank form;
* ``iters``: qdrop and fimaq at W3A3 with 250 / 1000 / 2000 iterations (500 is in ``main``);
* ``deit``: seconds per reconstruction iteration of one ``deit_small_patch16_224`` block at 224 px
  (random weights) on the real ImageNet sample images, and of one Fisher snapshot pass, to project
  the cost of the full recipe.

Every recipe uses the same budget: ``--iters`` per block (default 500), 1024 optimisation images,
128 calibration images, batch 32. Results are written after every cell to ``fimaq.json`` and
``fimaq.md``; a rerun skips cells already in the JSON, so a stopped sweep resumes.

Reproduce:

    python benchmarks/fimaq.py --iters 500 --groups main seeds rank form iters deit
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
from vitq.report import stage, versions  # noqa: E402
from sweep import open_results, save_results  # noqa: E402  (benchmarks/, the script's own folder)

CALIB_ONLY = ("mse", "repq")
RECON = ("brecq", "qdrop", "fimaq-diag", "fimaq-lowrank", "fimaq")


def cells(groups: list[str], iters: int) -> list[dict]:
    out = []
    if "main" in groups:
        # the cells the comparison hinges on first (W3A3 is where the methods separate), so a
        # sweep stopped early still answers fimaq vs mse and qdrop
        first = [(3, "mse"), (3, "repq"), (3, "brecq"), (3, "fimaq"), (3, "qdrop"), (4, "fimaq"), (4, "qdrop"),
                 (4, "mse"), (4, "repq")]
        rest = [(b, r) for b in (3, 4) for r in CALIB_ONLY + RECON if (b, r) not in first]
        for bits, r in first + rest:
            out.append(dict(group="main", recipe=r, bits=bits, seed=0, iters=iters))
    if "seeds" in groups:
        # fimaq vs qdrop (the closest pair) over both seeds first, then the other reconstructions
        pairs = [(s, r) for s in (1, 2) for r in ("fimaq", "qdrop")]
        pairs += [(s, r) for s in (1, 2) for r in RECON if r not in ("fimaq", "qdrop")]
        pairs = [(s, "mse") for s in (1, 2)] + pairs  # calibration only: minutes, not tens of minutes
        for seed, r in pairs:
            out.append(dict(group="seeds", recipe=r, bits=3, seed=seed, iters=iters))
    if "rank" in groups:
        for k in (1, 15):
            out.append(dict(group="rank", recipe="fimaq", bits=3, seed=0, iters=iters, rank=k))
    if "form" in groups:
        out.append(dict(group="form", recipe="fimaq", bits=3, seed=0, iters=iters, lowrank_form="identity"))
    if "iters" in groups:
        for n in (250, 1000, 2000):
            for r in ("qdrop", "fimaq"):
                out.append(dict(group="iters", recipe=r, bits=3, seed=0, iters=n))
    return out


def cell_key(c: dict) -> str:
    extra = "".join(f"-{k}{c[k]}" for k in ("rank", "lowrank_form") if k in c)
    return f"{c['recipe']}-w{c['bits']}a{c['bits']}-s{c['seed']}-i{c['iters']}{extra}"


_CALIBRATED: dict[tuple[int, int], tuple] = {}


def calibrated(fp_model, bits: int, seed: int, pool_size: int):
    """The ``mse``-calibrated model and its image pool for (bits, seed), computed once.

    Every reconstruction recipe starts from the same calibration (FIMA-Q's ``mse`` stage), so
    the sweep calibrates once per (bits, seed) and reconstructs from a copy; the calibration
    seconds are added to each cell's time so the cells stay comparable to a standalone run.
    """
    key = (bits, seed)
    if key not in _CALIBRATED:
        recipe = vitq.get_recipe("mse", w_bits=bits, a_bits=bits, seed=seed)
        pool = vitq.calibration_images(fp_model, "cifar10", pool_size, seed=seed)
        calib = pool[torch.from_numpy(vitq.data.fixed_subset(len(pool), recipe.calib_size, seed))]
        model = copy.deepcopy(fp_model)
        stages: dict = {}
        with stage(stages, "calibrate"):
            vitq.quantize(model, calib, recipe, device="cpu", progress=False)
        _CALIBRATED[key] = (model, pool, stages["calibrate"])
    return _CALIBRATED[key]


def run_cell(c: dict, fp_model, loader, work: Path) -> dict:
    from vitq.reconstruction import reconstruct

    overrides = {"w_bits": c["bits"], "a_bits": c["bits"], "seed": c["seed"]}
    recipe = vitq.get_recipe(c["recipe"])
    if recipe.reconstruction is not None:
        overrides["iters"] = c["iters"]
        for k in ("rank", "lowrank_form"):
            if k in c:
                overrides[k] = c[k]
    recipe = vitq.get_recipe(recipe, **overrides)
    stages: dict = {}
    blocks: list = []
    if recipe.reconstruction is None:
        model = copy.deepcopy(fp_model)
        images = vitq.calibration_images(fp_model, "cifar10", recipe.calib_size, seed=c["seed"])
        with stage(stages, "quantize"):
            vitq.quantize(model, images, recipe, device="cpu", progress=False)
        seconds, peak = stages["quantize"]["seconds"], stages["quantize"]["peak_mem_mb"]
    else:
        # the shared calibration is only valid while every reconstruction recipe calibrates like "mse"
        assert recipe.calibration == vitq.get_recipe("mse", seed=c["seed"]).calibration
        base, pool, calib_stage = calibrated(fp_model, c["bits"], c["seed"], recipe.reconstruction.optim_size)
        model = copy.deepcopy(base)
        with stage(stages, "reconstruct"):
            out = reconstruct(model, pool, recipe.reconstruction, "cpu", seed=c["seed"], progress=False,
                              work_dir=work / cell_key(c), resume_key={"recipe": recipe.to_dict()})
        blocks = out["blocks"]
        # the engine's per-block seconds, so a cell resumed after a stop still reports its full cost
        seconds = calib_stage["seconds"] + out["seconds"]
        peak = max(calib_stage["peak_mem_mb"], stages["reconstruct"]["peak_mem_mb"])
    res = evaluate(model, loader, progress=False)
    return {**c, "top1": res["top1"], "top5": res["top5"], "seconds": seconds, "peak_mem_mb": peak,
            "block_seconds": {b["block"]: b["seconds"] for b in blocks}}


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
             "## W4A4 and W3A3 (seed 0)", "", "| recipe | W4A4 top-1 | W3A3 top-1 | W4A4 s | W3A3 s | peak MB |",
             "|---|---|---|---|---|---|"]
    for r in CALIB_ONLY + RECON:
        c4 = rows.get(cell_key(dict(recipe=r, bits=4, seed=0, iters=results["iters"])))
        c3 = rows.get(cell_key(dict(recipe=r, bits=3, seed=0, iters=results["iters"])))
        f = lambda c, k, fmt: fmt.format(c[k]) if c else "-"  # noqa: E731
        lines.append(f"| {r} | {f(c4, 'top1', '{:.2f}')} | {f(c3, 'top1', '{:.2f}')} | {f(c4, 'seconds', '{:.0f}')} | "
                     f"{f(c3, 'seconds', '{:.0f}')} | {f(c3 or c4, 'peak_mem_mb', '{:.0f}')} |")
    lines += ["", "## W3A3 over seeds 0, 1, 2", "", "| recipe | mean | std | runs |", "|---|---|---|---|"]
    for r in ("mse",) + RECON:
        accs = [rows[k]["top1"] for k in (cell_key(dict(recipe=r, bits=3, seed=s, iters=results["iters"]))
                                          for s in (0, 1, 2)) if k in rows]
        if accs:
            sd = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
            lines.append(f"| {r} | {statistics.mean(accs):.2f} | {sd} | {len(accs)} |")
    lines += ["", "## fimaq W3A3: rank k and low-rank form", "", "| setting | top-1 | seconds |", "|---|---|---|"]
    for label, extra in (("k=1", {"rank": 1}), ("k=5 (default)", {}), ("k=15", {"rank": 15}),
                         ("identity form (paper-era)", {"lowrank_form": "identity"})):
        c = rows.get(cell_key(dict(recipe="fimaq", bits=3, seed=0, iters=results["iters"], **extra)))
        if c:
            lines.append(f"| {label} | {c['top1']:.2f} | {c['seconds']:.0f} |")
    lines += ["", "## W3A3 accuracy vs iterations per block", "", "| iterations | qdrop | fimaq |", "|---|---|---|"]
    for n in (250, results["iters"], 1000, 2000):
        cs = [rows.get(cell_key(dict(recipe=r, bits=3, seed=0, iters=n))) for r in ("qdrop", "fimaq")]
        if any(cs):
            lines.append(f"| {n} | " + " | ".join(f"{c['top1']:.2f}" if c else "-" for c in cs) + " |")
    deit = results.get("deit")
    if deit:
        lines += ["", "## Cost of one DeiT-S block at 224 px (this CPU)", "",
                  f"`deit_small_patch16_224` (random weights), `blocks.0`, batch 32, {deit['images']} ImageNet sample "
                  f"images: **{deit['seconds_per_iteration']:.2f} s per iteration**, "
                  f"{deit['seconds_per_snapshot_125_images']:.1f} s per Fisher snapshot pass over {deit['images']} "
                  f"images. Projected cost of the paper's recipe (14 blocks x 20,000 iterations, k=5 over 1024 images) "
                  f"on this CPU: **{deit['projected_hours_full_recipe']:.0f} hours**; on a GPU see benchmarks/imagenet.md."]
    missing = [cell_key(c) for c in cells(["main", "seeds", "rank", "form", "iters"], results["iters"])
               if cell_key(c) not in rows]
    if missing or not deit:
        lines += ["", "## Not measured yet", "",
                  "These cells of the full sweep have not run (each reconstruction cell costs 10-20 minutes of one "
                  "CPU core here); `python benchmarks/fimaq.py --iters {} --groups main seeds rank form iters deit` "
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
    ap.add_argument("--imagenet-sample", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample-128.tar.gz")
    args = ap.parse_args()
    out_json = args.out / "fimaq.json"
    results, groups = open_results(out_json, ("main", "seeds", "rank", "form", "iters", "deit"), args.groups)
    results.update(iters=args.iters, versions=versions(),
                   command="python benchmarks/fimaq.py --iters {} --groups {}".format(args.iters, " ".join(groups)))

    def save() -> None:
        save_results(out_json, results, args.out / "fimaq.md", summarise)

    todo = [c for c in cells(args.groups, args.iters) if cell_key(c) not in results["cells"]]
    if todo:
        fp_model = vitq.load_model("cifar10_vit")
        loader = make_loader(build_dataset(resolve_data("cifar10"), "eval", eval_transform(fp_model)), 250)
        if "fp_top1" not in results:
            results["fp_top1"] = evaluate(fp_model, loader, progress=False)["top1"]
        for i, c in enumerate(todo):
            t0 = time.time()
            results["cells"][cell_key(c)] = run_cell(c, fp_model, loader, args.work)
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
