"""Calibration settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import VitqError

METHODS = ("minmax", "percentile", "mse", "repq")


@dataclass
class CalibConfig:
    """How the initial quantizer parameters are found (see the module docstring)."""

    method: str = "mse"
    percentile: float = 99.99          # ``percentile``: activation clip percentile
    eq_n: int = 128                    # ``mse``: candidates per grid
    search_rounds: int = 3             # ``mse``: coordinate-descent rounds on the output MSE
    token_wise: bool = True            # expand activation scales per token after the search
    reparam: bool = True               # RepQ-ViT LayerNorm fold for post-LN inputs
    # How much data scores the search's candidates. Every calibration image by default on models the
    # size of the proving ground: fewer made the chosen grid depend on which rows/images were drawn
    # (benchmarks/calibration.md). The caps bound the cost on full-size models on a CPU.
    max_search_tokens: int | None = 16384      # rows of a linear input (None: all)
    max_search_samples: int | None = None      # images for the matmul-operand search (None: all) ...
    max_search_elements: int | None = 1 << 22  # ... and at most this many matmul-output elements
    batch_size: int = 32               # forward batch while capturing inputs

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise VitqError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise VitqError(f"percentile must be in (50, 100], got {self.percentile}")
        for name in ("max_search_tokens", "max_search_samples", "max_search_elements"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VitqError(f"{name} must be positive or None (no cap), got {value}")
        if self.eq_n < 2 or self.search_rounds < 0:
            raise VitqError("eq_n must be >= 2 and search_rounds >= 0")
