"""Calibration settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import VitqError

METHODS = ("minmax", "percentile", "mse", "repq")
COMPILE = ("auto", "on", "off")
# auto compiles the mse search's elementwise kernels from this many calibration images: below,
# the search takes a minute or two and the one-off compilation would not pay
COMPILE_FROM_IMAGES = 256


@dataclass
class CalibConfig:
    """How the initial quantizer parameters are found (see the module docstring)."""

    method: str = "mse"
    percentile: float = 99.99          # ``percentile``: activation clip percentile
    eq_n: int = 128                    # ``mse``: candidates per grid
    search_rounds: int = 3             # ``mse``: coordinate-descent rounds on the output MSE
    # ``mse``: scales of a second, finer grid around each linear-layer winner (0: the official
    # one-level grid), over ``fine_grid_span`` coarse scales either side. Why: see ``mse_search._refined``.
    fine_grid: int = 0
    fine_grid_span: int = 1
    # Add each linear layer's mean output error on the calibration data back as a bias in the quantized
    # model (empirical bias correction, Nagel et al. 2019), and score the mse search's candidates on the
    # error left after it. Why: a coherent shift of every token's output costs accuracy far beyond its
    # share of the output MSE (post-GELU inputs whose negative values clip to 0: benchmarks/calib_heldout.md).
    bias_correction: bool = False
    token_wise: bool = True            # expand activation scales per token after the search
    reparam: bool = True               # RepQ-ViT LayerNorm fold for post-LN inputs
    # How much data scores the search's candidates. Every calibration image by default on models the
    # size of the proving ground: fewer made the chosen grid depend on which rows/images were drawn
    # (benchmarks/calibration.md). The caps bound the cost on full-size models on a CPU.
    max_search_tokens: int | None = 16384      # rows of a linear input (None: all)
    max_search_samples: int | None = None      # images for the matmul-operand search (None: all) ...
    max_search_elements: int | None = 1 << 22  # ... and at most this many matmul-output elements
    batch_size: int = 32               # forward batch while capturing inputs
    compile_kernels: str = "auto"      # ``mse``: torch.compile the search's kernels (auto: from 256 images)

    def compiles(self, n_images: int) -> bool:
        """Whether the search's elementwise kernels go through torch.compile for ``n_images`` images."""
        return self.method == "mse" and (self.compile_kernels == "on" or (
            self.compile_kernels == "auto" and n_images >= COMPILE_FROM_IMAGES))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise VitqError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise VitqError(f"percentile must be in (50, 100], got {self.percentile}")
        for name in ("max_search_tokens", "max_search_samples", "max_search_elements"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VitqError(f"{name} must be positive or None (no cap), got {value}")
        if self.compile_kernels not in COMPILE:
            raise VitqError(f"compile_kernels must be one of {', '.join(COMPILE)}, got {self.compile_kernels!r}")
        if self.eq_n < 2 or self.search_rounds < 0:
            raise VitqError("eq_n must be >= 2 and search_rounds >= 0")
        if self.fine_grid < 0 or self.fine_grid == 1:
            raise VitqError(f"fine_grid must be 0 (off) or >= 2, got {self.fine_grid}")
        if self.fine_grid_span < 1:
            raise VitqError(f"fine_grid_span must be >= 1, got {self.fine_grid_span}")
