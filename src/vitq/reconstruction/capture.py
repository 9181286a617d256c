"""Caching what a block sees: its input over the optimisation images, and batched block outputs."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch
import torch.nn as nn

from .. import distributed
from ..adapters import block_input_source, forward_after
from ..distributed import sharded_map
from ..capture import StopForward, run_until_stopped


def _stop_at_block_input(model: nn.Module, name: str, block: nn.Module, keep: Callable[[torch.Tensor], None]
                         ) -> torch.utils.hooks.RemovableHandle:
    """A hook that hands block ``name``'s input to ``keep`` and stops the pass there."""
    source, from_output = block_input_source(model, name, block)

    def pre_hook(_m: nn.Module, inputs: tuple) -> None:
        keep(inputs[0].detach())
        raise StopForward

    def post_hook(_m: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        keep(output.detach())
        raise StopForward

    return source.register_forward_hook(post_hook) if from_output else source.register_forward_pre_hook(pre_hook)


@torch.no_grad()
def capture_block_input(model: nn.Module, name: str, block: nn.Module, images: torch.Tensor, batch_size: int,
                        device: torch.device, store: torch.device) -> torch.Tensor:
    """The input of block ``name`` over ``images`` with the model's current modes.

    Distributed, each rank runs its slice of the images and every rank gets all the inputs.
    """
    chunks: list[torch.Tensor] = []
    handle = _stop_at_block_input(model, name, block, lambda t: chunks.append(t.to(store)))
    run_until_stopped(model, distributed.local_rows(images), batch_size, device, [handle])
    return distributed.gather_rows(torch.cat(chunks))


class _NotReached(Exception):
    """The rest of the network after a block did not reach the next block's input."""


@torch.no_grad()
def step_block_input(model: nn.Module, name: str, block: nn.Module, x: torch.Tensor, next_name: str,
                     next_block: nn.Module, batch_size: int, device: torch.device, store: torch.device,
                     from_output: bool = False) -> torch.Tensor | None:
    """The input of block ``next_name`` from the input ``x`` of the block ``name`` just before it.

    Runs that block and what follows it (the adapter's ``forward_after``) up to the next block's
    input, with the model's current modes: the same tensor :func:`capture_block_input` gets by
    running the whole prefix again, for the cost of one block instead of all those before it (the
    captures of a reconstruction would otherwise grow with the square of the depth). None when the
    rest of the network does not reach the next block's input; the caller captures it in full.
    With ``from_output``, ``x`` is the block's output in these modes instead (the float targets
    its reconstruction computed, batched the same way): then only what follows the block runs.
    """
    got: list[torch.Tensor] = []

    def step(xb: torch.Tensor) -> torch.Tensor:
        got.clear()
        try:
            forward_after(model, name, xb if from_output else block(xb))
        except StopForward:
            pass
        if len(got) != 1:
            raise _NotReached
        return got[0]

    handle = _stop_at_block_input(model, next_name, next_block, got.append)
    try:
        return sharded_map(step, x, batch_size, device, store)
    except (_NotReached, NotImplementedError):  # NotImplementedError: an adapter without forward_after
        return None
    finally:
        handle.remove()


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device: torch.device,
            store: torch.device) -> torch.Tensor:
    """``fn`` over ``x`` in batches on ``device``, results gathered on ``store``."""
    return torch.cat([fn(x[i:i + batch_size].to(device)).detach().to(store) for i in range(0, len(x), batch_size)])


def spill_to_disk(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a read-only memory-mapped file (``$VITQ_CACHE_DIR`` or the temp dir): pages come in
    as batches are read and the kernel may drop them again, so a large cache does not stay resident.

    The file is unlinked at once: the mapping keeps it alive and nothing is left behind after a crash.
    """
    folder = os.environ.get("VITQ_CACHE_DIR") or tempfile.gettempdir()
    data = t.detach().contiguous().cpu()
    fd, path = tempfile.mkstemp(prefix="vitq-cache-", suffix=".bin", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.reshape(-1).view(torch.uint8).numpy().data)
        mapped = torch.from_file(path, shared=False, size=data.numel(), dtype=data.dtype)
    finally:
        os.unlink(path)
    return mapped.reshape(data.shape)


def keep_cache(t: torch.Tensor, on_disk: bool) -> torch.Tensor:
    """A cache as the settings keep it: in memory as it is, or memory-mapped from disk."""
    return spill_to_disk(t) if on_disk else t
