"""The ``vitq`` command line: a thin layer over the Python API.

User mistakes surface as one line, ``vitq: error: <what and how to fix it>``,
with exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import VitqError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


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

    p_demo = sub.add_parser("demo", help="the main job on the shipped reference model and CIFAR-10")
    _add_common(p_demo)
    return parser


def _eval_model(model, spec, limit: int | None, seed: int, batch_size: int, workers: int,
               device, progress: bool, desc: str) -> dict[str, Any]:
    from .data import build_dataset, make_loader, subset
    from .evaluation import evaluate
    from .models import eval_transform

    dataset = subset(build_dataset(spec, "eval", eval_transform(model)), limit, seed)
    return evaluate(model, make_loader(dataset, batch_size, workers), device, progress=progress, desc=desc)


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import resolve_data
    from .models import load_model
    from .report import new_run_dir, versions, write_json
    from .runtime import resolve_device

    # cheap checks first, so a typo in --data or --device fails before a model download
    device = resolve_device(args.device)
    spec = resolve_data(args.data)
    model = load_model(args.model, checkpoint=args.checkpoint, pretrained=not args.random_weights)
    result = _eval_model(model, spec, args.limit, args.seed, args.batch_size, args.workers, device,
                         not args.quiet, f"eval {args.model}")
    out = args.out or new_run_dir("runs", "eval")
    report = {"command": "eval", "model": args.model, "data": args.data, "limit": args.limit,
              "seed": args.seed, "device": str(device), **result, "versions": versions()}
    write_json(Path(out) / "report.json", report)
    print(f"{args.model} on {args.data}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['images']} images, {result['seconds']:.1f}s)")
    print(f"report: {Path(out) / 'report.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data import resolve_data
    from .models import load_model
    from .report import new_run_dir, stage, versions, write_json
    from .runtime import resolve_device

    device = resolve_device(args.device)
    out = args.out or new_run_dir("runs", "demo")
    stages: dict[str, dict[str, float]] = {}
    print("vitq demo: the shipped reference ViT (cifar10_vit) on the 10,000 CIFAR-10 test images", flush=True)
    with stage(stages, "load", device):
        model = load_model("cifar10_vit")
    with stage(stages, "eval_fp", device):
        fp = _eval_model(model, resolve_data("cifar10"), None, 0, args.batch_size, args.workers, device, not args.quiet, "FP32")
    rows = [("FP32", "-", "-", fp["top1"], fp["top5"], fp["seconds"])]
    report = {"command": "demo", "model": "cifar10_vit", "data": "cifar10", "device": str(device),
              "fp": fp, "stages": stages, "versions": versions()}
    write_json(Path(out) / "report.json", report)
    print()
    print(f"{'model':<10}{'W bits':>8}{'A bits':>8}{'top-1 %':>10}{'top-5 %':>10}{'seconds':>10}")
    for name, w, a, t1, t5, sec in rows:
        print(f"{name:<10}{w:>8}{a:>8}{t1:>10.2f}{t5:>10.2f}{sec:>10.1f}")
    print(f"\nreport: {Path(out) / 'report.json'}")
    return 0


COMMANDS = {"eval": cmd_eval, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VitqError as exc:
        print(f"vitq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
