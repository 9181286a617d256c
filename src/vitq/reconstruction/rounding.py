"""A block's quantizers during reconstruction: learned rounding in, trainable state, fold out.

Everything here goes through the quantizer interface (``vitq.quantizers.base.Quantizer``); no
concrete quantizer type is named.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..qmodules import QuantModule
from ..quantizers import Quantizer

ACTIVATION_SLOTS = ("a_quantizer", "b_quantizer")


def block_quant_modules(block: nn.Module) -> list[QuantModule]:
    return [m for m in block.modules() if isinstance(m, QuantModule)]


def activation_quantizers(block: nn.Module) -> list[Quantizer]:
    """Enabled activation (input / matmul operand) quantizers of ``block``, in forward order."""
    out = []
    for m in block_quant_modules(block):
        for slot in ACTIVATION_SLOTS:
            q = getattr(m, slot, None)
            if q is not None and q.enabled:
                out.append(q)
    return out


def install_learned_rounding(block: nn.Module) -> list[Quantizer]:
    """Give each weight quantizer of ``block`` its learned-rounding form (AdaRound); returns those."""
    installed = []
    for m in block_quant_modules(block):
        q = getattr(m, "w_quantizer", None)
        rounding = q.learned_rounding(m.weight) if q is not None else None
        if rounding is not None:
            m.w_quantizer = rounding
            installed.append(rounding)
    return installed


@torch.no_grad()
def fold_learned_rounding(model: nn.Module) -> int:
    """Write every final learned rounding into its weight and put back the plain quantizer.

    Nearest rounding of a folded weight reproduces it exactly. Returns how many were folded.
    """
    folded = 0
    for m in block_quant_modules(model):
        q = getattr(m, "w_quantizer", None)
        result = q.fold_into(m.weight) if q is not None else None
        if result is not None:
            m.weight.data, m.w_quantizer = result
            folded += 1
    return folded
