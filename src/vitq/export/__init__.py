"""Deployable artifacts of a quantized model.

* :mod:`.packing`: bit packing of 2..8-bit integer codes into a byte stream;
* :mod:`.packed`: the packed integer checkpoint (``--format packed``; :func:`load_packed` is what
  ``vitq.load_model`` uses for such a folder) and :func:`packed_size_report`;
* :mod:`.onnx_graph` / :mod:`.onnx_file`: ONNX with QuantizeLinear / DequantizeLinear nodes in three
  profiles (``exact``, ``int8``, ``w4``) checked in onnxruntime (``--format onnx``);
* :mod:`.folder`: reading the model to export and writing the output folder atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import VitqError
from .folder import check_out, load_source
from .onnx_graph import MIN_OPSET, PROFILES
from .packed import PACKED_FORMAT, load_packed, packed_size_report
from .packing import pack_codes, packed_nbytes, unpack_codes

FORMATS = ("packed", "onnx")


def export(model_or_path: nn.Module | str | Path, out: str | Path, format: str = "packed", *,
           profile: str = "exact", opset: int = MIN_OPSET, architecture: dict[str, Any] | None = None,
           check_images: torch.Tensor | None = None) -> Path:
    """Write a quantized model (from ``vitq.quantize``, or a run / model folder) as a deployable folder.

    ``format="packed"``: bit-packed integer weights (safetensors + JSON) that ``vitq.load_model(out)``
    loads back to the fake-quant model's logits. ``format="onnx"``: ``out/model.onnx`` in ``profile``
    ``exact`` (the fake-quant model, any quantizer), ``int8`` (onnxruntime integer kernels, uint8
    weights: exact on every CPU; quantize with ``target="ort-int8"``), ``int8-vnni`` (int8 weights:
    faster on CPUs with VNNI / AMX-INT8, inexact on AVX2-only ones) or ``w4`` (4-bit weight-only,
    onnxruntime's MatMulNBits), checked in
    onnxruntime on ``check_images`` (default: a fixed random batch); ``out/export.json`` says what ran
    how. ``out`` must be absent, an empty folder or a previous vitq export (replaced only once the new
    one is complete). ``architecture`` as in :func:`vitq.save_quantized`. Returns ``out``.
    """
    if format not in FORMATS:
        raise VitqError(f"unknown export format {format!r}: use {', '.join(FORMATS)}")
    if format == "packed" and profile != "exact":
        raise VitqError("--profile applies to --format onnx only")
    if format == "onnx":
        from .onnx_graph import check_export_options, require_onnx

        require_onnx()
        check_export_options(profile, opset)  # before the model is loaded
    out = Path(out).expanduser()
    check_out(out)
    model, arch = load_source(model_or_path, architecture, need_architecture=format == "packed")
    if format == "packed":
        from .packed import export_packed

        return export_packed(model, arch, out)
    from .onnx_file import export_onnx

    return export_onnx(model, out, profile=profile, opset=opset, check_images=check_images)


__all__ = ["FORMATS", "PACKED_FORMAT", "PROFILES", "export", "load_packed", "pack_codes", "packed_nbytes",
           "packed_size_report", "unpack_codes"]
