"""Capturing a module's inputs with hooks while running only the part of the model before it."""

from __future__ import annotations

import torch
import torch.nn as nn


class StopForward(Exception):
    """Raised by a capture hook once the wanted tensor is in hand: the rest of the pass is skipped."""


@torch.no_grad()
def run_until_stopped(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                      handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Run ``model`` over ``images`` in batches; hooks raise :class:`StopForward` to cut each pass short.

    The hooks in ``handles`` are removed afterwards, whatever happens.
    """
    try:
        for i in range(0, len(images), batch_size):
            try:
                model(images[i:i + batch_size].to(device))
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
