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

QDrop's coins are 16-bit random integers, four to one 64-bit draw of torch's generator: the
float draws they replace (``rand < p``, one serial 32-bit draw per coin) were about a seventh of a compiled
iteration on a CPU (benchmarks/speed.md). Every kernel path draws the same coins; ``float_draws()``
brings back the float stream of runs before, to reproduce their tables exactly.

AdaRound's soft weight and its rounding regulariser are autograd functions of the same kind: one
node each, gradients to ``alpha`` written directly.

``compiled_kernels()`` runs the elementwise part of these functions through ``torch.compile``
(one fused loop instead of a dozen passes over memory; the QDrop draws stay eager, so the random
stream is the same). Where compilation fails (no C++ compiler, no triton) it warns once and the
same functions run eagerly. ``reference_kernels()`` switches back to the plain-autograd path
(tests compare the paths; the speed benchmark times them in the same run).

The calibration search scores thousands of candidate grids, each a handful of elementwise passes
over the captured activations: ``fake_quant_values``, ``quant_error``, ``quant_sq_error`` and
``sq_diff_sum`` are one fused loop each under ``compiled_kernels()`` (benchmarks/calib_speed.md).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch

from ..distributed import random_int16, random_int16_like, uniform_like

_REFERENCE = False
_COMPILE = False
_FLOAT_DRAWS = False  # QDrop's coins from float draws (the stream before 16-bit draws)
_COMPILE_FAILED: str | None = None  # why torch.compile is unavailable here, once it failed


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


@contextlib.contextmanager
def compiled_kernels(active: bool = True) -> Iterator[None]:
    """Inside, the fused kernels run through ``torch.compile`` (eagerly where that fails)."""
    global _COMPILE
    saved, _COMPILE = _COMPILE, bool(active)
    try:
        yield
    finally:
        _COMPILE = saved


def compile_status() -> str:
    """``compiled``, ``eager`` or ``eager (torch.compile failed: ...)``: what the fused kernels run as now."""
    if _COMPILE_FAILED is not None:
        return f"eager (torch.compile failed: {_COMPILE_FAILED})"
    return "compiled" if _COMPILE else "eager"


class _Fused:
    """A pure elementwise tensor function (no autograd inside), compiled on first use under
    :func:`compiled_kernels`. Dynamic shapes: one compiled kernel serves every batch and width."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        global _COMPILE_FAILED
        if _COMPILE and _COMPILE_FAILED is None:
            if self.compiled is None:
                # one graph per input pattern (QDrop or not, zero point or not, which gradients, the
                # scale's broadcast): more than dynamo's default 8, after which it would run eagerly
                import torch._dynamo.config as dynamo_config

                dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
                self.compiled = torch.compile(self.fn, dynamic=True)
            try:
                return self.compiled(*args)
            except Exception as exc:  # a pure function: running it eagerly instead is safe
                _COMPILE_FAILED = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                warnings.warn(f"vitq: torch.compile of the fake-quantization kernels failed ({_COMPILE_FAILED}); "
                              "running them eagerly (same results, slower)", RuntimeWarning, stacklevel=2)
        return self.fn(*args)


@contextlib.contextmanager
def float_draws(active: bool = True) -> Iterator[None]:
    """Inside, QDrop draws one float per coin (``rand < p``), the random stream of runs before the
    16-bit draws: to reproduce an older table exactly, or to time the old draws."""
    global _FLOAT_DRAWS
    saved, _FLOAT_DRAWS = _FLOAT_DRAWS, bool(active)
    try:
        yield
    finally:
        _FLOAT_DRAWS = saved


def _int16_threshold(keep_prob: float) -> int | None:
    """The int16 bound below which a 16-bit coin keeps, or None where every coin keeps."""
    threshold = round(keep_prob * 65536)
    return None if threshold >= 65536 else max(threshold, 0) - 32768  # 65536 would overflow the comparison


def qdrop_keep(x: torch.Tensor, keep_prob: float) -> torch.Tensor | None:
    """QDrop's coins for ``x`` as a 0/1 uint8 mask (1: keep the quantized value), or None where every
    value is kept (``keep_prob`` within 2^-17 of 1: nothing to draw).

    Each coin is a 16-bit integer (:func:`~vitq.distributed.random_int16_like`) compared with
    ``keep_prob`` rounded to a multiple of 1/65,536; under :func:`float_draws`, a float. uint8,
    not bool: the compiled kernels vectorise a uint8 mask and not a bool one (4-9x on this CPU).
    """
    if _FLOAT_DRAWS:
        return (uniform_like(x) < keep_prob).view(torch.uint8) if keep_prob < 1.0 else None
    threshold = _int16_threshold(keep_prob)
    return None if threshold is None else (random_int16_like(x) < threshold).view(torch.uint8)


def keep_where(shape: torch.Size | tuple[int, ...], keep_prob: float, generator: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` from ``generator``, True with probability ``keep_prob`` (QDrop on a
    block's input): 16-bit coins as :func:`qdrop_keep`, floats under :func:`float_draws`."""
    if _FLOAT_DRAWS:
        return torch.rand(shape, generator=generator) < keep_prob
    threshold = _int16_threshold(keep_prob)
    if threshold is None:
        return torch.ones(shape, dtype=torch.bool)
    return random_int16(shape, generator=generator) < threshold


