"""The extension interface of the reconstruction engine: how a method adds to the block loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import torch
import torch.nn as nn

from ..quantizers.kernels import keep_where

if TYPE_CHECKING:
    from .config import ReconConfig


@dataclass
class BlockContext:
    """What an extension sees of the block being reconstructed."""

    model: nn.Module
    name: str
    block: nn.Module
    x_fp: torch.Tensor
    x_q: torch.Tensor
    y_fp: torch.Tensor
    cfg: "ReconConfig"
    device: torch.device
    gen: torch.Generator

    def batch(self, idx: torch.Tensor, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The block input and float target for sample indices ``idx`` (per ``cfg.input_mode``).

        ``rows``: the part of the batch this process computes (a rank's slice); QDrop's input mask
        is drawn for the whole batch all the same, so the generator advances as in one process,
        and only the rows kept are gathered from the caches.
        """
        full = len(idx)
        idx = idx[rows]
        xb_fp, yb = self.x_fp[idx].to(self.device), self.y_fp[idx].to(self.device)
        if self.cfg.input_mode == "rinp":
            return xb_fp, yb
        xb_q = self.x_q[idx].to(self.device)
        if self.cfg.input_mode == "qinp":
            return xb_q, yb
        keep = keep_where((full, *xb_fp.shape[1:]), self.cfg.drop_prob, self.gen)[rows].to(self.device)
        return torch.where(keep, xb_q, xb_fp), yb


class BlockExtension:
    """Hooks a method adds to the reconstruction loop (AIQViT uses them). Every hook is optional.

    ``begin_block`` runs once the block's quantizers are trainable and returns extra parameter
    groups (Adam, cosine-annealed with the activation scales); ``sample`` may choose each
    batch's indices; ``end_block`` adds to the block summary; ``restore_block`` re-creates the
    extension's modules of a finished block before a resumed run loads its state; ``finalize``
    runs after the last block, before the AdaRound weights are folded.
    """

    def begin_block(self, ctx: BlockContext) -> list[dict[str, Any]]:
        return []

    def sample(self, it: int, n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor | None:
        return None

    def end_block(self, ctx: BlockContext) -> dict[str, Any]:
        return {}

    def restore_block(self, model: nn.Module, name: str, block: nn.Module, summary: dict[str, Any]) -> None:
        pass

    def finalize(self, model: nn.Module) -> dict[str, Any]:
        return {}
