"""What each quantizer becomes in the ONNX graph: a :class:`QuantizerPlan` per quantizer, from its
:class:`~vitq.quantizers.IntegerView` and the export profile (the table in :mod:`.onnx_graph`).

A plan holds the PyTorch reference of the nodes (what an eager run of the export copy computes) and
the function that emits them through onnxscript; integer storage types are chosen here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import VitqError
from ..quantizers import IntegerView, Quantizer
from .packed import weight_codes

INT8_PROFILES = ("int8", "int8-vnni")  # integer-kernel profiles; they differ in the weights' signedness


# --------------------------------------------------------------------------- integer storage

# (numpy dtype of the stored values, onnx element type name, lowest, highest)
_STORAGE = {
    "uint4": (np.uint8, "UINT4", 0, 15), "int4": (np.int8, "INT4", -8, 7),
    "uint8": (np.uint8, "UINT8", 0, 255), "int8": (np.int8, "INT8", -128, 127),
    "uint16": (np.uint16, "UINT16", 0, 65535), "int16": (np.int16, "INT16", -32768, 32767),
}


def _tensor(name: str, values: np.ndarray, storage: str) -> Any:
    """An onnx TensorProto of ``values`` (integers) in ``storage`` (4-bit types packed by onnx)."""
    from onnx import TensorProto, helper, numpy_helper

    np_type, onnx_type, _, _ = _STORAGE[storage]
    if storage in ("uint4", "int4"):
        return helper.make_tensor(name, getattr(TensorProto, onnx_type), list(values.shape),
                                  values.astype(np.int64).reshape(-1).tolist())
    return numpy_helper.from_array(values.astype(np_type), name)


def _float(name: str, values: np.ndarray | float) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _fits(values: np.ndarray, storage: str) -> bool:
    _, _, lo, hi = _STORAGE[storage]
    return bool(values.size == 0 or (values.min() >= lo and values.max() <= hi))


def _scale_zero(view: IntegerView) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point broadcast to one shape (a token-wise scale may share one zero point)."""
    s = view.scale.detach().float().cpu().numpy()
    z = np.rint(view.zero_point.detach().float().cpu().numpy()).astype(np.int64)
    return np.broadcast_arrays(s, z) if s.shape != z.shape else (s, z)


def activation_storage(view: IntegerView) -> tuple[str, np.ndarray, bool]:
    """(storage type, zero point in it, whether a float clip must precede QuantizeLinear).

    Natural first: a type whose range is exactly ``qmin..qmax`` with vitq's zero point. Otherwise the
    narrowest 8/16-bit type in which some zero point ``zq`` keeps every code offset
    ``round(x/s) in [qmin - z, qmax - z]`` representable; then the clip does the clamping.
    """
    z = _scale_zero(view)[1].reshape(-1)
    signed = view.signed
    natural = {8: "int8" if signed else "uint8", 4: "int4" if signed else "uint4"}.get(view.bits)
    # (4-bit types need opset 21, the lowest check_export_options accepts)
    if natural is not None and (_STORAGE[natural][2], _STORAGE[natural][3]) == (view.qmin, view.qmax) \
            and _fits(z, natural):
        return natural, z, False
    for storage in ("uint8", "int8", "uint16", "int16"):
        _, _, tlo, thi = _STORAGE[storage]
        # zq in [tlo - (qmin - z), thi - (qmax - z)] and in [tlo, thi]; pick the one nearest z
        lo = np.maximum(tlo - view.qmin + z, tlo)
        hi = np.minimum(thi - view.qmax + z, thi)
        if bool((lo <= hi).all()):
            return storage, np.clip(z, lo, hi), True
    raise VitqError(f"a {view.bits}-bit grid with zero points {int(z.min())}..{int(z.max())} fits no ONNX "
                    "integer type: quantize the model again")


# --------------------------------------------------------------------------- export plans

