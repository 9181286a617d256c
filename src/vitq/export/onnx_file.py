"""The ONNX export folder (``vitq export --format onnx``) and what onnxruntime makes of it.

``OUT/model.onnx`` (opset 21+, batch dimension dynamic, input ``images``, output ``logits``) and
``OUT/export.json``: the profile, what it dropped or stored how, the file size, the largest logit
difference between onnxruntime and vitq's fake-quant model on a check batch (with onnxruntime's
basic optimisations, i.e. the graph's own arithmetic, and with all of them, i.e. its fused integer
kernels), and the kernels onnxruntime's optimised graph actually runs (read from
``optimized_model_filepath``, never assumed).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data import atomic_write_bytes
from ..errors import VitqError
from ..models import data_config
from .folder import write_folder, write_json
from .onnx_graph import MIN_OPSET, export_onnx_model, profile_logits

ONNX_FORMAT = "vitq-onnx-v1"
# onnxruntime kernels that compute on integers (after its graph optimisations)
INTEGER_KERNELS = frozenset({"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "MatMulNBits", "QLinearConv",
                             "ConvInteger", "QGemm", "DynamicQuantizeMatMul", "QAttention", "QLinearAdd",
                             "QLinearMul", "QLinearSoftmax", "QLinearGlobalAveragePool", "QLinearConcat",
                             "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool"})
# float kernels of the same work (the rest: norms, softmax, elementwise, reshapes)
FLOAT_MATMULS = frozenset({"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "NhwcConv",
                           "FusedMatMulActivation", "MatMulBnb4"})
MATMUL_KERNELS = frozenset({"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "MatMulNBits", "QLinearConv",
                            "ConvInteger", "QGemm", "DynamicQuantizeMatMul", "QAttention"})


def ort_session(path: str | Path, threads: int | None = None, optimized_to: str | Path | None = None,
                level: str = "all", nbits_accuracy: int = 1) -> Any:
    """An onnxruntime CPU session (``threads`` intra-op threads; ``optimized_to``: save the optimised graph).

    ``nbits_accuracy``: the compute type of the MatMulNBits kernels onnxruntime fuses 4-bit weights into
    (its ``session.qdq_matmulnbits_accuracy_level``): 1 = fp32, exactly the graph's arithmetic;
    onnxruntime's own default, 4, quantizes their activations to int8 on the fly (faster, not exact).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(nbits_accuracy))
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_to is not None:
        opts.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def kernel_report(model_path: str | Path) -> dict[str, Any]:
    """The node types of onnxruntime's optimised graph of ``model_path`` and its integer share.

    ``integer_matmul_share``: the integer matmul/conv kernels over all matmul/conv kernels (a node
    count, not FLOPs). The optimised graph is what onnxruntime runs on this CPU (level 'extended',
    the last level whose saved graph is portable, plus what 'all' adds is the layout only).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(model_path, threads=1, optimized_to=optimized, level="extended")
        graph = onnx.load(str(optimized)).graph
        ops = Counter(node.op_type for node in graph.node)
    integer = sum(n for op, n in ops.items() if op in MATMUL_KERNELS)
    floating = sum(n for op, n in ops.items() if op in FLOAT_MATMULS)
    return {"optimized_node_types": dict(sorted(ops.items())),
            "integer_kernels": {op: n for op, n in sorted(ops.items()) if op in INTEGER_KERNELS},
            "float_matmul_kernels": {op: n for op, n in sorted(ops.items()) if op in FLOAT_MATMULS},
            "integer_matmul_share": integer / (integer + floating) if integer + floating else 0.0}


def check_input(model: nn.Module, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """A fixed random batch in the size the model takes (its patch embedding's, else its data config's)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    h, w = tuple(size) if size is not None else data_config(model)["input_size"][1:]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=gen)


def onnx_logits(session: Any, images: torch.Tensor | np.ndarray) -> np.ndarray:
    x = images.numpy() if isinstance(images, torch.Tensor) else images
    return session.run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})[0]


def export_onnx(model: nn.Module, out: Path, *, profile: str = "exact", opset: int = MIN_OPSET,
                check_images: torch.Tensor | None = None) -> Path:
    """Write ``out/model.onnx`` and ``out/export.json`` for a quantized model (see the module docstring)."""
    device = next(model.parameters()).device
    model = model.cpu().eval()
    try:
        images = check_input(model) if check_images is None else check_images.cpu()
        t0 = time.perf_counter()
        proto, work, plans = export_onnx_model(model, images[:2], profile=profile, opset=opset)
        seconds = time.perf_counter() - t0
        blob = proto.SerializeToString()
        if len(blob) >= 2 ** 31:
            raise VitqError("the ONNX model is over 2 GB, protobuf's limit: export a smaller model")
        reference = profile_logits(work, plans, images).numpy()
    finally:
        model.to(device)
    roles = Counter(plan.role for plan in plans.values())
    storage = Counter(f"{plan.role}:{plan.info.get('storage', '-')}" for plan in plans.values())
    report: dict[str, Any] = {
        "format": ONNX_FORMAT, "profile": profile, "opset": opset, "export_seconds": round(seconds, 2),
        "recipe": (model.vitq_config or {}).get("recipe", {}).get("name"),
        "target": (model.vitq_config or {}).get("recipe", {}).get("target", "simulated"),
        "quantizers": dict(sorted(roles.items())), "storage": dict(sorted(storage.items())),
        "dropped": sorted(plan.name for plan in plans.values() if plan.role == "dropped"),
        "clipped_activations": sorted(plan.name for plan in plans.values() if plan.info.get("clip")),
    }

    def fill(tmp: Path) -> None:
        path = tmp / "model.onnx"
        atomic_write_bytes(path, lambda fh: fh.write(blob))
        # the graph's own arithmetic (no fusions), then what onnxruntime runs by default: its integer
        # kernels requantize in their own order of float operations, so a code may move by one step
        graph = onnx_logits(ort_session(path, threads=1, level="basic"), images)
        fused = onnx_logits(ort_session(path, threads=1, level="all"), images)
        report["file_bytes"] = path.stat().st_size
        report["check"] = {"images": int(images.shape[0]), "matmulnbits_accuracy_level": 1,
                           "input": "fixed random normal (seed 0)" if check_images is None else "given",
                           "max_abs_logit_diff": float(np.abs(graph - reference).max()),
                           "max_abs_logit_diff_optimized": float(np.abs(fused - reference).max()),
                           "max_abs_logit": float(np.abs(reference).max()),
                           "same_top1": float((graph.argmax(1) == reference.argmax(1)).mean()),
                           "same_top1_optimized": float((fused.argmax(1) == reference.argmax(1)).mean())}
        report.update(kernel_report(path))
        write_json(tmp / "export.json", report)

    return write_folder(out, fill)
