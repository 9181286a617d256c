"""Reading run folders: the report.json that `vitq quantize` / `vitq demo` leave, checked for the
shape the page reads, so a damaged file is a one-line error and not a traceback halfway through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import VitqError

RUN_HINT = "give a folder written by `vitq quantize --out DIR` or `vitq demo --out DIR`"


def _damaged(path: Path, why: str) -> VitqError:
    return VitqError(f"{path} is damaged ({why}): run the command that wrote it again")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The report.json of a run folder, checked for the shape the page reads; VitqError otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitqError(f"{run_dir} is not a folder: {RUN_HINT}")
    path = run_dir / "report.json"
    if not path.is_file():
        raise VitqError(f"{run_dir} is not a vitq run (it has no report.json): {RUN_HINT}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except UnicodeDecodeError:
        raise _damaged(path, "not UTF-8 text") from None
    if not isinstance(report, dict):
        raise _damaged(path, "not a JSON object")
    for key in ("fp_top1", "fp_top5", "calibrated_top1", "quant_top1", "quant_top5", "w_bits", "a_bits"):
        if report.get(key) is not None and not is_number(report[key]):
            raise _damaged(path, f"{key} is not a number")
    for key in ("config", "stages", "versions", "fp", "calibrated", "quant", "calibration"):
        if report.get(key) is not None and not isinstance(report[key], dict):
            raise _damaged(path, f"{key} is not an object")
    blocks = report.get("reconstruction_blocks")
    if blocks is not None and not (isinstance(blocks, list) and all(
            isinstance(b, dict) and isinstance(b.get("block"), str) and isinstance(b.get("history", {}), dict)
            for b in blocks)):
        raise _damaged(path, "reconstruction_blocks is not a list of block summaries")
    if not all(isinstance(s, dict) for s in (report.get("stages") or {}).values()):
        raise _damaged(path, "stages is not a table of stages")
    return report


def as_float(value: Any) -> float:
    """A number for plotting: NaN where the report holds none."""
    return float(value) if is_number(value) else float("nan")


def bits_label(w: Any, a: Any) -> str:
    return f"W{w}/A{a}"
