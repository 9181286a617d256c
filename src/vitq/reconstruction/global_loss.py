"""The global term of a GLF-Q-style loss: a block's output seen through the rest of the network.

The block's quantized output runs through the frozen float rest of the network (the adapter's
``forward_after``) and is matched at the penultimate feature, the classifier Linear's input, to
the float model's feature for the same image. The local loss asks the block to reproduce its own
output; this term asks it to reproduce what the network does with that output.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from ..adapters import adapter_for, forward_after
from ..distributed import sharded_map


@contextlib.contextmanager
def _classifier_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside, every call of the classifier Linear(s) appends its input to the yielded list."""
    captured: list[torch.Tensor] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
               for name in adapter_for(model).head_linear_names(model)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _feature(captured: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """(B, F): the classifier inputs side by side (DeiT-distilled has two), or the output itself
    for a model without a classifier Linear."""
    parts = captured or [output]
    return torch.cat([c.reshape(len(c), -1) for c in parts], 1)


def penultimate_after(model: nn.Module, block_name: str, y: torch.Tensor) -> torch.Tensor:
    """The penultimate feature of ``model`` given ``y``, the output of block ``block_name``."""
    with _classifier_inputs(model) as captured:
        out = forward_after(model, block_name, y)
    return _feature(captured, out)


@torch.no_grad()
def penultimate_features(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                         store: torch.device) -> torch.Tensor:
    """The penultimate features of ``images`` under the model's current quant modes (sharded)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with _classifier_inputs(model) as captured:
            out = model(x)
        return _feature(captured, out)

    return sharded_map(run, images, batch_size, device, store)
