"""Calibration: the initial quantizer parameters of a prepared model.

Files: ``config`` (CalibConfig), ``stats`` (min-max / percentile / RepQ percentile-search rules),
``mse_search`` (FIMA-Q's grid search), ``repq_fold`` (the LayerNorm fold), ``driver`` (``calibrate``).

Methods (``CalibConfig.method``):

* ``minmax``: per-channel weights and per-tensor / per-head activations at their observed range.
* ``percentile``: weights at their range, activations clipped at the ``[100-p, p]`` percentiles.
* ``mse``: FIMA-Q's search (research note fimaq.md §1.3, §2.6): candidate grids of (scale, zero
  point), a "self" search on each tensor, then ``search_rounds`` rounds of coordinate descent
  on the *layer-output* MSE (weights per output row, activations per tensor, matmul operands per
  head), then token-wise expansion of the activation scales.
* ``repq``: RepQ-ViT's calibration: per-channel / per-tensor scales picked among a few
  percentile clips by the tensor's own MSE, the LayerNorm fold, log-sqrt2 post-softmax.

Like the official code, every layer is calibrated on full-precision inputs (the whole model
stays in float mode during calibration), in forward order, one reconstruction block at a time.

Deviations from the official code, each deliberate:

* the 6- and 8-bit zero-point candidates are centred on the data's midpoint instead of the
  fixed ``2^(b-1) ± 8`` window that confines 6-bit zero points to 24..39 (fimaq.md §7.11);
  at 2..4 bits every zero point is a candidate, exactly as in the official grid;
* the RepQ fold runs whenever ``reparam`` is on, not only when ``a_bits == w_bits`` (§7.12);
* the weight-row output MSE is computed exactly from Gram matrices of the inputs, and the
  activation / matmul output MSE on every calibration image up to a cap (``max_search_tokens``
  rows, ``max_search_elements`` matmul-output elements) that only bites on full-size models, so
  that CPU runs stay affordable there; the official code uses every
  token of the 128 calibration images on a GPU.
"""
from .config import METHODS, CalibConfig
from .driver import calibrate, keep_zero_points_in_codes
from .mse_search import _grid  # noqa: F401  (tests)
from .mse_search import search_conv_mse, search_linear_mse, search_matmul_mse
from .repq_fold import reparam_layernorm
from .stats import REPQ_PERCENTILES, fake_quant, init_by_method, init_minmax, init_percentile, init_percentile_search

__all__ = [
    "METHODS", "REPQ_PERCENTILES", "CalibConfig", "calibrate", "fake_quant", "init_by_method", "init_minmax",
    "init_percentile", "init_percentile_search", "keep_zero_points_in_codes", "reparam_layernorm", "search_conv_mse", "search_linear_mse",
    "search_matmul_mse",
]
