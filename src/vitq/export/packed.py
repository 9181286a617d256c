"""The packed integer checkpoint (format ``vitq-packed-v1``).

A folder with

* ``config.json``: what :func:`vitq.api.load_quantized` needs (architecture, pretrained_cfg, recipe,
  spec, folded layers, side-branch ranks) plus ``packing``: per packed weight its bit width,
  element count, shape, code offset and quantizer;
* ``model.safetensors``: for every enabled weight quantizer the weight's integer codes, offset by
  ``-qmin`` (so signed grids pack as unsigned) and bit-packed (:mod:`.packing`) under
  ``<weight key>.codes``; the quantizer's own tensors (scale, zero point: fp32) without its
  observer statistics; every other tensor (norms, biases, embeddings, activation quantizers,
  low-rank side branches, weights whose quantizer is off) as it is;
* ``export.json``: :func:`packed_size_report`.

Loading rebuilds the quantized modules, loads the quantizers, then dequantizes every weight through
its quantizer's :meth:`~vitq.quantizers.Quantizer.integer_view`: ``w = (codes - zero_point) * scale``.

Size: ``sum_i ceil(n_i b_i / 8)`` bytes of codes, 8 bytes (fp32 scale + zero point) per output
channel of a quantized weight, 4 bytes per float element of the rest, plus the safetensors header
and ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..api import (META_KEYS, first_line_of_load_error, portable_pretrained_cfg, rebuild_quantized,
                   weights_do_not_fit)
from ..data import atomic_write_bytes
from ..errors import VitqError
from ..models import read_json
from ..qmodules import QuantMode, quant_modules, set_mode
from ..quantizers import IntegerView, Quantizer
from .folder import write_folder, write_json
from .packing import pack_codes, unpack_codes

PACKED_FORMAT = "vitq-packed-v1"
CODES_SUFFIX = ".codes"
# The base Quantizer's min/max observer statistics: only calibration reads them, so packed weight
# quantizers leave them out (they are as large as the scales and zero points together).
OBSERVER_BUFFERS = ("min_val", "max_val")


# --------------------------------------------------------------------------- export

def _fp32_bytes(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Bytes of the float model's own tensors at FP32 (no quantizer state, no low-rank branches)."""
    from ..methods.aiqvit import LowRankFactors

    extra = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, (Quantizer, LowRankFactors)))
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
               for key, t in state.items() if not key.startswith(extra))


@torch.no_grad()
def weight_codes(module: nn.Module, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, IntegerView]:
    """(int32 codes, integer view) of a quant module's weight, checked against its fake-quant weight."""
    q = module.w_quantizer
    view = q.integer_view()
    if view.kind != "uniform":
        raise VitqError(f"the weight of {name} has a {view.kind!r} grid; vitq exports uniform weight grids "
                        "only: quantize the weights with a uniform quantizer")
    codes = q.codes(weight)
    # The integer form must reproduce what the fake-quant model computes; an off-by-one code is
    # a whole step, far above this tolerance.
    was_training = q.training
    q.eval()
    fake = q(weight)
    q.train(was_training)
    dequant = (codes.to(view.scale.dtype) - view.zero_point) * view.scale
    if not bool(((dequant - fake).abs() <= 1e-3 * view.scale.abs()).all()):
        raise VitqError(f"the integer codes of {name} do not reproduce its fake-quantized weight: "
                        "its quantizer's integer_view()/codes() disagree with its forward")
    return codes, view


@torch.no_grad()
def _pack_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Replace every weight with an enabled quantizer in ``state`` by its packed codes; their metadata."""
    packed: dict[str, dict[str, Any]] = {}
    for name, module in quant_modules(model):
        q = getattr(module, "w_quantizer", None)
        if q is None or not q.enabled:
            continue  # bits off: the weight stays float
        weight_key, q_prefix = f"{name}.weight", f"{name}.w_quantizer"
        if weight_key not in state:
            raise VitqError(f"the weight of {name} is still parametrized (unfinished low-rank compensation): "
                            "export a model that vitq.quantize has finished")
        weight = module.weight.detach()
        codes, view = weight_codes(module, weight, name)
        state.pop(weight_key)
        state[weight_key + CODES_SUFFIX] = pack_codes(codes - view.qmin, view.bits)
        for buf in OBSERVER_BUFFERS:
            state.pop(f"{q_prefix}.{buf}", None)
        packed[weight_key] = {"bits": view.bits, "numel": weight.numel(), "shape": list(weight.shape),
                              "qmin": view.qmin, "qmax": view.qmax, "signed": view.signed, "axis": view.axis,
                              "kind": view.kind, "quantizer": q_prefix,
                              "dtype": str(weight.dtype).replace("torch.", "")}
    return packed


def export_packed(model: nn.Module, arch: dict[str, Any], out: Path) -> Path:
    """Write a quantized model as a packed folder at ``out`` (see :func:`vitq.export.export`)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fp32_bytes = _fp32_bytes(model, state)
    weights = _pack_weights(model, state)
    meta = model.vitq_config
    config = {"format": PACKED_FORMAT, **arch, "pretrained_cfg": portable_pretrained_cfg(model),
              **{k: meta[k] for k in META_KEYS if k in meta},
              "packing": {"bit_order": "little", "codes_suffix": CODES_SUFFIX,
                          "dequantize": "w = (stored + qmin - zero_point) * scale",
                          "dropped_quantizer_buffers": list(OBSERVER_BUFFERS), "fp32_bytes": fp32_bytes,
                          "weights": weights}}
    blob = save(state)

    def fill(tmp: Path) -> None:
        atomic_write_bytes(tmp / "model.safetensors", lambda fh: fh.write(blob))
        write_json(tmp / "config.json", config)
        write_json(tmp / "export.json", packed_size_report(tmp))

    return write_folder(out, fill)