def keep_mask(x: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """QDrop's mask as 0/1 values in ``x``'s dtype: 1 where the quantized value is kept."""
    keep = qdrop_keep(x, keep_prob)
    return torch.ones_like(x) if keep is None else keep.to(x.dtype)


def qdrop_select(x: torch.Tensor, x_hat: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """``x_hat`` where QDrop keeps the quantized value, else ``x``, by a 0/1 multiply (exact for finite values)."""
    if _REFERENCE:
        keep = qdrop_keep(x, keep_prob)
        return x_hat if keep is None else torch.where(keep.bool(), x_hat, x)
    m = keep_mask(x, keep_prob)
    return torch.addcmul(x * (1 - m), x_hat, m)


def _fake_quant_plain(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
                      ) -> torch.Tensor:
    """The reference ops out of place (what the compiler fuses into one loop)."""
    q = torch.round(x / scale)
    if zero_point is None:
        return q.clamp(qmin, qmax) * scale
    return ((q + zero_point).clamp(qmin, qmax) - zero_point) * scale


def _quant_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
                 ) -> torch.Tensor:
    return _fake_quant_plain(x, scale, zero_point, qmin, qmax) - x


def _quant_sq_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                    dim: int | None) -> torch.Tensor:
    """``sum((Q(x) - x)^2)`` over ``dim`` (None: all) in one pass, for the calibration searches."""
    e = _quant_error(x, scale, zero_point, qmin, qmax)
    return (e * e).sum() if dim is None else (e * e).sum(dim)


