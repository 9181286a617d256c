"""Top-1 / top-5 evaluation with a progress bar."""

from __future__ import annotations

import time
from typing import Any

import torch
from timm.utils import accuracy
from tqdm.auto import tqdm

from . import distributed
from .errors import VitqError


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (percent) of ``model`` over ``loader``.

    Raises :class:`VitqError` if the model produces NaN/Inf logits (a broken
    quantizer or checkpoint), naming the batch. Distributed, each rank evaluates its contiguous
    slice of the dataset and the counts are summed (every rank returns the totals).
    """
    device = torch.device(device)
    dist = distributed.current()
    if dist is not None:
        start, stop = dist.span(len(loader.dataset))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(loader.dataset, range(start, stop)),
                                             batch_size=loader.batch_size, num_workers=loader.num_workers,
                                             pin_memory=loader.pin_memory)
        progress = progress and dist.is_main
    model.eval().to(device)
    correct1 = correct5 = seen = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(loader.dataset), desc=desc, unit="img", disable=not progress, leave=False)
    for batch_idx, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        if isinstance(logits, (tuple, list)):  # distilled DeiT in train mode returns two heads
            logits = (logits[0] + logits[1]) / 2
        if not torch.isfinite(logits).all():
            raise VitqError(f"the model produced NaN/Inf logits on evaluation batch {batch_idx}: "
                            "the checkpoint or quantization parameters are broken")
        acc1, acc5 = accuracy(logits, y, topk=(1, min(5, logits.shape[1])))  # percent of the batch
        correct1 += round(acc1.item() * len(y) / 100)
        correct5 += round(acc5.item() * len(y) / 100)
        seen += len(y)
        bar.update(len(y))
        bar.set_postfix(top1=f"{100.0 * correct1 / seen:.2f}")
    bar.close()
    correct1, correct5, seen = (round(v) for v in distributed.sum_floats([correct1, correct5, seen], "evaluation"))
    if seen == 0:
        raise VitqError("the evaluation data is empty")
    seconds = time.perf_counter() - t0
    return {
        "top1": round(100.0 * correct1 / seen, 4),
        "top5": round(100.0 * correct5 / seen, 4),
        "images": seen,
        "seconds": round(seconds, 3),
        "images_per_second": round(seen / seconds, 1),
    }
