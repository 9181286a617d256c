"""The ``vitq`` command line's arguments, and the recipe they ask for (presets plus nested overrides)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import VitqError
from ..recipes import recipe_names


# The demo: FIMA-Q at W4/A4 on the reference model with a budget that takes about ten minutes on a
# 2-core CPU (the paper's budget is 20,000 iterations per block on a GPU; see benchmarks/fimaq.md).
DEMO_RECIPE = "fimaq"
DEMO_BITS = 4
DEMO_BUDGET = {"calib_size": 128, "reconstruction": {"iters": 200, "optim_size": 512}}
# CalibConfig fields the quantize command sets by their own flags (--eq-n, ...)
CALIB_FLAGS = ("eq_n", "search_rounds", "fine_grid", "fine_grid_span", "bias_correction")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


ALL = "all"


def _count_or_all(text: str) -> int | str:
    return ALL if text == ALL else _positive_int(text)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--batch-size", type=_positive_int, default=100, help="evaluation batch size (default 100)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a new folder under ./runs/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="cifar10_vit, a timm model name, or a vitq model/run folder")
    p.add_argument("--checkpoint", default=None,
                   help="local weights file for a timm model name (loaded through timm's pretrained mechanism)")
    p.add_argument("--random-weights", action="store_true", help="timm model with random weights (timing only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitq", description="Post-training quantization for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_eval = sub.add_parser("eval", help="top-1/top-5 of a model on a dataset")
    _add_model(p_eval)
    p_eval.add_argument("--data", required=True, help="'cifar10' or an image folder (ROOT/val/<class>/*)")
    p_eval.add_argument("--limit", type=_positive_int, default=None,
                        help="evaluate a fixed random sample of N images (over all classes)")
    p_eval.add_argument("--seed", type=int, default=0, help="seed of the --limit sample (default 0)")
    _add_common(p_eval)

    p_q = sub.add_parser("quantize", help="quantize a model, evaluate FP and quantized, save the quantized model")
    _add_model(p_q)
    p_q.add_argument("--data", required=True, help="'cifar10' or an image folder with train/ and val/")
    p_q.add_argument("--recipe", default="mse",
                     help="a preset: " + ", ".join(recipe_names()) + " (see the README's recipe table). "
                          "Default mse")
    p_q.add_argument("--softmax-quantizer", choices=("uniform", "log2", "logsqrt2", "log", "dfq"), default=None,
                     help="quantizer of the post-softmax attention (recipe default; log = log-sqrt2 from 4 bits, "
                          "log2 below; dfq = AIQViT's learned interval)")
    p_q.add_argument("--w-bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    p_q.add_argument("--a-bits", type=int, default=None, help="activation bits, 2..8 (default 4; off with --target ort-w4)")
    p_q.add_argument("--head-bits", type=int, default=None, help="keep the classifier head at these W/A bits (e.g. 8)")
    p_q.add_argument("--patch-embed-bits", type=int, default=None, help="patch-embedding weight bits (e.g. 8)")
    p_q.add_argument("--calib-size", type=_positive_int, default=None, help="calibration images (recipe default 128)")
    p_q.add_argument("--calib-data", default=None, help="folder of calibration images (default: DATA's train split)")
    p_q.add_argument("--calib-transform", choices=("eval", "train"), default="eval",
                     help="preprocess calibration images with timm's eval transform (default) or its "
                          "training augmentation, drawn once per image as FIMA-Q does")
    p_q.add_argument("--eq-n", type=_positive_int, default=None, help="mse search: candidates per grid (default 128)")
    p_q.add_argument("--search-rounds", type=int, default=None, help="mse search: coordinate-descent rounds (default 3)")
    p_q.add_argument("--fine-grid", type=int, default=None,
                     help="mse search: scales of a finer second grid around each linear-layer winner (0: off)")
    p_q.add_argument("--fine-grid-span", type=int, default=None,
                     help="mse search: coarse scales either side of the winner that the finer grid covers (default 1)")
    p_q.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                     help="add each linear layer's mean output error on the calibration data back as a bias, "
                          "and score the mse search on the error left (default: the recipe's)")
    p_q.add_argument("--search-tokens", type=_count_or_all, default=None,
                     help="mse search: linear-input rows that score candidates, N or 'all' (default 16384)")
    p_q.add_argument("--search-samples", type=_count_or_all, default=None,
                     help="mse search: images that score matmul candidates, N or 'all' (default all, up to "
                          "--search-elements)")
    p_q.add_argument("--search-elements", type=_count_or_all, default=None,
                     help="mse search: at most this many matmul-output elements, N or 'all' (default 4194304)")
    g = p_q.add_argument_group("block reconstruction (recipes qdrop, brecq, fimaq-diag, fimaq-lowrank, fimaq)")
    g.add_argument("--iters", type=_positive_int, default=None, help="iterations per block (paper: 20000)")
    g.add_argument("--optim-size", type=_positive_int, default=None, help="optimisation images (paper: 1024)")
    g.add_argument("--recon-batch-size", type=_positive_int, default=None, help="reconstruction batch (paper: 32)")
    g.add_argument("--rank", type=_positive_int, default=None, help="k, the number of Fisher snapshots (default 5)")
    g.add_argument("--alpha", type=float, default=None, help="DPLR weight of the low-rank term in [0,1] (default 0.5)")
    g.add_argument("--lowrank-form", choices=("gram_inverse", "identity", "paper_rms", "secant"), default=None,
                   help="low-rank FIM middle matrix: (DDᵀ)⁻¹ (gram_inverse, the official code), I (identity), I on "
                        "RMS-normalised snapshots (paper_rms, the paper-era code), (GDᵀ)⁻¹ (secant)")
    g.add_argument("--first-block-iters", type=_positive_int, default=None,
                   help="iterations of the first transformer block (default: --iters)")
    g.add_argument("--snapshot-images", type=_positive_int, default=None,
                   help="images each Fisher snapshot averages over, a fixed strided subset (default: all)")
    g.add_argument("--snapshot-schedule", choices=("q", "qf", "r"), default=None,
                   help="when snapshots are taken: spread over the iterations (q), the first k (qf), perturbation (r)")
    g.add_argument("--renormalize", choices=("refresh", "once"), default=None,
                   help="reset the loss normalisers at every snapshot (refresh, default) or only once")
    g.add_argument("--temperature", type=float, default=None, help="KL temperature of the snapshots (default 20)")
    g.add_argument("--input-mode", choices=("qdrop", "rinp", "qinp"), default=None, help="block input (default qdrop)")
    g.add_argument("--drop-prob", type=float, default=None, help="QDrop: probability of keeping quantization (0.5)")
    g.add_argument("--weight-lr", type=float, default=None, help="AdaRound learning rate (1e-3)")
    g.add_argument("--act-lr", type=float, default=None, help="activation-scale learning rate (4e-5)")
    g.add_argument("--round-lambda", type=float, default=None, help="rounding-regulariser weight (0.01)")
    g.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                   help="the block's forward/backward under autocast (bf16 on CPU or CUDA, fp16 on CUDA); "
                        "caches, targets and losses stay float32")
    g.add_argument("--compile", dest="compile_kernels", choices=("auto", "on", "off"), default=None,
                   help="torch.compile the fused fake-quantization kernels of the mse search, reconstruction and "
                        "refinement (auto: from 256 calibration images, 200 iterations per block; eager wherever "
                        "compilation fails)")
    g.add_argument("--cache-on-disk", action="store_true", default=None,
                   help="keep the cached block inputs/outputs in memory-mapped files ($VITQ_CACHE_DIR or the "
                        "temp dir) instead of memory: for models whose caches do not fit")
    g.add_argument("--global-weight", type=float, default=None,
                   help="GLF-Q-style global term: weight of the penultimate-feature match through the float "
                        "rest of the network (default 0: off; recipe fimaq+global: 1)")
    g.add_argument("--global-every", type=_positive_int, default=None,
                   help="add the global term on every N-th iteration only (default 1)")
    e = p_q.add_argument_group("end-to-end refinement after reconstruction (recipes *+refine; any recipe with "
                               "--refine-iters)")
    e.add_argument("--refine-iters", type=_positive_int, default=None, help="refinement iterations (default 200)")
    e.add_argument("--refine-optim-size", type=_positive_int, default=None,
                   help="refinement images (default: --optim-size, or 1024 without reconstruction)")
    e.add_argument("--refine-rounding", choices=("hard", "soft"), default=None,
                   help="hard: the learned rounding stays; soft: it learns again (default hard)")
    e.add_argument("--refine-act-lr", type=float, default=None, help="activation-scale learning rate (4e-5)")
    e.add_argument("--refine-temperature", type=float, default=None, help="KL temperature (default 1)")
    e.add_argument("--refine-drop-prob", type=float, default=None,
                   help="QDrop keep probability during refinement (default 1: off)")
    e.add_argument("--refine-learn-biases", action=argparse.BooleanOptionalAction, default=None,
                   help="also learn the quantized layers' float biases (default off)")
    a = p_q.add_argument_group("AIQViT (recipes aiqvit, fimaq+dfq, fimaq+lrc, fimaq+aiq): switch each part on or off")
    a.add_argument("--dfq", action=argparse.BooleanOptionalAction, default=None,
                   help="dynamic focusing quantizer on post-softmax attention (= --softmax-quantizer dfq)")
    a.add_argument("--dfq-granularity", choices=("layer", "head"), default=None, help="one DFQ interval per layer/head")
    a.add_argument("--dfq-below", choices=("clip", "zero"), default=None,
                   help="DFQ: values below the interval go to its lower end (clip) or to exact 0 (zero)")
    a.add_argument("--lrc", action=argparse.BooleanOptionalAction, default=None, help="low-rank compensation")
    a.add_argument("--lrc-mode", choices=("merged", "side"), default=None,
                   help="Q(W+BA) folded into the weights (merged) or Q(W)+BA kept as a branch (side)")
    a.add_argument("--rank-policy", choices=("search", "fixed", "energy"), default=None,
                   help="per-layer ranks: differentiable search, one fixed rank, or the SVD-energy rule")
    a.add_argument("--fixed-rank", type=int, default=None, help="rank for --rank-policy fixed (default 20)")
    a.add_argument("--search-iters", type=int, default=None, help="rank-search iterations per block (default 300)")
    a.add_argument("--curriculum", action=argparse.BooleanOptionalAction, default=None,
                   help="easy-to-hard sample curriculum")
    p_q.add_argument("--target", default=None,
                     help="where the model will run: simulated (default: any quantizer), ort-int8 (onnxruntime "
                          "integer kernels: per-tensor activations, uniform post-softmax), ort-w4 (4-bit "
                          "weight-only); calibration and reconstruction keep to it; export with the same profile")
    p_q.add_argument("--rotation", default=None,
                     help="none, hadamard or orthogonal: rotate every quantized Linear's input (and its weight) by a randomised Hadamard or a "
                          "random orthogonal matrix before calibration: spreads outlier channels (default: the "
                          "recipe's, none for the classic recipes)")
    p_q.add_argument("--rotate-attention", action=argparse.BooleanOptionalAction, default=None,
                     help="with --rotation: rotate the attention matmuls' operands (q, k, v) too")
    p_q.add_argument("--seed", type=int, default=0, help="fixes the calibration sample and every random draw")
    p_q.add_argument("--limit", type=_positive_int, default=None,
                     help="evaluate on a fixed random sample of N evaluation images")
    p_q.add_argument("--skip-fp-eval", action="store_true", help="do not evaluate the FP model")
    p_q.add_argument("--restart", action="store_true",
                     help="discard a reconstruction checkpoint in --out instead of resuming it")
    _add_common(p_q)

    p_demo = sub.add_parser("demo", help="the main job on the shipped reference model and CIFAR-10")
    p_demo.add_argument("--model", default="cifar10_vit", help="the model (default: the shipped cifar10_vit)")
    p_demo.add_argument("--data", default="cifar10", help="the data (default: the shipped CIFAR-10)")
    p_demo.add_argument("--limit", type=_positive_int, default=None,
                        help="evaluate on a fixed random sample of N images (default: all)")
    p_demo.add_argument("--iters", type=_positive_int, default=None,
                        help=f"iterations per block (default {DEMO_BUDGET['reconstruction']['iters']})")
    p_demo.add_argument("--optim-size", type=_positive_int, default=None,
                        help=f"optimisation images (default {DEMO_BUDGET['reconstruction']['optim_size']})")
    p_demo.add_argument("--calib-size", type=_positive_int, default=None,
                        help=f"calibration images (default {DEMO_BUDGET['calib_size']})")
    _add_common(p_demo)

    p_x = sub.add_parser("export", help="write a quantized model as a deployable artifact (packed integer "
                                        "weights, or ONNX checked in onnxruntime)")
    p_x.add_argument("source", metavar="RUN_OR_MODEL_DIR", help="a `vitq quantize` run folder or its model/ folder")
    # free text, not argparse choices: an unknown format is a one-line VitqError like every other mistake
    p_x.add_argument("--format", default="packed",
                     help="packed: bit-packed integer weight codes (default); onnx: OUT/model.onnx + OUT/export.json")
    p_x.add_argument("--profile", default="exact",
                     help="onnx only. exact: QDQ graph of the fake-quant model (default); int8: onnxruntime integer "
                          "kernels (quantize with --target ort-int8), uint8 weights, exact on every CPU; int8-vnni: the same "
                          "with int8 weights, faster on CPUs with VNNI/AMX-INT8 but inexact on AVX2-only CPUs; "
                          "w4: 4-bit weight-only (MatMulNBits)")
    p_x.add_argument("--opset", type=int, default=21, help="onnx only: opset, 21 or newer (default 21)")
    p_x.add_argument("--out", type=Path, required=True,
                     help="output folder: absent, empty, or a previous vitq export (replaced)")

    p_r = sub.add_parser("report", help="one self-contained HTML page (tables and plots) for one or more runs")
    p_r.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                     help="run folders written by `vitq quantize --out` or `vitq demo --out`")
    p_r.add_argument("--out", type=Path, default=None, metavar="FILE",
                     help="the HTML file (default: RUN_DIR/report.html for one run; required for several)")
    return parser


RECON_FLAGS = ("iters", "first_block_iters", "optim_size", "rank", "snapshot_images", "alpha", "lowrank_form", "snapshot_schedule",
               "renormalize", "temperature", "input_mode", "drop_prob", "weight_lr", "act_lr", "round_lambda", "autocast",
               "cache_on_disk", "global_weight", "global_every")
# --refine-X sets refine field X
REFINE_FLAGS = ("iters", "optim_size", "rounding", "act_lr", "temperature", "drop_prob", "learn_biases")
AIQ_FLAGS = ("lrc", "lrc_mode", "rank_policy", "fixed_rank", "search_iters", "curriculum")


def recipe_from_args(args: argparse.Namespace):
    """The recipe the command line asks for: the preset, then the flags as nested overrides."""
    from ..recipes import get_recipe

    base = get_recipe(args.recipe)
    softmax = args.softmax_quantizer
    if args.dfq is not None:
        wanted = "dfq" if args.dfq else ("uniform" if base.softmax_quantizer == "dfq" else base.softmax_quantizer)
        if softmax is not None and softmax != wanted:
            raise VitqError(f"--{'' if args.dfq else 'no-'}dfq contradicts --softmax-quantizer {softmax}: give one")
        softmax = wanted
    dfq_options = {k: v for k, v in (("granularity", args.dfq_granularity), ("below", args.dfq_below)) if v is not None}
    options = None
    if dfq_options:
        if (softmax or base.softmax_quantizer) != "dfq":
            raise VitqError(f"--dfq-granularity / --dfq-below apply to the dfq post-softmax quantizer, which recipe "
                            f"{base.name!r} does not use here: add --dfq, or use fimaq+dfq, aiqvit or fimaq+aiq")
        options = {**(base.softmax_options if base.softmax_quantizer == "dfq" else {}), **dfq_options}
    elif softmax is not None and softmax != base.softmax_quantizer:
        options = {}  # the preset's options belong to its own quantizer
    recon = {k: getattr(args, k) for k in RECON_FLAGS if getattr(args, k) is not None}
    if args.recon_batch_size is not None:
        recon["batch_size"] = args.recon_batch_size
    aiq = {k: getattr(args, k) for k in AIQ_FLAGS if getattr(args, k) is not None}
    refine = {k: getattr(args, f"refine_{k}") for k in REFINE_FLAGS if getattr(args, f"refine_{k}") is not None}
    calibration = {k: getattr(args, k) for k in CALIB_FLAGS if getattr(args, k) is not None}
    if args.compile_kernels is not None:  # one switch for every stage the recipe has
        calibration["compile_kernels"] = args.compile_kernels
        if base.reconstruction is not None:
            recon["compile_kernels"] = args.compile_kernels
        if refine or base.refine is not None:
            refine["compile_kernels"] = args.compile_kernels
    for flag in ("tokens", "samples", "elements"):
        value = getattr(args, f"search_{flag}")
        if value is not None:
            calibration[f"max_search_{flag}"] = None if value == ALL else value
    return get_recipe(base, w_bits=args.w_bits, a_bits=args.a_bits, softmax_quantizer=softmax,
                      softmax_options=options, head_w_bits=args.head_bits, head_a_bits=args.head_bits,
                      patch_embed_w_bits=args.patch_embed_bits, calib_size=args.calib_size, seed=args.seed,
                      calibration=calibration or None, reconstruction=recon or None, aiq=aiq or None,
                      refine=refine or None, target=args.target, rotation=args.rotation,
                      rotate_attention=args.rotate_attention)


