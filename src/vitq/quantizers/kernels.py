"""Fast fake-quantization kernels for reconstruction, and the reference path they replace.

Why: on a CPU the reconstruction step of a block was twice its float forward + backward, and the
profile put the excess in ``torch.where`` (QDrop's select and the clamp's backward each cost ~10x
a multiply) and in the dozen elementwise ops autograd records per quantizer (benchmarks/speed.md).
Here the uniform fake quantizer with a learnable scale is one autograd function that computes its
two gradient factors in the forward pass, and QDrop selects with a 0/1 multiply.

* Forward values are bit-identical to the reference: ``x_hat * m + x * (1 - m)`` with ``m`` in
  {0, 1} is exactly the selected value, and the quantization ops are the same ops.
* Gradients are the same straight-through / LSQ-like formulas, written directly
  (``d x_hat / d s = (q - z) - [inside] * x / s``) instead of through autograd's chain, so they
  differ from the reference in the last bits only. QDrop draws the same random numbers.

``reference_kernels()`` switches back to the plain-autograd path (tests compare the two; the speed
benchmark times the old path in the same run).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..distributed import uniform_like

_REFERENCE = False


def reference_active() -> bool:
    """True inside :func:`reference_kernels`: quantizers use the plain-autograd path."""
    return _REFERENCE


@contextlib.contextmanager
def reference_kernels(active: bool = True) -> Iterator[None]:
    """Use the plain-autograd fake quantization (the path before the fast kernels) inside the block."""
    global _REFERENCE
    saved, _REFERENCE = _REFERENCE, active
    try:
        yield
    finally:
        _REFERENCE = saved


def keep_mask(x: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """QDrop's mask as 0/1 floats: 1 where the quantized value is kept (same draws as ``rand < p``)."""
    return uniform_like(x).lt_(keep_prob)


def qdrop_select(x: torch.Tensor, x_hat: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """``where(rand < keep_prob, x_hat, x)`` by a 0/1 multiply (exact for finite values)."""
    if _REFERENCE:
        return torch.where(uniform_like(x) < keep_prob, x_hat, x)
    m = keep_mask(x, keep_prob)
    return torch.addcmul(x * (1 - m), x_hat, m)


def fake_quant_values(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
                      ) -> torch.Tensor:
    """The fake-quantized values only (no gradient): the reference ops, in place on one buffer.

    ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; ``zero_point`` None for a symmetric grid.
    """
    with torch.no_grad():
        q = torch.div(x, scale)
        q.round_()
        if zero_point is not None and torch.broadcast_shapes(q.shape, zero_point.shape) == q.shape:
            q.add_(zero_point)
            q.clamp_(qmin, qmax)
            q.sub_(zero_point)
        elif zero_point is not None:  # a zero point that broadcasts x / s further: out of place
            q = q.add(zero_point).clamp_(qmin, qmax).sub_(zero_point)
        else:
            q.clamp_(qmin, qmax)
        return q.mul_(scale)


class _FakeQuantSTE(torch.autograd.Function):
    """Uniform fake quantization with straight-through rounding, a learnable scale and QDrop."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                keep_prob: float | None) -> torch.Tensor:
        v = x / scale
        q = torch.round(v)
        if zero_point is not None:
            q.add_(zero_point)
        # the gradient passes where the clamp's input is strictly inside (qmin, qmax): what autograd's
        # clamp backward gives in this torch (0 at the bounds), so both paths learn the same way
        inside = ((q > qmin) & (q < qmax)).to(x.dtype)
        q.clamp_(qmin, qmax)
        if zero_point is not None:
            q.sub_(zero_point)
        x_hat = q * scale
        need_x, need_scale = ctx.needs_input_grad[:2]  # only the factors a gradient will use
        grad_scale = torch.addcmul(q, v, inside, value=-1.0) if need_scale else None  # (q - z) - [inside] * x / s
        if keep_prob is None:
            grad_x, out = inside, x_hat
        else:
            m = keep_mask(x, keep_prob)
            if grad_scale is not None:
                grad_scale.mul_(m)
            dropped = 1 - m
            grad_x = torch.addcmul(dropped, m, inside) if need_x else None  # kept: [inside]; dropped: 1
            out = torch.addcmul(x * dropped, x_hat, m)
        ctx.save_for_backward(grad_x, grad_scale)
        ctx.scale_shape = scale.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x, grad_scale = ctx.saved_tensors
        gx = grad * grad_x if ctx.needs_input_grad[0] else None
        gs = (grad * grad_scale).sum_to_size(ctx.scale_shape) if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None, None


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                   keep_prob: float | None = None) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with STE gradients to ``x`` and ``scale``.

    ``zero_point``: the integer zero point (None: symmetric grid). ``keep_prob``: QDrop's
    probability of keeping the quantized value (None: no QDrop).
    """
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, keep_prob)
