"""Per-block checkpoints of a reconstruction run, and the key that says which run they belong to.

A run folder holds ``reconstruction.safetensors`` (the model state after the last finished block)
and ``reconstruction.json`` (the run's key, the finished blocks' summaries and the sha256 of the
tensor file), both written atomically, tensors first. The key covers everything that decides the
result: the calibrated model's weights and quantizer state, the optimisation images, the recipe
and the package versions. Resuming with any of them changed is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import atomic_write_bytes
from ..errors import VitqError

STATE_FILE = "reconstruction.safetensors"
PROGRESS_FILE = "reconstruction.json"
FORMAT = "vitq-reconstruction-v2"


def tensor_digest(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``tensors`` (first 16 hex digits)."""
    h = hashlib.sha256()
    items = sorted(tensors.items()) if isinstance(tensors, dict) else enumerate(tensors)
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ReconConfig fields added after checkpoints of this format were written, with the default that
# reproduces the earlier engine exactly: left out of the key at that default, so such a checkpoint
# still resumes (and a run that sets them differently is another run)
LATER_FIELDS = {"snapshot_images": None, "first_block_iters": None}


def recon_settings(cfg: Any) -> dict[str, Any]:
    """The reconstruction settings as they enter the run key (``asdict`` less later fields at default)."""
    return {k: v for k, v in asdict(cfg).items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def run_key(model: nn.Module, images: torch.Tensor, settings: dict[str, Any]) -> dict[str, str]:
    """The identity of a reconstruction run, part by part (so a mismatch can say which part)."""
    from ..report import versions

    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return {"model": tensor_digest(model.state_dict()), "images": tensor_digest([images]),
            "settings": hashlib.sha256(blob).hexdigest()[:16],
            "versions": hashlib.sha256(json.dumps(versions(), sort_keys=True).encode()).hexdigest()[:16]}


_WHAT = {"model": "another model (or other model weights / calibration)", "images": "other optimisation images",
         "settings": "another recipe or other settings", "versions": "other package versions"}


def load_progress(folder: Path, key: dict[str, str], world_size: int = 1
                  ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]] | None:
    """The finished blocks and the saved state of the run in ``folder``, or None if there is none.

    Raises a one-line :class:`VitqError` when the folder holds another run's checkpoint or a
    damaged one.
    """
    from safetensors.torch import load

    progress, state_file = folder / PROGRESS_FILE, folder / STATE_FILE
    if not progress.is_file():
        return None
    fix = "use a new --out folder, or --restart to discard it"
    try:
        saved = json.loads(progress.read_text())
        blocks, saved_key, digest = saved["blocks"], saved["key"], saved["state_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise VitqError(f"the reconstruction checkpoint {progress} is damaged: {fix}") from None
    if saved.get("format") != FORMAT:
        raise VitqError(f"{progress} is a checkpoint of an older vitq format: {fix}")
    differs = [part for part in key if saved_key.get(part) != key[part]]
    if differs:
        raise VitqError(f"{folder} holds a reconstruction run of {' and '.join(_WHAT[p] for p in differs)}: {fix}")
    saved_world = int(saved.get("world_size", 1))
    if saved_world != world_size:
        # the steps agree only to float rounding across world sizes; resuming would mix the two
        how = "in one process" if saved_world == 1 else f"with torchrun --nproc-per-node {saved_world}"
        raise VitqError(f"{folder} holds a run on {saved_world} process(es), this one has {world_size}: "
                        f"resume it {how}, or {fix}")
    try:
        blob = state_file.read_bytes()
    except OSError:
        raise VitqError(f"the reconstruction checkpoint {state_file} is missing: {fix}") from None
    if hashlib.sha256(blob).hexdigest() != digest:
        raise VitqError(f"the reconstruction checkpoint {state_file} is damaged (checksum mismatch): {fix}")
    try:
        state = load(blob)
    except Exception:  # safetensors has its own error types for damaged files
        raise VitqError(f"the reconstruction checkpoint {state_file} is damaged: {fix}") from None
    return blocks, state


def save_progress(folder: Path, key: dict[str, str], blocks: list[dict[str, Any]], model: nn.Module,
                  world_size: int = 1) -> None:
    """Write the model state and the finished blocks atomically (tensors first, then the index)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(_untie(state))
    atomic_write_bytes(folder / STATE_FILE, lambda fh: fh.write(blob))
    index = {"format": FORMAT, "key": key, "blocks": blocks, "state_sha256": hashlib.sha256(blob).hexdigest(),
             "world_size": world_size}
    atomic_write_bytes(folder / PROGRESS_FILE, lambda fh: fh.write(json.dumps(index, indent=1).encode()))


def discard(folder: Path) -> None:
    """Remove a run's checkpoint (``--restart``)."""
    for name in (PROGRESS_FILE, STATE_FILE):
        (folder / name).unlink(missing_ok=True)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give each key its own copy where they do."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        if ptr != -1:
            seen.add(ptr)
    return out
