"""The results file shared by the resumable sweeps (fimaq.py, aiqvit.py).

A sweep's JSON holds ``cells`` (one entry per finished cell) plus whatever the script adds; a
rerun skips finished cells, and two sweeps may write the same file at once (the machine runs
two single-threaded sweeps side by side), so saving keeps the cells the other one wrote.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from vitq.data import atomic_write_bytes


def open_results(path: Path, all_groups: Sequence[str], requested: Sequence[str]) -> tuple[dict, list[str]]:
    """The results so far and every group they now cover (held before or requested now), in
    ``all_groups`` order, so the recorded command reproduces the whole table. A file from before
    groups were recorded held only the first group."""
    results = json.loads(path.read_text()) if path.is_file() else {"cells": {}}
    held = results.get("groups", [all_groups[0]] if results["cells"] else [])
    groups = [g for g in all_groups if g in set(requested) | set(held)]
    results["groups"] = groups
    return results, groups


def save_results(path: Path, results: dict, md_path: Path, summarise: Callable[[dict], str]) -> None:
    """Write the JSON and its markdown table atomically, keeping cells, groups and notes another sweep wrote
    meanwhile (but not the keys this sweep retired on purpose, listed in ``results["retired_keys"]``).
    A note edited since this sweep started is kept in both versions: edit notes when no sweep runs."""
    retired = set(results.get("retired_keys", ()))
    if path.is_file():
        on_disk = json.loads(path.read_text())
        for key, cell in on_disk["cells"].items():
            if key not in retired:
                results["cells"].setdefault(key, cell)
        # groups another sweep added meanwhile stay recorded (after this sweep's own)
        if "groups" in results:
            results["groups"] += [g for g in on_disk.get("groups", []) if g not in results["groups"]]
        # notes added meanwhile (by hand or by another sweep) stay, after this sweep's own
        added = [n for n in on_disk.get("notes", []) if n not in results.get("notes", [])]
        if added:
            results["notes"] = results.get("notes", []) + added
    atomic_write_bytes(path, lambda fh: fh.write(json.dumps(results, indent=2).encode()))
    atomic_write_bytes(md_path, lambda fh: fh.write(summarise(results).encode()))
