"""Orthogonal rotation of the quantized Linear layers' inputs (QuaRot / GLF-Q style).

A Linear computes ``x Wᵀ = (x R) (W R)ᵀ`` for any orthogonal ``R``. Rotating the input by ``R``
and the weight's input dimension by the same ``R`` leaves the float model unchanged, while the
quantizers now see ``x R`` and ``W R``: a randomised Hadamard ``R`` spreads each token's outlier
channels (the post-LayerNorm channels ViTs are known for) evenly over all channels, so one
per-tensor activation scale fits far better at 3-4 bits, and the weight's rows lose their
outliers the same way.

The rotation lives in the layer (:class:`InputRotation` in ``QuantLinear.input_rotation``, applied
before the activation quantizer in every mode), so it needs no knowledge of the model around the
layer and works for every adapter. At run time a Hadamard rotation costs (c + m) multiply-adds per
input element (its Kronecker factors, :class:`InputRotation`), a random orthogonal one d; the
exported ONNX graph carries it as float MatMuls in front of the quantized one.
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


def hadamard_factors(d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A randomised Hadamard rotation of order ``d`` as ``(signs, left, right)`` (float64):
    ``R = diag(signs) kron(left, right)`` with ``left`` a normalised Paley core of order 12 or 20 (or
    ``[[1]]``) and ``right`` a normalised Sylvester matrix; random signs make layers' rotations differ.
    """
    for core, prime in ((1, None), *_CORES.items()):
        if d % core == 0 and _power_of_two(d // core):
            left = _paley(prime) / math.sqrt(core) if prime is not None else torch.ones(1, 1, dtype=torch.float64)
            right = _sylvester(d // core) / math.sqrt(d // core)
            break
    else:
        raise VitqError(f"no Hadamard matrix of order {d} here (supported: 2^k, 12*2^k, 20*2^k): "
                        "use rotation='orthogonal'")
    signs = torch.randint(0, 2, (d,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs, left, right


def hadamard_matrix(d: int, generator: torch.Generator) -> torch.Tensor:
    """:func:`hadamard_factors` as one dense orthogonal matrix (float64)."""
    signs, left, right = hadamard_factors(d, generator)
    return signs[:, None] * torch.kron(left, right)


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix of order ``d`` (float64): Q of a Gaussian's QR, signs fixed."""
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))


class InputRotation(nn.Module):
    """``x -> x R`` on the last dimension for a fixed orthogonal ``R``, saved with the model.

    Either a dense ``matrix`` (a random orthogonal R) or Hadamard factors ``signs``, ``left`` (c, c),
    ``right`` (m, m) with ``R = diag(signs) kron(left, right)``: ``x R`` is then
    ``leftᵀ X right`` on ``x ⊙ signs`` viewed as (c, m), (c + m) multiply-adds per element instead
    of d (fc2's 768-wide input: 76 instead of 768).
    """

    def __init__(self, matrix: torch.Tensor | None = None,
                 factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        if (matrix is None) == (factors is None):
            raise ValueError("give a dense matrix or Hadamard factors")
        if matrix is not None:
            self.register_buffer("matrix", matrix.float().contiguous())
            self.order = matrix.shape[0]
        else:
            signs, left, right = factors
            self.register_buffer("signs", signs.float().contiguous())
            self.register_buffer("left", left.float().contiguous())
            self.register_buffer("right", right.float().contiguous())
            self.order = signs.shape[0]

    @property
    def factored(self) -> bool:
        return not hasattr(self, "matrix")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x R``."""
        if not self.factored:
            return x @ self.matrix.to(x.dtype)
        c, m = self.left.shape[0], self.right.shape[0]
        y = (x * self.signs.to(x.dtype)).reshape(*x.shape[:-1], c, m)
        if c > 1:
            y = self.left.t().to(x.dtype) @ y
        return (y @ self.right.to(x.dtype)).reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x Rᵀ``."""
        if not self.factored:
            return x @ self.matrix.to(x.dtype).t()
        c, m = self.left.shape[0], self.right.shape[0]
        y = x.reshape(*x.shape[:-1], c, m) @ self.right.t().to(x.dtype)
        if c > 1:
            y = self.left.to(x.dtype) @ y
        return y.reshape(x.shape) * self.signs.to(x.dtype)

    def dense(self) -> torch.Tensor:
        """R itself (float32)."""
        return self(torch.eye(self.order, device=self.signs.device if self.factored else self.matrix.device))

    def extra_repr(self) -> str:
        return f"order={self.order}" + (", hadamard factors" if self.factored else "")


def make_rotation(kind: str, d: int, generator: torch.Generator) -> InputRotation:
    """A rotation of order ``d``: factored randomised Hadamard or dense random orthogonal."""
    if kind == "hadamard":
        return InputRotation(factors=hadamard_factors(d, generator))
    return InputRotation(matrix=random_orthogonal(d, generator))


def rotate_linear_inputs(model: nn.Module, kind: str, seed: int = 0) -> list[str]:
    """Rotate the input of every QuantLinear that quantizes its input; returns the layers' names.

    The weights become ``W R`` in place (the float model's function is unchanged up to float
    rounding); run it after :func:`vitq.adapters.prepare` and before calibration.
    """
    if check_rotation(kind) == "none":
        return []
    gen = torch.Generator().manual_seed(seed)
    done = []
    for name, module in quant_modules(model):
        if not isinstance(module, QuantLinear) or module.a_quantizer is None:
            continue
        if module.input_rotation is not None:
            raise VitqError(f"{name} is rotated already: rotate a freshly prepared model")
        rotation = make_rotation(kind, module.in_features, gen).to(module.weight.device)
        with torch.no_grad():
            w = module.weight
            w.copy_(rotation(w.float()).to(w.dtype))  # every row w_i becomes w_i R
        module.input_rotation = rotation
        done.append(name)
    return done


def check_rotation(kind: str) -> str:
    """``kind`` if it names a rotation, else a one-line VitqError."""
    if kind not in ROTATIONS:
        raise VitqError(f"unknown rotation {kind!r}: choose one of {', '.join(ROTATIONS)}")
    return kind


def _rotates(role: str) -> str:
    """How a matmul of this role rotates (QuantMatMul.rotates): q @ kᵀ on the contracted dim, attn @ v on v."""
    return "contracted" if role == "matmul1" else "b_and_output"


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
    if check_rotation(kind) == "none":
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
        module.operand_rotation = make_rotation(kind, d, gen)
        module.rotates = _rotates(role)
        done.append(name)
    return done


def restore_rotations(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Give a freshly prepared ``model`` the rotations a saved state has (before ``load_state_dict``)."""
    from .adapters import layer_role

    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parts = key.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in ("input_rotation", "operand_rotation"):
            found.setdefault((parts[0], parts[1]), {})[parts[2]] = value
    done = []
    for (name, slot), tensors in found.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise VitqError(f"the saved model rotates {name!r}, which this architecture lacks: "
                            "it was saved from another model") from None
        want = QuantLinear if slot == "input_rotation" else QuantMatMul
        if not isinstance(layer, want):
            raise VitqError(f"the saved model rotates {name!r}, a {type(layer).__name__} here, not a {want.__name__}")
        empty = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in tensors.items()}
        if set(empty) == {"matrix"}:
            rotation = InputRotation(matrix=empty["matrix"])
        elif set(empty) == {"signs", "left", "right"}:
            rotation = InputRotation(factors=(empty["signs"], empty["left"], empty["right"]))
        else:
            raise VitqError(f"the saved rotation of {name!r} has tensors {sorted(empty)}: it is damaged")
        setattr(layer, slot, rotation)
        if slot == "operand_rotation":
            layer.rotates = _rotates(layer_role(name))
        done.append(name)
    return done


__all__ = ["ROTATIONS", "InputRotation", "check_rotation", "hadamard_factors", "hadamard_matrix", "make_rotation", "hadamard_order_supported", "random_orthogonal",
           "restore_rotations", "rotate_attention_operands", "rotate_linear_inputs"]
