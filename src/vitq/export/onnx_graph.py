"""ONNX export of a quantized model: QuantizeLinear / DequantizeLinear graphs onnxruntime runs.

How: the model is copied, every quantizer in the copy is replaced by a one-line marker op
(``vitq_export::quant``, a torch custom op that runs the original quantizer), every QuantLinear by
``x @ Wᵀ + b`` on the transposed weight, and ``torch.onnx.export`` (the torch.export path) turns
each marker into the ONNX nodes its quantizer's :class:`~vitq.quantizers.IntegerView` calls for
(the translation table below). So the graph is the fake-quant model op for op, and weights are
stored as integer codes (int4/uint4 at 4 bits, 8-bit types otherwise), never as float. onnxruntime
then computes what vitq computes, except where its LayerNorm / GELU / softmax kernels round the last
bit differently and a value on a rounding boundary gets the next code (rare; one step of one element).

What a quantizer becomes (``x`` an activation, ``z`` its integer zero point, codes ``qmin..qmax``):

=====================================  ===============================================================
uniform per tensor, ``qmin <= z <=    ``QuantizeLinear -> DequantizeLinear`` in the type of exactly
qmax``, bits a type has (8; 4)         that range (uint8/int8/uint4/int4): saturation is the clamp
uniform per tensor, other bits or ``z`` ``Max/Min`` on the float range ``[s(qmin-z), s(qmax-z)]``
outside the codes (e.g. 3 bits, or a
post-softmax range that excludes 0)   then QDQ in an 8- or 16-bit type whose zero point holds the
                                       same offsets; exact, since ``round`` of a clipped value is the
                                       clamped code
uniform per head / per token           the same arithmetic in float ops (``Div, Round, Add, Clip, Sub,
                                       Mul``): onnxruntime fuses a per-axis activation DQ into
                                       MatMulIntegerToFloat, which refuses per-axis zero points
log2 / log-sqrt2 (post-softmax)        ``Div, Max, Log, Mul, Round, Clip, Pow, Mul, Where`` (QDQ has no
                                       log grid); matches ``torch.log2`` up to float rounding
DFQ (AIQViT)                           ``Sub, Div, Round, Clip, Mul, Add`` (and ``Where`` for "zero")
weights                                ``DequantizeLinear`` of the integer codes (per channel)
=====================================  ===============================================================

Profiles (``profile=``):

* ``exact``: any vitq model, as above.
* ``int8``: every activation quantizer uniform per tensor with its zero point inside the codes
  (``vitq quantize --target ort-int8`` calibrates and reconstructs under that constraint) and 8-bit
  weights stored as uint8: onnxruntime fuses ``DQ -> MatMul`` into ``MatMulIntegerToFloat`` on its
  u8u8 kernels, exact on every x86 CPU.
* ``int8-vnni``: the same with the weights stored as int8, for onnxruntime's u8s8 kernels: faster
  on CPUs with VNNI or AMX-INT8, but on CPUs without them (AVX2 only) those kernels saturate int16
  sums of byte pairs and the logits come out wrong (benchmarks/avx2_saturation.md).
* ``w4``: weight-only: activation quantizers are dropped, the (<= 4-bit, per-channel) weight codes of
  every Linear become blocked uint4 ``DequantizeLinear`` (``block_size``), which onnxruntime fuses
  into ``MatMulNBits``; the rounding is vitq's (AdaRound's, after reconstruction).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..errors import VitqError
from ..qmodules import QuantLinear, QuantMode, iter_quantizers, quant_modules, set_mode
from .onnx_plans import INT8_PROFILES, QuantizerPlan, _activation_plan, _weight_plan

PROFILES = ("exact", *INT8_PROFILES, "w4")
MIN_OPSET = 21  # int4/uint4 QuantizeLinear / DequantizeLinear and blocked weights


def require_onnx() -> None:
    """One line naming the fix when the export extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise VitqError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
                        "pip install 'vitq[export]'") from None


def check_export_options(profile: str, opset: int) -> None:
    """One line for a profile vitq does not have or an opset without int4 QDQ."""
    if profile not in PROFILES:
        raise VitqError(f"unknown ONNX profile {profile!r}: use {', '.join(PROFILES)}")
    if opset < MIN_OPSET:
        raise VitqError(f"opset {opset} is too low: vitq's ONNX export needs opset {MIN_OPSET} or newer "
                        f"(int4/uint4 QuantizeLinear/DequantizeLinear, blocked weights): pass --opset {MIN_OPSET}")


# --------------------------------------------------------------------------- the export copy

_PLANS: dict[int, QuantizerPlan] = {}  # marker id -> plan, filled only while one export runs


@torch.library.custom_op("vitq_export::quant", mutates_args=())
def _quant_marker(x: torch.Tensor, ident: int) -> torch.Tensor:
    """Stands for quantizer ``ident`` in the traced graph; run eagerly, it is the plan's PyTorch reference."""
    return _PLANS[ident].reference(x).clone()


@_quant_marker.register_fake
def _(x: torch.Tensor, ident: int) -> torch.Tensor:
    return torch.empty_like(x)


def _translate_marker(x: Any, ident: int) -> Any:
    from onnxscript import opset21 as op

    return _PLANS[ident].emit(x, op)