@dataclass
class QuantizerPlan:
    """What one marker becomes in ONNX: ``emit(x, op)`` returns the output value."""

    name: str
    role: str          # "activation" | "weight" | "dropped"
    emit: Callable[[Any, Any], Any]
    info: dict[str, Any]
    # what the marker computes in PyTorch (the quantizer, the fake-quant weight, or the identity)
    reference: Callable[[torch.Tensor], torch.Tensor] = lambda x: x


def _uniform_activation(name: str, view: IntegerView) -> QuantizerPlan:
    s_b, z_b = _scale_zero(view)
    if s_b.size > 1:
        # onnxruntime (1.2x-1.3x) fuses a per-axis activation DequantizeLinear feeding a MatMul into
        # MatMulIntegerToFloat, which then fails at run time ("Per-Channel is not supported yet"), so
        # per-head / per-token grids are written as the same arithmetic in float ops
        return _uniform_arithmetic(name, view)
    storage, zq, clip = activation_storage(view)
    # the float range whose codes are qmin..qmax
    lo, hi = (s_b * (view.qmin - z_b)).astype(np.float32), (s_b * (view.qmax - z_b)).astype(np.float32)

    def emit(x: Any, op: Any) -> Any:
        if clip:
            x = op.Min(op.Max(x, op.Constant(value=_float(f"{name}.lo", lo.reshape(())))),
                       op.Constant(value=_float(f"{name}.hi", hi.reshape(()))))
        scale = op.Constant(value=_float(f"{name}.scale", s_b.reshape(())))
        zero = op.Constant(value=_tensor(f"{name}.zero_point", np.asarray(zq).reshape(()), storage))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)

    return QuantizerPlan(name, "activation", emit, {"kind": "uniform", "bits": view.bits, "storage": storage,
                                                    "clip": clip})


def _uniform_arithmetic(name: str, view: IntegerView) -> QuantizerPlan:
    """``(clip(round(x / s) + z, qmin, qmax) - z) * s`` in float ops, for scales QDQ has no axis for
    (per head and per token of kᵀ: ``(1, H, 1, N)``); exact, as QuantizeLinear's own arithmetic."""
    s_b, z_b = _scale_zero(view)

    def emit(x: Any, op: Any) -> Any:
        scale = op.Constant(value=_float(f"{name}.scale", s_b))
        zero = op.Constant(value=_float(f"{name}.zero_point", z_b.astype(np.float32)))
        q = op.Clip(op.Add(op.Round(op.Div(x, scale)), zero), op.Constant(value=_float(f"{name}.qmin", float(view.qmin))),
                    op.Constant(value=_float(f"{name}.qmax", float(view.qmax))))
        return op.Mul(op.Sub(q, zero), scale)

    return QuantizerPlan(name, "activation", emit, {"kind": "uniform", "bits": view.bits, "storage": "float",
                                                    "arithmetic": True})


def _log_activation(name: str, view: IntegerView) -> QuantizerPlan:
    k = float(view.extra["k"])
    s = view.scale.detach().float().numpy()

    def emit(x: Any, op: Any) -> Any:
        scale = op.Constant(value=_float(f"{name}.scale", s))
        ratio = op.Max(op.Div(x, scale), op.Constant(value=_float(f"{name}.tiny", np.finfo(np.float32).tiny)))
        q = op.Round(op.Mul(op.Log(ratio), op.Constant(value=_float(f"{name}.k", -k / math.log(2.0)))))
        q = op.Clip(q, op.Constant(value=_float(f"{name}.qmin", 0.0)),
                    op.Constant(value=_float(f"{name}.qmax", float(view.qmax))))
        y = op.Mul(scale, op.Pow(op.Constant(value=_float(f"{name}.two", 2.0)),
                                 op.Div(op.Neg(q), op.Constant(value=_float(f"{name}.base", k)))))
        top = op.GreaterOrEqual(q, op.Constant(value=_float(f"{name}.top", float(view.qmax))))
        return op.Where(top, op.Constant(value=_float(f"{name}.zero", 0.0)), y)

    return QuantizerPlan(name, "activation", emit, {"kind": view.kind, "bits": view.bits, "storage": "float"})