def _sq_diff_sum(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """``sum((a - b)^2)`` over ``dims`` keeping them (None: all, as shape (1,))."""
    d = a - b
    return (d * d).sum().reshape(1) if dims is None else (d * d).sum(dim=dims, keepdim=True)


_fake_quant_plain_fused = _Fused(_fake_quant_plain)
_quant_sq_error_fused = _Fused(_quant_sq_error)
_quant_error_fused = _Fused(_quant_error)
_sq_diff_sum_fused = _Fused(_sq_diff_sum)


def _compiling() -> bool:
    return _COMPILE and _COMPILE_FAILED is None


def _broadcasts_into(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts against ``target`` without enlarging it (an in-place op is safe).

    The same answer as ``torch.broadcast_shapes(target, shape) == target`` (which raises where they
    do not broadcast at all) for a fraction of its cost: the searches call this tens of thousands of times.
    """
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def workspace_for(x: torch.Tensor) -> torch.Tensor | None:
    """A buffer shaped like ``x`` for the eager search kernels to write each candidate into, or None
    where the compiled kernels run (they need none).

    Why: a search scores a hundred or more candidates, each through an error tensor the size of
    the layer's whole calibration input. With a new one per candidate, a one-process calibration's
    resident memory was seen to climb from 1.9 to 4.4 GB within single searches and fall back after
    (cifar10_vit, 128 images; the stack in these kernels), most likely glibc's heap fragmenting; the
    peaks come and go from run to run (benchmarks/distributed.md). One buffer per search computes
    the same numbers without those allocations.
    """
    return None if _compiling() else torch.empty_like(x)


def _fits(out: torch.Tensor | None, x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether ``x / scale`` can be written into ``out`` exactly as a new tensor would hold it."""
    return (out is not None and out.shape == x.shape and out.dtype == torch.result_type(x, scale)
            and out.device == x.device and _broadcasts_into(scale.shape, x.shape))


def fake_quant_values(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The fake-quantized values only (no gradient): the reference ops, in place on one buffer
    (one fused loop under :func:`compiled_kernels`).

    ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; ``zero_point`` None for a symmetric grid.
    ``out``: a workspace the eager path writes into (see :func:`workspace_for`), else a new tensor.
    """
    with torch.no_grad():
        if _compiling():
            return _fake_quant_plain_fused(x, scale, zero_point, qmin, qmax)
        q = torch.div(x, scale, out=out) if _fits(out, x, scale) else torch.div(x, scale)
        q.round_()
        if zero_point is not None and _broadcasts_into(zero_point.shape, q.shape):
            q.add_(zero_point)
            q.clamp_(qmin, qmax)
            q.sub_(zero_point)
        elif zero_point is not None:  # a zero point that broadcasts x / s further: out of place
            q = q.add(zero_point).clamp_(qmin, qmax).sub_(zero_point)
        else:
            q.clamp_(qmin, qmax)
        return q.mul_(scale)


def quant_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``Q(x) - x`` (no gradient): a search candidate's quantization error (``out``: as in
    :func:`fake_quant_values`)."""
    with torch.no_grad():
        if _compiling():
            return _quant_error_fused(x, scale, zero_point, qmin, qmax)
        return fake_quant_values(x, scale, zero_point, qmin, qmax, out).sub_(x)


def quant_sq_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   dim: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum((Q(x) - x)^2)`` over ``dim`` (None: every element), no gradient (``out``: as in
    :func:`fake_quant_values`)."""
    with torch.no_grad():
        if _compiling():
            return _quant_sq_error_fused(x, scale, zero_point, qmin, qmax, dim)
        e = quant_error(x, scale, zero_point, qmin, qmax, out).pow_(2)
        return e.sum() if dim is None else e.sum(dim)


def sq_diff_sum(a: torch.Tensor, b: torch.Tensor, dims: list[int] | None = None) -> torch.Tensor:
    """``sum((a - b)^2)`` over ``dims``, kept as size-1 dimensions (None: all, shape (1,)); ``a`` may be overwritten."""
    with torch.no_grad():
        if _compiling():
            return _sq_diff_sum_fused(a, b, None if dims is None else tuple(dims))
        e = a.sub_(b).pow_(2)
        return e.sum().reshape(1) if dims is None else e.sum(dim=dims, keepdim=True)


def _fake_quant_parts(x: torch.Tensor, keep: torch.Tensor | None, scale: torch.Tensor,
                      zero_point: torch.Tensor | None, qmin: int, qmax: int, need_x: bool,
                      need_scale: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(fake-quantized output, d out / d x, d out / d scale) elementwise; ``keep``: QDrop's 0/1 uint8
    mask (:func:`qdrop_keep`) or None.

    In-place ops on its own intermediates keep the eager run to few buffers; compiled, they fuse.
    """
    v = x / scale
    q = torch.round(v)
    if zero_point is not None:
        q = q.add_(zero_point) if _broadcasts_into(zero_point.shape, q.shape) else q + zero_point
    # the gradient passes where the clamp's input is strictly inside (qmin, qmax): what autograd's
    # clamp backward gives in this torch (0 at the bounds), so both paths learn the same way
    inside = ((q > qmin) & (q < qmax)).to(x.dtype)
    q.clamp_(qmin, qmax)
    if zero_point is not None:
        q.sub_(zero_point)
    x_hat = q * scale
    grad_scale = torch.addcmul(q, v, inside, value=-1.0) if need_scale else None  # (q - z) - [inside] * x / s
    if keep is None:
        return x_hat, inside if need_x else None, grad_scale
    m = keep.to(x.dtype)
    if grad_scale is not None:
        grad_scale.mul_(m)
    dropped = 1 - m
    grad_x = torch.addcmul(dropped, m, inside) if need_x else None  # kept: [inside]; dropped: 1
    return torch.addcmul(x * dropped, x_hat, m), grad_x, grad_scale


def _times(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return grad * factor


_fake_quant_fused = _Fused(_fake_quant_parts)
_times_fused = _Fused(_times)


class _FakeQuantSTE(torch.autograd.Function):
    """Uniform fake quantization with straight-through rounding, a learnable scale and QDrop."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                keep_prob: float | None) -> torch.Tensor:
        need_x, need_scale = ctx.needs_input_grad[:2]  # only the factors a gradient will use
        keep = None if keep_prob is None else qdrop_keep(x, keep_prob)  # eager: one stream on every path
        out, grad_x, grad_scale = _fake_quant_fused(x, keep, scale, zero_point, qmin, qmax, need_x, need_scale)
        ctx.save_for_backward(grad_x, grad_scale)
        ctx.scale_shape = scale.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x, grad_scale = ctx.saved_tensors
        gx = _times_fused(grad, grad_x) if ctx.needs_input_grad[0] else None
        gs = _times_fused(grad, grad_scale).sum_to_size(ctx.scale_shape) if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None, None


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                   keep_prob: float | None = None) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with STE gradients to ``x`` and ``scale``.

    ``zero_point``: the integer zero point (None: symmetric grid). ``keep_prob``: QDrop's
    probability of keeping the quantized value (None: no QDrop).
    """
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, keep_prob)


# ---- AdaRound: the soft weight and the rounding regulariser (adaround.py)

def _rectified_sigmoid(alpha: torch.Tensor, zeta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, d h / d alpha) of ``h = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`` (0 where clamped)."""
    sig = torch.sigmoid(alpha)
    raw = sig * (zeta - gamma) + gamma
    inside = ((raw > 0) & (raw < 1)).to(alpha.dtype)
    return raw.clamp(0, 1), sig * (1 - sig) * (zeta - gamma) * inside


def _adaround_parts(w: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    qmin: int, qmax: int, zeta: float, gamma: float, need_w: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(soft weight, d w_hat / d alpha, straight-through d w_hat / d w or None)."""
    h, dh = _rectified_sigmoid(alpha, zeta, gamma)
    t = torch.floor(w / scale) + h + zero_point
    q = t.clamp(qmin, qmax)
    grad_alpha = dh * ((t > qmin) & (t < qmax)).to(w.dtype) * scale
    grad_w = None
    if need_w:  # the input's straight-through path inside the grid (the floor has no gradient)
        u = w / scale + zero_point
        grad_w = ((u >= qmin) & (u <= qmax)).to(w.dtype)
    return (q - zero_point) * scale, grad_alpha, grad_w


def _round_loss_parts(alpha: torch.Tensor, beta: torch.Tensor, zeta: float, gamma: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sum(1 - |2h - 1|^beta)``, its gradient to alpha); ``beta`` a 0-d tensor (no recompile per value)."""
    h, dh = _rectified_sigmoid(alpha, zeta, gamma)
    d = 2 * h - 1
    a = d.abs()
    p = a.pow(beta)
    # d/dalpha of -|d|^beta = -beta |d|^(beta - 1) sign(d) 2 dh; |d|^(beta-1) = p / |d| (0 where d = 0)
    slope = torch.where(a > 0, p / a.clamp(min=1e-30), torch.zeros_like(a)) * torch.sign(d)
    return (1 - p).sum(), slope * dh * (-2.0 * beta)


_adaround_fused = _Fused(_adaround_parts)
_round_loss_fused = _Fused(_round_loss_parts)


class _AdaRoundSoft(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                qmin: int, qmax: int, zeta: float, gamma: float) -> torch.Tensor:
        out, grad_alpha, grad_w = _adaround_fused(w, alpha, scale, zero_point, qmin, qmax, zeta, gamma,
                                                  ctx.needs_input_grad[0])
        ctx.save_for_backward(grad_alpha, grad_w)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_alpha, grad_w = ctx.saved_tensors
        gw = _times_fused(grad, grad_w) if ctx.needs_input_grad[0] else None
        ga = _times_fused(grad, grad_alpha) if ctx.needs_input_grad[1] else None
        return gw, ga, None, None, None, None, None, None


class _RoundLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alpha: torch.Tensor, beta: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
        loss, grad_alpha = _round_loss_fused(alpha, beta, zeta, gamma)
        ctx.save_for_backward(grad_alpha)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_alpha,) = ctx.saved_tensors
        return _times_fused(grad, grad_alpha), None, None, None


def adaround_soft_weight(w: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         qmin: int, qmax: int, zeta: float, gamma: float) -> torch.Tensor:
    """``s * (clamp(floor(w/s) + h(alpha) + z, qmin, qmax) - z)`` as one autograd node (gradients to
    ``alpha`` and, straight through inside the grid, to ``w``)."""
    return _AdaRoundSoft.apply(w, alpha, scale, zero_point, qmin, qmax, zeta, gamma)


def adaround_round_loss(alpha: torch.Tensor, beta: float, zeta: float, gamma: float) -> torch.Tensor:
    """AdaRound's regulariser ``sum(1 - |2 h(alpha) - 1|^beta)`` as one autograd node."""
    return _RoundLoss.apply(alpha, torch.tensor(float(beta), dtype=alpha.dtype, device=alpha.device), zeta, gamma)
