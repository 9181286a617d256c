"""The allowed values of AIQViT's switches, shared by the config and the modules that read them."""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import VitqError

LOWRANK_MODES = ("merged", "side")
# The research note's names for the two forms (aiqvit.md §2.2) are accepted as aliases.
MODE_ALIASES = {"premerge": "merged", "residual": "side", "merged": "merged", "side": "side"}
LOWRANK_INITS = ("auto", "lora", "svd")
LOWRANK_ROLES = ("qkv", "proj", "fc1", "fc2", "reduction")
SUPERNETS = ("nested", "independent")
RANK_POLICIES = ("search", "fixed", "energy")
CANDIDATE_MODES = ("absolute", "relative")
DEFAULT_CANDIDATES = (0, 10, 20, 40, 60, 80, 100)
DEFAULT_FRACTIONS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def check_choice(field_name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a one-line VitqError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise VitqError(f"{field_name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def canonical_mode(mode: str) -> str:
    """``merged`` / ``side`` from a mode or its alias (``premerge`` / ``residual``); VitqError otherwise."""
    mode = MODE_ALIASES.get(mode, mode)
    check_choice("lowrank mode", mode, LOWRANK_MODES)
    return mode