class _ExportQuant(nn.Module):
    """The marker in place of a quantizer (what the ONNX graph computes there, run eagerly under ``plans_active``)."""

    def __init__(self, ident: int) -> None:
        super().__init__()
        self.ident = ident

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quant_marker(x, self.ident)


class _ExportLinear(nn.Module):
    """``aq(x) @ wq(Wᵀ) + b [+ side(aq(x))]``: MatMul on an (in, out) weight, the layout integer kernels fuse."""

    def __init__(self, linear: QuantLinear, a_marker: nn.Module | None, w_marker: nn.Module | None) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        bias = linear.bias
        if linear.bias_correction is not None:  # calibration's bias correction: one bias in the graph
            bias = nn.Parameter((linear.bias_correction if bias is None else bias + linear.bias_correction).detach(),
                                requires_grad=False)
        self.bias = bias
        self.a_marker, self.w_marker, self.side = a_marker, w_marker, linear.side
        self.input_rotation = linear.input_rotation  # a float MatMul before the quantized one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        if self.a_marker is not None:
            x = self.a_marker(x)
        w = self.weight_t if self.w_marker is None else self.w_marker(self.weight_t)
        # a 2-D MatMul + Add becomes a float Gemm in onnxruntime before its integer fusions run, so a
        # (B, C) input (the classifier head) goes through as (B, 1, C)
        flat = x.dim() == 2
        y = (x.unsqueeze(1) if flat else x) @ w
        if self.bias is not None:
            y = y + self.bias
        if flat:
            y = y.squeeze(1)
        if self.side is not None:
            y = y + self.side(x)
        return y


def build_export_copy(model: nn.Module, profile: str) -> tuple[nn.Module, dict[int, QuantizerPlan]]:
    """A copy of ``model`` with markers in place of quantizers, and each marker's plan."""
    check_export_options(profile, MIN_OPSET)
    if not any(True for _ in iter_quantizers(model)):
        raise VitqError("this model has no quantizers: quantize it with vitq.quantize before exporting")
    for name, q in iter_quantizers(model):
        if q.enabled and not q.is_calibrated:
            raise VitqError(f"{name} is not calibrated: export a model that vitq.quantize has finished")
    if profile == "w4" and not any(m.w_quantizer is not None for _, m in quant_modules(model)
                                   if isinstance(m, QuantLinear)):
        raise VitqError("the w4 profile needs quantized Linear weights; this model has none")
    work = copy.deepcopy(model).eval()
    set_mode(work, QuantMode.QUANT)
    plans: dict[int, QuantizerPlan] = {}

    def marker(plan: QuantizerPlan) -> _ExportQuant:
        ident = len(plans)
        plans[ident] = plan
        return _ExportQuant(ident)

    from ..adapters.layers import set_submodule

    for name, module in list(quant_modules(work)):
        aq, wq = getattr(module, "a_quantizer", None), getattr(module, "w_quantizer", None)
        if isinstance(module, QuantLinear):
            a_m = marker(_activation_plan(f"{name}.a_quantizer", aq, profile)) if aq is not None else None
            w_m = marker(_weight_plan(f"{name}.w_quantizer", module, True, profile)) if wq is not None else None
            set_submodule(work, name, _ExportLinear(module, a_m, w_m))
            continue
        for slot, q in list(module.quantizers()):
            if slot == "w_quantizer":
                plan = _weight_plan(f"{name}.{slot}", module, False, profile)
            else:
                plan = _activation_plan(f"{name}.{slot}", q, profile)
            setattr(module, slot, marker(plan))
    return work, plans


@contextlib.contextmanager
def plans_active(plans: dict[int, QuantizerPlan]) -> Iterator[None]:
    """Make ``plans`` the ones the markers stand for (export and eager runs of an export copy)."""
    _PLANS.clear()
    _PLANS.update(plans)
    try:
        yield
    finally:
        _PLANS.clear()


@torch.no_grad()
def profile_logits(work: nn.Module, plans: dict[int, QuantizerPlan], images: torch.Tensor) -> torch.Tensor:
    """What the exported graph should compute: the export copy run in PyTorch (for ``w4``, without activation
    quantizers; otherwise the fake-quant model's own logits)."""
    with plans_active(plans):
        return work(images)


def export_onnx_model(model: nn.Module, example: torch.Tensor, profile: str = "exact", opset: int = MIN_OPSET
                      ) -> tuple[Any, nn.Module, dict[int, QuantizerPlan]]:
    """The ``onnx.ModelProto`` of a quantized model (batch dimension dynamic), the export copy and its plans."""
    require_onnx()
    check_export_options(profile, opset)
    import warnings

    work, plans = build_export_copy(model, profile)
    try:
        with plans_active(plans), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                work, (example,), dynamo=True, opset_version=opset, input_names=["images"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
                custom_translation_table={torch.ops.vitq_export.quant.default: _translate_marker})
    except VitqError:
        raise
    except Exception as exc:  # the exporter's own errors are long reports; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitqError(f"torch.onnx.export failed for this model ({first})") from None
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's per-node debug records (stack traces): most of a small file
        del node.metadata_props[:]
    return proto, work, plans
