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
``fimaq-lowrank``  the same with the official code's ``fisher_lr`` (rank-one terms, no inverse)
``fimaq-dplr-lowrank``  the same with DPLR's rank-k term alone (``G^T (D D^T)^-1 G``), no diagonal
``fimaq``      FIMA-Q: the diagonal-plus-low-rank (DPLR) Fisher loss (the paper's method)
``fimaq+global``  FIMA-Q plus a GLF-Q-style global term: the block output through the float rest of
               the network, matched at the penultimate feature (every 4th iteration)
``fimaq+refine``  FIMA-Q, then end-to-end refinement: all activation scales together on the KL to the
               float logits, the learned rounding kept (``refine.rounding="soft"`` learns it too)
``mse+rot``    ``mse`` on rotated inputs: every quantized Linear's input and weight rotated by a
               randomised Hadamard matrix first (vitq.rotation), outlier channels spread out
``fimaq-diag+rot``  FIMA-Q's diagonal loss on rotated inputs (the same rotation, then the blocks);
               the rotated recipe chosen on held-out images (benchmarks/beyond.md)
``fimaq-diag+rot+log``  the same with a logarithmic post-softmax grid (log-sqrt2 from 4 bits, log2
               below): the post-softmax attention carries much of cifar10_vit's W4A4 error
``fimaq+rot+log``  FIMA-Q's DPLR loss with the same rotation and post-softmax grid: the best
               ``cifar10_swin`` W3A3 recipe measured, at 1000 iterations (benchmarks/beyond.md)
``fimaq+dfq``  FIMA-Q with AIQViT's dynamic focusing quantizer (learned [b1, b2]) on post-softmax attention
``aiqvit``     AIQViT on its own base: RepQ-ViT calibration, MSE reconstruction without AdaRound,
               DFQ, low-rank compensation with searched ranks, curriculum (aiqvit.md §1.2)
``fimaq+lrc``  FIMA-Q plus AIQViT's low-rank compensation with searched ranks
``fimaq+aiq``  FIMA-Q plus all of AIQViT (DFQ, compensation, curriculum)
=============  ==============================================================================

Reconstruction presets use the paper's budget (20,000 iterations per block, 1024 optimisation
images, batch 32, k=5, T=20, QDrop 0.5); lower ``iters`` for a quick run.