# --------------------------------------------------------------------------- size

def packed_size_report(folder: str | Path) -> dict[str, Any]:
    """Bytes of a packed folder by part, and its ratio to the FP32 size of the same model.

    ``codes_bytes``: the packed weight codes; ``weight_qparams_bytes``: the weight quantizers'
    tensors (scale, zero point); ``float_rest_bytes``: every other tensor; ``header_bytes``: the
    safetensors header; ``total_bytes``: ``model.safetensors`` + ``config.json``; ``fp32_bytes``:
    the float model's tensors at FP32; ``ratio``: total / fp32.
    """
    from safetensors import safe_open

    folder = Path(folder)
    config = read_json(folder / "config.json")
    if config.get("format") != PACKED_FORMAT:
        raise VitqError(f"{folder} is not a packed export (format {config.get('format')!r}): "
                        "make one with `vitq export RUN --format packed --out PATH`")
    weights_meta = config["packing"]["weights"]
    code_keys = {k + CODES_SUFFIX for k in weights_meta}
    q_prefixes = tuple(meta["quantizer"] + "." for meta in weights_meta.values())
    codes = qparams = rest = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            nbytes = fh.get_tensor(key).nbytes
            if key in code_keys:
                codes += nbytes
            elif key.startswith(q_prefixes):
                qparams += nbytes
            else:
                rest += nbytes
    st_bytes = (folder / "model.safetensors").stat().st_size
    config_bytes = (folder / "config.json").stat().st_size
    total = st_bytes + config_bytes
    fp32 = int(config["packing"]["fp32_bytes"])
    bits: dict[str, int] = {}
    for meta in weights_meta.values():
        bits[str(meta["bits"])] = bits.get(str(meta["bits"]), 0) + int(meta["numel"])
    return {"format": PACKED_FORMAT, "codes_bytes": codes, "weight_qparams_bytes": qparams,
            "float_rest_bytes": rest, "header_bytes": st_bytes - codes - qparams - rest,
            "config_bytes": config_bytes, "total_bytes": total, "fp32_bytes": fp32,
            "ratio": total / fp32 if fp32 else None, "packed_weights": len(weights_meta),
            "packed_elements_by_bits": bits}


# --------------------------------------------------------------------------- loading

def load_packed(folder: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`export` (format ``vitq-packed-v1``), in quantized mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_json(folder / "config.json")
    if config.get("format") != PACKED_FORMAT:
        raise VitqError(f"{folder} is not a vitq packed export of this version (format {config.get('format')!r}): "
                        "export the quantized model again")
    weights_path = folder / "model.safetensors"
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors has its own error types for damaged files
        raise VitqError(f"{weights_path} is missing or damaged ({exc.__class__.__name__})") from None
    packing = config["packing"]
    streams: dict[str, torch.Tensor] = {}
    for weight_key, meta in packing["weights"].items():
        stream = state.pop(weight_key + CODES_SUFFIX, None)
        if stream is None:
            raise VitqError(f"{weights_path} lacks the codes of {weight_key}: export the model again")
        streams[weight_key] = stream
        # a placeholder of the right shape: the codes are dequantized once the quantizers are loaded
        state[weight_key] = torch.zeros(meta["shape"], dtype=getattr(torch, meta.get("dtype", "float32")))
    model = rebuild_quantized(config, state)
    dropped = {f"{meta['quantizer']}.{buf}" for meta in packing["weights"].values()
               for buf in packing.get("dropped_quantizer_buffers", ())}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: e.g. a model built with other constructor arguments
        raise weights_do_not_fit(folder, first_line_of_load_error(exc), "export with export") from None
    wrong = sorted(set(missing) - dropped) + sorted(unexpected)
    if wrong:
        raise weights_do_not_fit(folder, f"e.g. {wrong[0]!r}", "export with export")
    with torch.no_grad():
        for weight_key, meta in packing["weights"].items():
            view = model.get_submodule(meta["quantizer"]).integer_view()
            if (view.bits, view.qmin) != (meta["bits"], meta["qmin"]):
                raise VitqError(f"{folder}: the quantizer of {weight_key} is {view.bits}-bit from {view.qmin}, "
                                f"the codes {meta['bits']}-bit from {meta['qmin']}: export the model again")
            codes = unpack_codes(streams[weight_key], meta["bits"], meta["numel"]).reshape(meta["shape"])
            weight = (codes.to(view.scale.dtype) + view.qmin - view.zero_point) * view.scale
            param = model.get_parameter(weight_key)
            param.copy_(weight.to(param.dtype))
    set_mode(model, QuantMode.QUANT)
    model.vitq_config = {k: config[k] for k in META_KEYS if k in config}
    return model.eval()
