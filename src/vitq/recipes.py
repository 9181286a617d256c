"""Recipes: typed configs with named presets.

A :class:`Recipe` says what to quantize (bits, granularities, post-softmax quantizer) and how
(calibration, and in later stages reconstruction). Presets are plain instances; ``get_recipe``
copies one and applies overrides, so a preset is never mutated.

=============  ==============================================================================
preset         what it is
=============  ==============================================================================
``minmax``     observed ranges (per-channel weights, per-tensor / per-head activations)
``percentile`` activations clipped at the 0.01 / 99.99 percentiles, weights at their range
``mse``        FIMA-Q's calibration stage: grid search on the layer-output MSE, coordinate
               descent, RepQ-ViT LayerNorm fold, token-wise scales (fimaq.md §1.3, §2.6)
``repq``       RepQ-ViT: percentile-clip self-MSE search, LayerNorm fold, log-sqrt2 softmax
``qdrop``      ``mse`` calibration, then block reconstruction with the MSE loss and QDrop
``brecq``      the same with BRECQ's squared-gradient Fisher loss (FIMA-Q's ablation baseline)
``fimaq-diag`` the same with FIMA-Q's diagonal Fisher loss (linear in the KL gradient)
``fimaq-lowrank``  the same with FIMA-Q's rank-k Fisher term alone
``fimaq``      FIMA-Q: the diagonal-plus-low-rank (DPLR) Fisher loss (the paper's method)
``fimaq+dfq``  FIMA-Q with AIQViT's dynamic focusing quantizer (learned [b1, b2]) on post-softmax attention
``aiqvit``     AIQViT on its own base: RepQ-ViT calibration, MSE reconstruction without AdaRound,
               DFQ, low-rank compensation with searched ranks, curriculum (aiqvit.md §1.2)
``fimaq+lrc``  FIMA-Q plus AIQViT's low-rank compensation with searched ranks
``fimaq+aiq``  FIMA-Q plus all of AIQViT (DFQ, compensation, curriculum)
=============  ==============================================================================

Reconstruction presets use the paper's budget (20,000 iterations per block, 1024 optimisation
images, batch 32, k=5, T=20, QDrop 0.5); lower ``iters`` for a quick run.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .adapters import QuantSpec
from .aiqvit import AIQConfig
from .calibration import CalibConfig
from .errors import VitqError
from .quantizers import validate_bits
from .reconstruction import ReconConfig


@dataclass
class Recipe:
    """Everything that decides a quantized model, as one typed config."""

    name: str = "mse"
    w_bits: int = 4
    a_bits: int = 4
    head_w_bits: int | None = None
    head_a_bits: int | None = None
    patch_embed_w_bits: int | None = None
    quant_image_input: bool = False
    softmax_quantizer: str = "uniform"
    dfq_granularity: str = "layer"
    dfq_below: str = "clip"
    matmul_granularity: str = "head"
    calib_size: int = 128
    seed: int = 0
    calibration: CalibConfig = field(default_factory=CalibConfig)
    reconstruction: ReconConfig | None = None
    aiq: AIQConfig | None = None

    def __post_init__(self) -> None:
        validate_bits(self.w_bits, "w_bits")
        validate_bits(self.a_bits, "a_bits")
        if self.aiq is not None and self.reconstruction is None:
            raise VitqError("AIQViT's low-rank compensation and curriculum need a reconstruction stage")
        if self.calib_size <= 0:
            raise VitqError(f"calib_size must be positive, got {self.calib_size}")
        self.quant_spec()  # validates the remaining choices

    def quant_spec(self) -> QuantSpec:
        """The :class:`QuantSpec` that ``prepare`` needs."""
        dfq = self.aiq is not None and self.aiq.dfq
        return QuantSpec(
            w_bits=self.w_bits, a_bits=self.a_bits, head_w_bits=self.head_w_bits, head_a_bits=self.head_a_bits,
            patch_embed_w_bits=self.patch_embed_w_bits, quant_image_input=self.quant_image_input,
            softmax_quantizer="dfq" if dfq else self.softmax_quantizer,
            dfq_granularity=self.aiq.dfq_granularity if dfq else self.dfq_granularity,
            dfq_below=self.aiq.dfq_below if dfq else self.dfq_below, matmul_granularity=self.matmul_granularity,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Recipe] = {
    "minmax": Recipe(name="minmax", calibration=CalibConfig(method="minmax", reparam=False, token_wise=False)),
    "percentile": Recipe(name="percentile",
                         calibration=CalibConfig(method="percentile", reparam=False, token_wise=False)),
    "mse": Recipe(name="mse", calibration=CalibConfig(method="mse")),
    "repq": Recipe(name="repq", softmax_quantizer="logsqrt2", matmul_granularity="tensor",
                   calibration=CalibConfig(method="repq", reparam=True, token_wise=False)),
    "qdrop": Recipe(name="qdrop", reconstruction=ReconConfig(loss="mse")),
    "brecq": Recipe(name="brecq", reconstruction=ReconConfig(loss="brecq")),
    "fimaq-diag": Recipe(name="fimaq-diag", reconstruction=ReconConfig(loss="fimaq_diag")),
    "fimaq-lowrank": Recipe(name="fimaq-lowrank", reconstruction=ReconConfig(loss="fimaq_lowrank")),
    "fimaq": Recipe(name="fimaq", reconstruction=ReconConfig(loss="fimaq_dplr")),
    "fimaq+dfq": Recipe(name="fimaq+dfq", softmax_quantizer="dfq", reconstruction=ReconConfig(loss="fimaq_dplr")),
    # AIQViT on its own base (aiqvit.md §1.2): RepQ-ViT quantizers, block reconstruction with the MSE
    # loss on the quantized-prefix input, weights frozen (no AdaRound) and corrected only through
    # the low-rank factors, DFQ on post-softmax attention, searched ranks, curriculum.
    "aiqvit": Recipe(name="aiqvit", calibration=CalibConfig(method="repq", reparam=True, token_wise=False),
                     reconstruction=ReconConfig(loss="mse", adaround=False, input_mode="qinp", iters=1000,
                                                learn_act_scales=False),
                     aiq=AIQConfig()),
    "fimaq+lrc": Recipe(name="fimaq+lrc", reconstruction=ReconConfig(loss="fimaq_dplr"),
                        aiq=AIQConfig(dfq=False, curriculum=False)),
    "fimaq+aiq": Recipe(name="fimaq+aiq", reconstruction=ReconConfig(loss="fimaq_dplr"), aiq=AIQConfig()),
}


def recipe_names() -> list[str]:
    return sorted(PRESETS)


def get_recipe(recipe: str | Recipe, **overrides: Any) -> Recipe:
    """A copy of a preset (or of ``recipe``) with ``overrides`` applied.

    Overrides name a :class:`Recipe` field (``w_bits=3``), a reconstruction field (``iters=500``,
    ``rank=15``, ``batch_size=32``), a calibration field (``eq_n=64``; its batch is
    ``calib_batch_size``) or an AIQViT field with an ``aiq_`` prefix (``aiq_lrc_mode="side"``). ``None`` values are ignored so CLI defaults pass through.
    """
    if isinstance(recipe, Recipe):
        base = copy.deepcopy(recipe)
    else:
        if recipe not in PRESETS:
            raise VitqError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipe_names())}")
        base = copy.deepcopy(PRESETS[recipe])
    top = {f.name for f in fields(Recipe)} - {"calibration", "reconstruction", "aiq"}
    recon_fields = {f.name for f in fields(ReconConfig)}
    calib_fields = {f.name for f in fields(CalibConfig)}
    aiq_fields = {f.name for f in fields(AIQConfig)}
    aiq_values: dict[str, Any] = {}
    top_values: dict[str, Any] = {}
    recon_values: dict[str, Any] = {}
    calib_values: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in top:
            top_values[key] = value
        elif key == "calib_batch_size":
            calib_values["batch_size"] = value
        elif key.startswith("aiq_") and key[4:] in aiq_fields:
            if base.aiq is None:
                raise VitqError(f"recipe {base.name!r} has no AIQViT stage, so {key!r} does not apply: "
                                f"use one of {', '.join(n for n in recipe_names() if PRESETS[n].aiq)}")
            aiq_values[key[4:]] = value
        elif key in recon_fields:
            if base.reconstruction is None:
                raise VitqError(f"recipe {base.name!r} has no reconstruction stage, so {key!r} does not apply: "
                                f"use one of {', '.join(n for n in recipe_names() if PRESETS[n].reconstruction)}")
            recon_values[key] = value
        elif key in calib_fields:
            calib_values[key] = value
        else:
            raise VitqError(f"unknown recipe option {key!r}")
    if "seed" in top_values:
        calib_values.setdefault("seed", top_values["seed"])
    merged_calib = CalibConfig(**{**asdict(base.calibration), **calib_values})
    merged_recon = None
    if base.reconstruction is not None:
        merged_recon = ReconConfig(**{**asdict(base.reconstruction), **recon_values})
    merged_aiq = AIQConfig(**{**asdict(base.aiq), **aiq_values}) if base.aiq is not None else None
    return Recipe(**{**{f.name: getattr(base, f.name) for f in fields(Recipe)}, **top_values,
                     "calibration": merged_calib, "reconstruction": merged_recon, "aiq": merged_aiq})


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved with :meth:`Recipe.to_dict`."""
    data = dict(data)
    calib = CalibConfig(**data.pop("calibration", {}))
    recon = data.pop("reconstruction", None)
    aiq = data.pop("aiq", None)
    return Recipe(**data, calibration=calib, reconstruction=ReconConfig(**recon) if recon else None,
                  aiq=AIQConfig(**aiq) if aiq else None)