A ``target`` says where the model will run: ``simulated`` (default: any quantizer), ``ort-int8``
(onnxruntime's integer kernels) or ``ort-w4`` (4-bit weight-only). ``get_recipe`` fits the preset to
it (e.g. per-tensor attention operands for ``ort-int8``) unless the caller set that field, and
:func:`target_changes` says in words what changed; an explicit setting the target cannot run is refused.

Overrides are plain ``dataclasses.replace`` calls: top-level fields by name, nested configs as
dicts of their fields (or whole config objects)::

    get_recipe("fimaq", w_bits=3, reconstruction={"iters": 500, "rank": 15})
    get_recipe("fimaq+dfq", softmax_options={"granularity": "head"})
    get_recipe("aiqvit", softmax_quantizer="uniform", aiq={"curriculum": False})
    get_recipe("fimaq", w_bits=8, a_bits=8, target="ort-int8")
    get_recipe("mse", refine={"iters": 400, "rounding": "soft"})  # calibration, then end-to-end refinement
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from .adapters import QuantSpec
from .calibration import CalibConfig
from .errors import VitqError
from .methods.aiqvit import AIQConfig
from .quantizers import validate_bits
from .reconstruction import ReconConfig
from .reconstruction.refine import RefineConfig
from .rotation import check_rotation

# nested configs: the Recipe field and its dataclass
_NESTED = {"calibration": CalibConfig, "reconstruction": ReconConfig, "aiq": AIQConfig, "refine": RefineConfig}

# Where the model will run. "simulated": any quantizer vitq has (exported as --profile exact);
# "ort-int8": onnxruntime's integer kernels (per-tensor uniform activations with zero points inside
# their codes, uniform post-softmax; --profile int8); "ort-w4": 4-bit weight-only (activations FP,
# weights <= 4 bits; --profile w4). A target constrains calibration and reconstruction, so the
# accuracy vitq reports is the deployed model's.
TARGETS = ("simulated", "ort-int8", "ort-w4")


def target_conflicts(recipe: Recipe) -> list[str]:
    """What in ``recipe`` its target cannot run (empty when it fits)."""
    problems = []
    if recipe.target == "ort-int8":
        if recipe.matmul_granularity != "tensor":
            problems.append("attention matmul operands must be per tensor (matmul_granularity='tensor')")
        if recipe.softmax_quantizer != "uniform":
            problems.append(f"a {recipe.softmax_quantizer} post-softmax quantizer has no integer kernel: use uniform")
        if recipe.calibration.token_wise:
            problems.append("token-wise activation scales have no integer kernel (calibration token_wise=False)")
        if recipe.aiq is not None and recipe.aiq.lrc and recipe.aiq.lrc_mode == "side":
            problems.append("a low-rank side branch stays float: use lrc_mode='merged'")
    if recipe.target == "ort-w4":
        if validate_bits(recipe.a_bits) not in (None, 16, 32):
            problems.append(f"weight-only: activations stay float (a_bits 32, not {recipe.a_bits})")
        for name in ("w_bits", "head_w_bits"):
            bits = getattr(recipe, name)
            if bits is not None and bits not in (16, 32) and bits > 4:
                problems.append(f"{name} must be at most 4 for 4-bit kernels, got {bits}")
    return problems


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
    softmax_quantizer: str = "uniform"   # uniform | log2 | logsqrt2 | log (by bits) | dfq (AIQViT's learned interval)
    softmax_options: dict[str, Any] = field(default_factory=dict)  # e.g. dfq: granularity, below, init
    matmul_granularity: str = "head"
    calib_size: int = 128
    seed: int = 0
    calibration: CalibConfig = field(default_factory=CalibConfig)
    reconstruction: ReconConfig | None = None
    aiq: AIQConfig | None = None
    refine: RefineConfig | None = None   # end-to-end refinement after reconstruction (or calibration)
    target: str = "simulated"
    # orthogonal rotation of every quantized Linear's input (vitq.rotation): none | hadamard | orthogonal
    rotation: str = "none"
    # with a rotation: rotate the attention matmuls' operands (q, k, v) too, by one of the head width
    rotate_attention: bool = False

    def __post_init__(self) -> None:
        validate_bits(self.w_bits, "w_bits")
        validate_bits(self.a_bits, "a_bits")
        if self.target not in TARGETS:
            raise VitqError(f"unknown target {self.target!r}: choose one of {', '.join(TARGETS)}")
        for problem in target_conflicts(self):
            raise VitqError(f"target {self.target}: {problem}")
        if self.aiq is not None and self.reconstruction is None:
            raise VitqError("AIQViT's low-rank compensation and curriculum need a reconstruction stage")
        if self.calib_size <= 0:
            raise VitqError(f"calib_size must be positive, got {self.calib_size}")
        check_rotation(self.rotation)
        if self.rotate_attention and self.rotation == "none":
            raise VitqError("rotate_attention needs a rotation: set rotation='hadamard' (--rotation hadamard)")
        self.quant_spec()  # validates the remaining choices

    def quant_spec(self) -> QuantSpec:
        """The :class:`QuantSpec` that ``prepare`` needs."""
        return QuantSpec(
            w_bits=self.w_bits, a_bits=self.a_bits, head_w_bits=self.head_w_bits, head_a_bits=self.head_a_bits,
            patch_embed_w_bits=self.patch_embed_w_bits, quant_image_input=self.quant_image_input,
            softmax_quantizer=self.softmax_quantizer, softmax_options=dict(self.softmax_options),
            matmul_granularity=self.matmul_granularity,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Recipe] = {
    "minmax": Recipe(name="minmax", calibration=CalibConfig(method="minmax", reparam=False, token_wise=False)),
    "percentile": Recipe(name="percentile",
                         calibration=CalibConfig(method="percentile", reparam=False, token_wise=False)),
    # bias correction: robust to the calibration subset, +1.5 / +1.3 points at W4A4 / W3A3
    # (benchmarks/calib_heldout.md); the reconstruction recipes keep their measured calibration
    # (CalibConfig's default, no correction)
    "mse": Recipe(name="mse", calibration=CalibConfig(method="mse", bias_correction=True)),
    "repq": Recipe(name="repq", softmax_quantizer="logsqrt2", matmul_granularity="tensor",
                   calibration=CalibConfig(method="repq", reparam=True, token_wise=False)),
    "qdrop": Recipe(name="qdrop", reconstruction=ReconConfig(loss="mse")),
    "brecq": Recipe(name="brecq", reconstruction=ReconConfig(loss="brecq")),
    "fimaq-diag": Recipe(name="fimaq-diag", reconstruction=ReconConfig(loss="fimaq_diag")),
    "fimaq-lowrank": Recipe(name="fimaq-lowrank", reconstruction=ReconConfig(loss="fimaq_lowrank")),
    "fimaq-dplr-lowrank": Recipe(name="fimaq-dplr-lowrank", reconstruction=ReconConfig(loss="fimaq_dplr_lowrank")),
    "fimaq": Recipe(name="fimaq", reconstruction=ReconConfig(loss="fimaq_dplr")),
    # rotated linear inputs (vitq.rotation, benchmarks/beyond.md's rotation group)
    "mse+rot": Recipe(name="mse+rot", rotation="hadamard"),
    "fimaq-diag+rot": Recipe(name="fimaq-diag+rot", rotation="hadamard",
                             reconstruction=ReconConfig(loss="fimaq_diag")),
    # the same with a logarithmic post-softmax grid (log-sqrt2 from 4 bits, log2 below; scales fixed,
    # QDropped): the post-softmax attention carries much of cifar10_vit's W4A4 error (benchmarks/error_sources.md)
    "fimaq-diag+rot+log": Recipe(name="fimaq-diag+rot+log", rotation="hadamard", softmax_quantizer="log",
                                 reconstruction=ReconConfig(loss="fimaq_diag")),
    # the same rotation and grid under FIMA-Q's DPLR loss (beyond.md group swindplr: at 1000 iterations,
    # with 200 of refinement, the best held-out and test means on cifar10_swin W3A3; the diagonal
    # loss gained nothing there from 250 to 1000)
    "fimaq+rot+log": Recipe(name="fimaq+rot+log", rotation="hadamard", softmax_quantizer="log",
                            reconstruction=ReconConfig(loss="fimaq_dplr")),
    "fimaq+dfq": Recipe(name="fimaq+dfq", softmax_quantizer="dfq", reconstruction=ReconConfig(loss="fimaq_dplr")),
    # beyond FIMA-Q (issue 15, benchmarks/beyond.md): a GLF-Q-style global term in every block's
    # loss; an end-to-end refinement stage after the blocks
    "fimaq+global": Recipe(name="fimaq+global", reconstruction=ReconConfig(loss="fimaq_dplr", global_weight=1.0,
                                                                         global_every=4)),
    "fimaq+refine": Recipe(name="fimaq+refine", reconstruction=ReconConfig(loss="fimaq_dplr"), refine=RefineConfig()),
    # AIQViT on its own base (aiqvit.md §1.2): RepQ-ViT quantizers, block reconstruction with the MSE
    # loss on the quantized-prefix input, weights frozen (no AdaRound) and corrected only through
    # the low-rank factors, DFQ on post-softmax attention, searched ranks, curriculum.
    "aiqvit": Recipe(name="aiqvit", softmax_quantizer="dfq",
                     calibration=CalibConfig(method="repq", reparam=True, token_wise=False),
                     reconstruction=ReconConfig(loss="mse", adaround=False, input_mode="qinp", iters=1000,
                                                learn_act_scales=False),
                     aiq=AIQConfig()),
    "fimaq+lrc": Recipe(name="fimaq+lrc", reconstruction=ReconConfig(loss="fimaq_dplr"),
                        aiq=AIQConfig(curriculum=False)),
    "fimaq+aiq": Recipe(name="fimaq+aiq", softmax_quantizer="dfq", reconstruction=ReconConfig(loss="fimaq_dplr"),
                        aiq=AIQConfig()),
}


def _fit_target(base: Recipe, changes: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The further changes that make ``base`` + ``changes`` fit its target, except for settings the caller
    set (``explicit``: field names, and ``calibration.token_wise``); a conflict left is refused by Recipe."""
    target = changes.get("target", base.target)
    fit: dict[str, Any] = {}
    if target == "ort-int8":
        if "matmul_granularity" not in explicit:
            fit["matmul_granularity"] = "tensor"
        if "softmax_quantizer" not in explicit:
            fit["softmax_quantizer"], fit["softmax_options"] = "uniform", {}
        if "calibration.token_wise" not in explicit:
            fit["calibration"] = dataclasses.replace(changes.get("calibration", base.calibration), token_wise=False)
    if target == "ort-w4" and "a_bits" not in explicit:
        fit["a_bits"] = 32
    return fit


def target_changes(recipe: Recipe) -> list[str]:
    """In words, what the target changed against the preset of the same name (for reports and the CLI)."""
    preset = PRESETS.get(recipe.name)
    if preset is None or recipe.target == "simulated":
        return []
    out = []
    if preset.matmul_granularity != recipe.matmul_granularity:
        out.append(f"attention matmul operands per {recipe.matmul_granularity} (preset: per {preset.matmul_granularity})")
    if preset.softmax_quantizer != recipe.softmax_quantizer:
        out.append(f"post-softmax quantizer {recipe.softmax_quantizer} (preset: {preset.softmax_quantizer})")
    if preset.calibration.token_wise and not recipe.calibration.token_wise:
        out.append("per-tensor activation scales (preset: token-wise)")
    if recipe.target == "ort-int8":
        out.append("activation zero points kept inside their codes (ranges widened to include 0 where needed)")
    if validate_bits(preset.a_bits) not in (None, 16, 32) and recipe.a_bits in (None, 16, 32):
        out.append("activations float (weight-only)")
    return out


def recipe_names() -> list[str]:
    return sorted(PRESETS)


def _with_stage(name: str, recipe: Recipe) -> str:
    return ", ".join(n for n in recipe_names() if getattr(PRESETS[n], name) is not None)


def _replace_nested(recipe: Recipe, name: str, value: Any) -> Any:
    """The new value of nested config ``name``: a dict of its fields is merged into the current one."""
    cls = _NESTED[name]
    if value is None or isinstance(value, cls):
        return copy.deepcopy(value)
    if not isinstance(value, dict):
        raise VitqError(f"{name} must be a {cls.__name__}, a dict of its fields or None, got {type(value).__name__}")
    current = getattr(recipe, name)
    if current is None:
        if name in ("calibration", "refine"):  # a stage any recipe can have
            current = cls()
        else:
            raise VitqError(f"recipe {recipe.name!r} has no {name} stage, so {', '.join(value)} cannot be set: "
                            f"use one of {_with_stage(name, recipe)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise VitqError(f"unknown {name} option {unknown[0]!r}: choose from {', '.join(sorted(known))}")
    return dataclasses.replace(current, **value)


def get_recipe(recipe: str | Recipe, **overrides: Any) -> Recipe:
    """A copy of a preset (or of ``recipe``) with ``overrides`` applied (``dataclasses.replace``).

    Top-level :class:`Recipe` fields by name (``w_bits=3``); nested configs (``calibration``,
    ``reconstruction``, ``aiq``, ``refine``) as a dict of the fields to change or a whole config
    object (``calibration`` and ``refine`` may be added to any recipe, e.g. ``refine={"iters": 200}``).
    ``None`` values are ignored so CLI defaults pass through; to drop a stage, use
    ``dataclasses.replace(recipe, aiq=None)``. The preset is never mutated.
    """
    if isinstance(recipe, Recipe):
        base = copy.deepcopy(recipe)
    else:
        if recipe not in PRESETS:
            raise VitqError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipe_names())}")
        base = copy.deepcopy(PRESETS[recipe])
    known = {f.name for f in dataclasses.fields(Recipe)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in known:
            raise VitqError(f"unknown recipe option {key!r}: choose from {', '.join(sorted(known))}")
        changes[key] = _replace_nested(base, key, value) if key in _NESTED else value
    if changes.get("target", base.target) != "simulated":
        cal = overrides.get("calibration")
        explicit = set(changes) | ({"calibration.token_wise"} if isinstance(cal, CalibConfig)
                                   or (isinstance(cal, dict) and "token_wise" in cal) else set())
        changes.update(_fit_target(base, changes, explicit))
    return dataclasses.replace(base, **changes)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved with :meth:`Recipe.to_dict`."""
    data = dict(data)
    nested = {name: data.pop(name, None) for name in _NESTED}
    try:
        return Recipe(**data, **{name: (cls(**nested[name]) if nested[name] else None) if name != "calibration"
                                 else cls(**(nested[name] or {})) for name, cls in _NESTED.items()})
    except TypeError as exc:
        raise VitqError(f"this recipe was saved by another vitq version ({exc}): quantize the model again") from None
