"""The ``vitq`` command line: a thin layer over the Python API.

User mistakes surface as one line, ``vitq: error: <what and how to fix it>``,
with exit code 2; never a traceback.

Layout: :mod:`.parser` (arguments, and the recipe they ask for), :mod:`.commands` (one function per
command), here the dispatch (one process, or one rank under torchrun).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..errors import VitqError
from .commands import cmd_demo, cmd_eval, cmd_export, cmd_quantize, cmd_report
from .parser import build_parser, recipe_from_args

__all__ = ["main", "build_parser", "recipe_from_args"]

COMMANDS = {"eval": cmd_eval, "quantize": cmd_quantize, "demo": cmd_demo, "export": cmd_export,
            "report": cmd_report}


# commands that share their work over torch.distributed under torchrun
DISTRIBUTED_COMMANDS = ("eval", "quantize", "demo")


def _run_distributed(args: argparse.Namespace) -> int:
    """One rank of ``torchrun --nproc-per-node N -m vitq COMMAND``: rank 0 prints and writes, the others compute."""
    import contextlib

    from .. import distributed
    from ..runtime import resolve_device

    if args.command not in DISTRIBUTED_COMMANDS:
        raise VitqError(f"`vitq {args.command}` runs in one process: start it without torchrun")
    args.device = str(distributed.init_from_env(resolve_device(args.device)))
    try:
        with distributed.active() as dist:
            distributed.check_same(sys.argv[1:], "the command line")
            if dist is None or dist.is_main:
                return COMMANDS[args.command](args)
            args.quiet = True
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                return COMMANDS[args.command](args)
    finally:
        distributed.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    from .. import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if distributed.launched_by_torchrun():
            return _run_distributed(args)
        return COMMANDS[args.command](args)
    except distributed.RankFailure as exc:
        print(f"vitq: error: {exc}", file=sys.stderr)
        return 3
    except VitqError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the error: rank 0 says it
            print(f"vitq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitq: interrupted", file=sys.stderr)
        return 130

