"""What every export format shares: reading the quantized model to export, and writing the output
folder atomically (built beside ``out`` and renamed into place, with the user's umask)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ..adapters import architecture_of
from ..data import atomic_write_bytes, current_umask
from ..errors import VitqError
from ..models import read_json, resolve_model_folder

ARCH_KEYS = ("timm_name", "arch_kwargs", "family")
# the format names an export folder records (config.json for packed, export.json for ONNX)
EXPORT_FORMATS = ("vitq-packed-v1", "vitq-onnx-v1")


def model_folder(path: Path) -> Path:
    """The model folder of a ``vitq quantize`` run folder or model folder (as ``vitq.load_model``)."""
    if not path.exists():
        raise VitqError(f"{path} does not exist: pass a `vitq quantize` run folder or its model/ folder")
    if not path.is_dir():
        raise VitqError(f"{path} is not a folder: pass a `vitq quantize` run folder or its model/ folder")
    path = resolve_model_folder(path)
    if not (path / "config.json").is_file():
        raise VitqError(f"{path} is not a vitq run or model folder (no config.json): pass a `vitq quantize` "
                        "run folder or its model/ folder")
    return path


def load_source(source: nn.Module | str | Path, architecture: dict[str, Any] | None,
                need_architecture: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """(the quantized model, how to rebuild its float model) from a model or a folder
    (``need_architecture=False``: an empty dict when the model is given, for formats that keep the graph)."""
    if isinstance(source, nn.Module):
        if getattr(source, "vitq_config", None) is None:
            raise VitqError("this model is not quantized (no vitq_config): quantize it with vitq.quantize "
                            "before exporting")
        if architecture is None:
            architecture = architecture_of(source) if need_architecture else {}
        return source, architecture
    folder = model_folder(Path(source).expanduser())
    config = read_json(folder / "config.json")
    fmt = str(config.get("format"))
    if fmt == "vitq-packed-v1":
        from .packed import load_packed

        model = load_packed(folder)
    elif fmt.startswith("vitq-quantized"):
        from ..api import load_quantized

        model = load_quantized(folder)  # says how to fix an older format
    else:
        raise VitqError(f"{folder} holds a float model, not a quantized one: quantize it first "
                        f"(`vitq quantize --model {folder} ...`) and export the run folder")
    # the folder's own record rebuilds exactly (timm's pretrained_cfg alone may miss constructor arguments)
    arch = architecture if architecture is not None else {k: config[k] for k in ARCH_KEYS if k in config}
    return model, arch


def _recorded_format(folder: Path) -> str | None:
    for name in ("config.json", "export.json"):
        try:
            fmt = json.loads((folder / name).read_text()).get("format")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if fmt in EXPORT_FORMATS:
            return fmt
    return None


def check_out(out: Path) -> None:
    """Refuse an output that is neither absent, an empty folder nor a previous vitq export."""
    if not out.exists():
        return
    if out.is_dir() and (not any(out.iterdir()) or _recorded_format(out) is not None):
        return
    raise VitqError(f"{out} exists and is not an empty folder or a previous vitq export: "
                    "choose another --out or remove it")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; a previous export there goes only once it is ready."""
    check_out(out)  # again: something else may have appeared there while the model was loading
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, old / "previous")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """Build the export in a fresh folder beside ``out`` (``fill(tmp)`` writes its files), then rename it.

    A killed export leaves no partial ``out``; files and folder get the user's umask.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        fill(tmp)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(json.dumps(data, indent=2).encode()))
