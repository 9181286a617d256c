"""Orthogonal rotation of the quantized Linear layers' inputs (QuaRot / GLF-Q style).

A Linear computes ``x Wᵀ = (x R) (W R)ᵀ`` for any orthogonal ``R``. Rotating the input by ``R``
and the weight's input dimension by the same ``R`` leaves the float model unchanged, while the
quantizers now see ``x R`` and ``W R``: a randomised Hadamard ``R`` spreads each token's outlier
channels (the post-LayerNorm channels ViTs are known for) evenly over all channels, so one
per-tensor activation scale fits far better at 3-4 bits, and the weight's rows lose their
outliers the same way.

The rotation lives in the layer (:class:`InputRotation` in ``QuantLinear.input_rotation``, applied
before the activation quantizer in every mode), so it needs no knowledge of the model around the
layer and works for every adapter. It costs one ``(in, in)`` matmul per layer at run time; the
exported ONNX graph carries it as a float MatMul in front of the quantized one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .errors import VitqError
from .qmodules import QuantLinear, QuantMatMul, quant_modules

ROTATIONS = ("none", "hadamard", "orthogonal")


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    return torch.eye(q + 1, dtype=torch.float64) + s


# Hadamard cores besides 1: the widths of timm's ViTs are 2^k times one of these
# (192 = 12 * 16, 384, 768 = 12 * 64, 1536, 3072; Swin-T 96 = 12 * 8; 320 = 20 * 16, 640, 1280)
_CORES = {12: 11, 20: 19}  # order -> the prime of its Paley construction


def hadamard_order_supported(d: int) -> bool:
    """Whether :func:`hadamard_matrix` has a Hadamard matrix of order ``d``."""
    return any(d % c == 0 and _power_of_two(d // c) for c in (1, *_CORES))


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard_matrix(d: int, generator: torch.Generator) -> torch.Tensor:
    """A randomised Hadamard rotation of order ``d``: ``diag(±1) H / sqrt(d)`` (orthogonal, float64).

    ``H`` is Sylvester's for a power of two, else a Paley core (12 or 20) Kronecker a Sylvester
    matrix; random signs make rotations of different layers differ.
    """
    for core, prime in ((1, None), *_CORES.items()):
        if d % core == 0 and _power_of_two(d // core):
            h = _sylvester(d // core)
            if prime is not None:
                h = torch.kron(_paley(prime), h)
            break
    else:
        raise VitqError(f"no Hadamard matrix of order {d} here (supported: 2^k, 12*2^k, 20*2^k): "
                        "use rotation='orthogonal'")
    signs = torch.randint(0, 2, (d,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * h / math.sqrt(d)


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix of order ``d`` (float64): Q of a Gaussian's QR, signs fixed."""
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))


class InputRotation(nn.Module):
    """``x -> x R`` for a fixed orthogonal ``R`` (buffer ``matrix``, saved with the model)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x.dtype)

    def extra_repr(self) -> str:
        return f"order={self.matrix.shape[0]}"


def rotate_linear_inputs(model: nn.Module, kind: str, seed: int = 0) -> list[str]:
    """Rotate the input of every QuantLinear that quantizes its input; returns the layers' names.

    The weights become ``W R`` in place (the float model's function is unchanged up to float
    rounding); run it after :func:`vitq.adapters.prepare` and before calibration.
    """
    if kind not in ROTATIONS:
        raise VitqError(f"unknown rotation {kind!r}: choose one of {', '.join(ROTATIONS)}")
    if kind == "none":
        return []
    gen = torch.Generator().manual_seed(seed)
    done = []
    for name, module in quant_modules(model):
        if not isinstance(module, QuantLinear) or module.a_quantizer is None:
            continue
        if module.input_rotation is not None:
            raise VitqError(f"{name} is rotated already: rotate a freshly prepared model")
        d = module.in_features
        matrix = hadamard_matrix(d, gen) if kind == "hadamard" else random_orthogonal(d, gen)
        with torch.no_grad():
            w = module.weight
            w.copy_((w.double() @ matrix.to(w.device)).to(w.dtype))
        module.input_rotation = InputRotation(matrix).to(module.weight.device)
        done.append(name)
    return done


def _head_dim(attention: nn.Module, name: str) -> int:
    """The per-head width of the attention module that owns a matmul (the operands' last dim)."""
    if isinstance(getattr(attention, "head_dim", None), int):
        return attention.head_dim
    qkv, heads = getattr(attention, "qkv", None), getattr(attention, "num_heads", None)
    if isinstance(qkv, nn.Module) and isinstance(heads, int) and hasattr(qkv, "out_features"):
        return qkv.out_features // (3 * heads)
    raise VitqError(f"cannot tell the head width of {name}: attention rotation needs head_dim or qkv + num_heads")


def rotate_attention_operands(model: nn.Module, kind: str, seed: int = 0) -> list[str]:
    """Rotate the operands of every attention matmul by an orthogonal matrix of the head width.

    q @ kᵀ becomes ``(q R)(k R)ᵀ`` and attn @ v ``(attn (v R)) Rᵀ``: the same products, while the
    operand quantizers see q, k and v with their outlier channels spread. Returns the matmuls' names.
    """
    if kind not in ROTATIONS:
        raise VitqError(f"unknown rotation {kind!r}: choose one of {', '.join(ROTATIONS)}")
    if kind == "none":
        return []
    from .adapters import layer_role

    gen = torch.Generator().manual_seed(seed + 1)  # a stream of its own: the linear rotations keep theirs
    done = []
    for name, module in quant_modules(model):
        if not isinstance(module, QuantMatMul) or (module.a_quantizer is None and module.b_quantizer is None):
            continue
        role = layer_role(name)
        if role not in ("matmul1", "matmul2"):
            continue
        if module.operand_rotation is not None:
            raise VitqError(f"{name} is rotated already: rotate a freshly prepared model")
        d = _head_dim(model.get_submodule(name.rsplit(".", 1)[0]), name)
        matrix = hadamard_matrix(d, gen) if kind == "hadamard" else random_orthogonal(d, gen)
        module.operand_rotation = InputRotation(matrix)
        module.rotates = "contracted" if role == "matmul1" else "b_and_output"
        done.append(name)
    return done


def restore_rotations(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Give a freshly prepared ``model`` the rotations a saved state has (before ``load_state_dict``)."""
    from .adapters import layer_role

    done = []
    for key, value in state.items():
        slot = key.rsplit(".", 2)[-2] if key.endswith(".matrix") else None
        if slot not in ("input_rotation", "operand_rotation"):
            continue
        name = key[: -len(f".{slot}.matrix")]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise VitqError(f"the saved model rotates {name!r}, which this architecture lacks: "
                            "it was saved from another model") from None
        want = QuantLinear if slot == "input_rotation" else QuantMatMul
        if not isinstance(layer, want):
            raise VitqError(f"the saved model rotates {name!r}, a {type(layer).__name__} here, not a {want.__name__}")
        setattr(layer, slot, InputRotation(torch.zeros_like(value, dtype=torch.float32)))
        if slot == "operand_rotation":
            layer.rotates = "contracted" if layer_role(name) == "matmul1" else "b_and_output"
        done.append(name)
    return done


__all__ = ["ROTATIONS", "InputRotation", "hadamard_matrix", "hadamard_order_supported", "random_orthogonal",
           "restore_rotations", "rotate_attention_operands", "rotate_linear_inputs"]