def _dfq_activation(name: str, view: IntegerView) -> QuantizerPlan:
    b1 = view.extra["b1"].detach().float().numpy()
    delta = view.scale.detach().float().numpy()
    zero_mode = view.extra["below"] == "zero"
    steps = float(2 ** view.bits - (2 if zero_mode else 1))

    def emit(x: Any, op: Any) -> Any:
        lo = op.Constant(value=_float(f"{name}.b1", b1))
        step = op.Constant(value=_float(f"{name}.delta", delta))
        q = op.Clip(op.Round(op.Div(op.Sub(x, lo), step)), op.Constant(value=_float(f"{name}.qmin", 0.0)),
                    op.Constant(value=_float(f"{name}.qmax", steps)))
        y = op.Add(lo, op.Mul(step, q))
        if zero_mode:
            y = op.Where(op.Less(x, lo), op.Constant(value=_float(f"{name}.zero", 0.0)), y)
        return y

    return QuantizerPlan(name, "activation", emit, {"kind": "dfq", "bits": view.bits, "storage": "float"})


def _weight_storage(codes: np.ndarray, zero: np.ndarray, view: IntegerView, profile: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(storage, stored codes, stored zero point) with ``(stored - zero) == (codes - z)``."""
    if profile in INT8_PROFILES:
        # int8: unsigned weights, onnxruntime's u8u8 GEMM, which widens both operands to 16 bits and is
        # exact on every x86 CPU. int8-vnni: signed weights, its u8s8 GEMM, 1.6-1.8x faster on a CPU with
        # VNNI (README), but without VNNI / AMX-INT8 (AVX2's vpmaddubsw) it sums byte pairs in saturating
        # int16 (255 * 127 * 2 > 32767) and the logits come out wrong (benchmarks/avx2_saturation.md)
        kind = "int8" if profile == "int8-vnni" else "uint8"
        # move the 8-bit codes' range (signed or not) onto the stored type's
        shift = (-128 if view.signed else 0) - _STORAGE[kind][2]
        stored, zq = codes - shift, zero - shift
        if _fits(stored, kind) and _fits(zq, kind):
            return kind, stored, zq
    order = (["int4" if view.signed else "uint4"] if view.bits <= 4 else []) + ["uint8", "int8", "int16"]
    for storage in order:
        if _fits(codes, storage) and _fits(zero, storage):
            return storage, codes, zero
    for storage in ("int8", "int16"):  # a zero point outside every type: store code offsets, zero point 0
        if _fits(codes - zero, storage):
            return storage, codes - zero, np.zeros_like(zero)
    raise VitqError("weight codes fit no ONNX integer type: quantize the model again")


def _block_size(k: int) -> int:
    """The largest power of two in 16..256 dividing ``k`` (MatMulNBits' blocks), else 32 (padded)."""
    for bs in (256, 128, 64, 32, 16):
        if k % bs == 0:
            return bs
    return 32


def _weight_plan(name: str, module: nn.Module, transposed: bool, profile: str) -> QuantizerPlan:
    """DequantizeLinear of ``module.weight``'s codes (``transposed``: laid out (in, out) for MatMul)."""
    codes, view = weight_codes(module, module.weight.detach(), name.rsplit('.', 1)[0])
    codes_np = codes.cpu().numpy().astype(np.int64)
    scale = view.scale.detach().float().cpu().numpy()
    zero = view.zero_point.detach().cpu().numpy().astype(np.int64)
    per_channel = scale.size > 1
    if per_channel and view.axis != 0:
        raise VitqError(f"{name}: weights quantized along axis {view.axis} cannot be exported; "
                        "vitq exports per-output-channel weight grids")
    blocked = profile == "w4" and transposed
    if blocked:
        if view.bits > 4 or view.signed or not _fits(zero, "uint4"):
            raise VitqError(f"{name} has {view.bits}-bit weights; the w4 profile takes weights of at most 4 bits "
                            "(quantize with --w-bits 4 or --w-bits 3)")
        k = codes_np.shape[1]
        bs = _block_size(k)
        n_blocks = -(-k // bs)
        pad = n_blocks * bs - k
        stored = np.pad(codes_np, ((0, 0), (0, pad)), constant_values=0).T  # (K_padded, N)
        zq = zero.reshape(-1, 1).repeat(n_blocks, 1).T if per_channel else np.full((n_blocks, codes_np.shape[0]), int(zero.reshape(-1)[0]))
        s = (scale.reshape(-1, 1).repeat(n_blocks, 1).T if per_channel
             else np.full((n_blocks, codes_np.shape[0]), float(scale.reshape(-1)[0]), np.float32))
        storage = "uint4"
        info = {"block_size": bs, "padded_k": pad}
    else:
        storage, stored, zq = _weight_storage(codes_np, zero.reshape(-1) if per_channel else zero.reshape(()),
                                              view, profile)
        s = scale.reshape(-1) if per_channel else scale.reshape(())
        if transposed:
            stored = stored.T
        info = {}
    axis = {"axis": 0} if blocked else ({"axis": 1 if transposed else 0} if per_channel else {})
    if blocked:
        axis["block_size"] = info["block_size"]

    def emit(_x: Any, op: Any) -> Any:
        w = op.DequantizeLinear(op.Constant(value=_tensor(f"{name}.codes", np.ascontiguousarray(stored), storage)),
                                op.Constant(value=_float(f"{name}.scale", s)),
                                op.Constant(value=_tensor(f"{name}.zero_point", np.asarray(zq), storage)), **axis)
        if blocked and pad:  # drop the padded input rows
            w = op.Slice(w, op.Constant(value=_int64(f"{name}.start", [0])),
                         op.Constant(value=_int64(f"{name}.end", [k])), op.Constant(value=_int64(f"{name}.ax", [0])))
        return w

    with torch.no_grad():
        fake = module.w_quantizer.eval()(module.weight.detach())
    fake = fake.t().contiguous() if transposed else fake
    return QuantizerPlan(name, "weight", emit, {"kind": "uniform", "bits": view.bits, "storage": storage,
                                                "per_channel": per_channel, **info}, lambda _x: fake)


def _int64(name: str, values: list[int]) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _activation_plan(name: str, q: Quantizer, profile: str) -> QuantizerPlan:
    if profile == "w4":
        return QuantizerPlan(name, "dropped", lambda x, op: op.Identity(x), {"kind": "dropped"})
    plan = _activation_emission(name, q, profile)
    plan.reference = q
    return plan


def _activation_emission(name: str, q: Quantizer, profile: str) -> QuantizerPlan:
    view = q.integer_view()
    if profile in INT8_PROFILES:
        problem = None
        if view.kind != "uniform":
            problem = f"a {view.kind} grid"
        elif view.scale.numel() > 1:
            problem = f"scales of shape {tuple(view.scale.shape)} (per head or per token)"
        elif not (view.qmin <= float(view.zero_point.reshape(-1)[0]) <= view.qmax):
            problem = "a zero point outside its codes"
        if problem is not None:
            raise VitqError(f"{name} has {problem}, which onnxruntime's integer kernels cannot take: quantize with "
                            "--target ort-int8 for the int8 profile (or export --profile exact)")
    if view.kind == "uniform":
        return _uniform_activation(name, view)
    if view.kind in ("log2", "logsqrt2"):
        return _log_activation(name, view)
    if view.kind == "dfq":
        return _dfq_activation(name, view)
    raise VitqError(f"{name}: vitq cannot export a {view.kind!r} quantizer to ONNX")


