"""Device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from .errors import VitqError


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VitqError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitqError(f"device {name} asked for but CUDA is not available here: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise VitqError(f"device {name} is not supported: use cpu or cuda")
    return device


def seed_everything(seed: int) -> None:
    """Fix every random generator vitq uses, so the same command gives the same numbers.

    (Python's string hashing is fixed at interpreter start, so setting PYTHONHASHSEED here would
    do nothing; vitq's results do not depend on set iteration order.)
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
