"""Data parallelism over torch.distributed: one quantization run spread over several processes.

The design goal is that N processes compute what one process computes, to the float rounding of a
reordered sum, so a distributed run can be checked against (and resumed as) a single-process one:

* **Forward passes over images** (capturing a block's inputs, its float outputs, the FP logits) are
  sharded: rank r runs its contiguous slice of the images and the slices are gathered in rank
  order, so every rank holds exactly the tensors one process would.
* **Calibration searches** split their candidate grids: each rank scores its share of the
  candidates on all the data and the scores are gathered, so every rank picks the same parameters
  as one process (a candidate's score is computed exactly as one process computes it).
* **Block reconstruction** draws the same global batch on every rank and each rank runs its slice
  of it; the gradients of everything the optimisers update are summed over the ranks, so the step
  equals one process's step at the same global batch. QDrop's random masks are drawn for the global
  batch and sliced (:func:`sharded_draws`), so they equal one process's masks too. Fisher snapshots
  are sums over the images, summed over the ranks.
* **Evaluation** is sharded and the counts summed.

Rank 0 alone writes reports, checkpoints and artifacts. :func:`active` makes a process group the
one vitq uses (the CLI calls :func:`init_from_env` under ``torchrun``); without one every function
here is the single-process identity.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .errors import VitqError

# The header of a gathered tensor: rows, dtype code, ndim, then up to _MAX_DIMS trailing sizes.
_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
           torch.uint8)


class RankFailure(VitqError):
    """A collective failed: another rank died or lost contact."""


@dataclass(frozen=True)
class Dist:
    """The process group vitq runs on: this process's rank, the world size, the group's device."""

    group: Any
    rank: int
    world: int
    device: torch.device  # where collectives run: CUDA for NCCL, CPU for gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def span(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Rank ``rank``'s contiguous share of ``n`` items (torch.tensor_split's sizes)."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        start = r * base + min(r, extra)
        return start, start + base + (1 if r < extra else 0)


_ACTIVE: Dist | None = None


def current() -> Dist | None:
    """The process group vitq runs on, or None in a single process."""
    return _ACTIVE


def is_main() -> bool:
    """True on rank 0 and in a single process: the process that writes files and prints."""
    return _ACTIVE is None or _ACTIVE.is_main


def world_size() -> int:
    return 1 if _ACTIVE is None else _ACTIVE.world


def _group_device(group: Any) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def active(group: Any = None) -> Iterator[Dist | None]:
    """Make ``group`` (an initialised process group; None: the default group) the one vitq uses.

    With a world of one, torch.distributed not initialised, or ``group=False``, this is a
    single-process run (inside a distributed program too: e.g. work every rank does alone).
    """
    import torch.distributed as dist

    global _ACTIVE
    saved = _ACTIVE
    if group is not False and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        _ACTIVE = Dist(group, dist.get_rank(group), dist.get_world_size(group), _group_device(group))
    else:
        _ACTIVE = None
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = saved


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> torch.device:
    """Initialise the default process group from torchrun's environment; returns this rank's device.

    NCCL on CUDA (``LOCAL_RANK`` picks the GPU), gloo on CPU. ``VITQ_DIST_TIMEOUT`` (seconds,
    default 1800) bounds how long a rank waits for the others before giving up.
    """
    import torch.distributed as dist

    if not launched_by_torchrun() or dist.is_initialized():
        return device
    timeout = datetime.timedelta(seconds=float(os.environ.get("VITQ_DIST_TIMEOUT", "1800")))
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise VitqError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs here: "
                            "lower --nproc-per-node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a rank died, a timeout) into one line naming this rank."""
    try:
        yield
    except RuntimeError as exc:
        d = _ACTIVE
        rank = f"rank {d.rank} of {d.world}" if d else "this process"
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
        raise RankFailure(f"{rank}: the other ranks stopped answering during {what} ({first}); "
                          "rerun the same command to resume after the last finished block") from None


# ---------------------------------------------------------------------------------- collectives
def all_sum_(tensors: list[torch.Tensor], what: str = "a sum") -> None:
    """Sum ``tensors`` over the ranks, in place, as one flat collective."""
    d = _ACTIVE
    if d is None or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).to(d.device, torch.float64 if t.dtype == torch.float64 else torch.float32)
                      for t in tensors])
    with collective(what):
        dist.all_reduce(flat, group=d.group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].reshape(t.shape).to(t.dtype))
        offset += n


def batch_slice(total: int) -> tuple[int, int, float]:
    """(start, stop, share) of a global batch of ``total`` samples that this rank computes.

    Every rank draws the same global batch and runs its slice; a loss that is the slice's mean
    times ``share`` makes the ranks' gradients sum to the global batch's (one process: all of it, 1.0).
    """
    d = _ACTIVE
    start, stop = d.span(total) if d is not None else (0, total)
    return start, stop, (stop - start) / total


def sum_grads_(params: list[torch.Tensor], what: str = "a sum") -> None:
    """Sum the gradients of ``params`` over the ranks in place (a missing gradient counts as 0)."""
    if _ACTIVE is None:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_sum_([p.grad for p in params], what)


def sum_floats(values: list[float], what: str = "a sum") -> list[float]:
    """Python floats summed over the ranks (float64)."""
    if _ACTIVE is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    all_sum_([t], what)
    return t.tolist()


def gather_rows(t: torch.Tensor, what: str = "gathering tensors") -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order (rows may differ per rank, even 0).

    The result is on ``t``'s device with ``t``'s dtype.
    """
    d = _ACTIVE
    if d is None:
        return t
    import torch.distributed as dist

    if t.dim() - 1 > _MAX_DIMS:
        raise VitqError(f"cannot gather a {t.dim()}-d tensor (at most {_MAX_DIMS + 1} dims)")
    header = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64)
    header[0], header[1], header[2] = t.shape[0], _DTYPES.index(t.dtype), t.dim()
    header[3:3 + t.dim() - 1] = torch.tensor(t.shape[1:], dtype=torch.int64)
    headers = [torch.zeros_like(header).to(d.device) for _ in range(d.world)]
    with collective(what):
        dist.all_gather(headers, header.to(d.device), group=d.group)
    headers = [h.cpu() for h in headers]
    donor = next((h for h in headers if h[0] > 0), headers[0])
    dtype = _DTYPES[int(donor[1])]
    tail = tuple(int(s) for s in donor[3:3 + int(donor[2]) - 1])
    rows = [int(h[0]) for h in headers]
    width = max(rows)
    if width == 0:
        return torch.empty((0, *tail), dtype=dtype, device=t.device)
    local = torch.zeros((width, *tail), dtype=dtype, device=d.device)
    if t.shape[0]:
        local[: t.shape[0]] = t.to(d.device, dtype).reshape(t.shape[0], *tail)
    parts = [torch.empty_like(local) for _ in range(d.world)]
    with collective(what):
        dist.all_gather(parts, local, group=d.group)
    return torch.cat([p[:r] for p, r in zip(parts, rows)]).to(t.device)


def broadcast_object(obj: Any, what: str = "sharing state") -> Any:
    """Rank 0's ``obj`` on every rank."""
    d = _ACTIVE
    if d is None:
        return obj
    import torch.distributed as dist

    box = [obj if d.is_main else None]
    with collective(what):
        dist.broadcast_object_list(box, src=0, group=d.group, device=d.device)
    return box[0]


def gather_objects(obj: Any, what: str = "gathering results") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    d = _ACTIVE
    if d is None:
        return [obj]
    import torch.distributed as dist

    values: list[Any] = [None] * d.world
    with collective(what):
        dist.all_gather_object(values, obj, group=d.group)
    return values


def barrier(what: str = "waiting for the other ranks") -> None:
    d = _ACTIVE
    if d is None:
        return
    import torch.distributed as dist

    with collective(what):
        dist.barrier(group=d.group)


def check_same(value: Any, what: str) -> None:
    """A one-line error on every rank when ranks disagree on ``value`` (e.g. their arguments)."""
    d = _ACTIVE
    if d is None:
        return
    values = gather_objects(value, f"checking {what}")
    if any(v != values[0] for v in values):
        raise VitqError(f"the ranks disagree on {what} ({values[0]!r} on rank 0, {value!r} on rank {d.rank}): "
                        "start every rank with the same command")


# ---------------------------------------------------------------------------------- work splitting
def local_rows(t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """This rank's contiguous slice of ``t``'s first ``n`` rows (all of ``t`` in one process)."""
    d = _ACTIVE
    if d is None:
        return t
    start, stop = d.span(len(t) if n is None else n)
    return t[start:stop]


def sharded_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
                device: torch.device, store: torch.device) -> torch.Tensor:
    """``fn`` over this rank's slice of ``x`` in batches, gathered: every rank gets ``fn`` over all of ``x``."""
    part = local_rows(x)
    outs = [fn(part[i:i + batch_size].to(device)).detach().to(store) for i in range(0, len(part), batch_size)]
    if _ACTIVE is None:
        return torch.cat(outs)
    if not outs:  # this rank has no rows: one row of the output's shape, so the gather knows it
        probe = fn(x[:1].to(device)).detach().to(store)
        outs = [probe[:0]]
    return gather_rows(torch.cat(outs))


def split_candidates(n: int, score: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``torch.stack([score(c) for c in range(n)])``, with the candidates shared out over the ranks.

    ``score`` must depend only on ``c`` and state every rank holds identically.
    """
    d = _ACTIVE
    if d is None:
        return torch.stack([score(c) for c in range(n)])
    start, stop = d.span(n)
    mine = [score(c) for c in range(start, stop)]
    if not mine:
        mine_t = score(0)[None][:0]
    else:
        mine_t = torch.stack(mine)
    return gather_rows(mine_t, "a calibration search")


def check_shardable(calib_size: int, recon: Any) -> None:
    """A one-line error when some rank would get no images of a batch it must split."""
    w = world_size()
    if w == 1:
        return
    fix = f"for {w} ranks"
    if calib_size < w:
        raise VitqError(f"{calib_size} calibration images cannot be shared out over {w} ranks: "
                        f"use at least {w} (--calib-size) or fewer ranks")
    if recon is None:
        return
    if recon.batch_size < w or recon.capture_batch_size < w:
        raise VitqError(f"the reconstruction batch ({recon.batch_size}) and the capture batch "
                        f"({recon.capture_batch_size}) must be at least the {w} ranks: raise them {fix}")
    last = recon.optim_size % recon.capture_batch_size
    if 0 < last < w:
        raise VitqError(f"{recon.optim_size} optimisation images in batches of {recon.capture_batch_size} leave a last "
                        f"batch of {last}, fewer than the {w} ranks: change --optim-size or the capture batch {fix}")


# ---------------------------------------------------------------------------------- random draws
@dataclass(frozen=True)
class _Shard:
    start: int
    stop: int
    total: int


_DRAWS: _Shard | None = None


@contextlib.contextmanager
def sharded_draws(start: int, stop: int, total: int) -> Iterator[None]:
    """Inside, :func:`uniform_like` draws for a global batch of ``total`` samples and returns the
    rows of samples ``start:stop``, the slice this rank computes: the same numbers one process
    draws for the whole batch."""
    global _DRAWS
    saved, _DRAWS = _DRAWS, (_Shard(start, stop, total) if _ACTIVE is not None else None)
    try:
        yield
    finally:
        _DRAWS = saved


def uniform_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.rand_like(x)``, or this rank's slice of the global batch's draw inside :func:`sharded_draws`."""
    if _DRAWS is None:
        return torch.rand_like(x)
    return _draw_like(x, lambda shape: torch.rand(shape, dtype=x.dtype, device=x.device))


def random_int16_like(x: torch.Tensor) -> torch.Tensor:
    """Uniform 16-bit integers (int16, every value equally likely) in ``x``'s shape and memory order,
    or this rank's slice of the global batch's draw inside :func:`sharded_draws`.

    Why: QDrop needs one coin per activation, and torch's CPU generator fills floats one 32-bit
    draw each, serially; four 16-bit coins per 64-bit draw cost a quarter of that
    (benchmarks/speed.md). 16 bits resolve a keep probability to 1/65,536.
    """
    return _draw_like(x, lambda shape: random_int16(shape, x.device))


def random_int16(shape: list[int] | tuple[int, ...], device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform 16-bit integers (int16, every value equally likely), four to a 64-bit draw."""
    n = math.prod(shape)
    # random_(-2**63, None) fills all 64 bits (random_() leaves the sign bit 0)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None, generator=generator)
    return words.view(torch.int16)[:n].view(shape)


def _draw_like(x: torch.Tensor, fill: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """``fill``'s draw laid out like ``x`` (the memory order ``empty_like(x)`` has), for the global
    batch and sliced to this rank's samples inside :func:`sharded_draws`.

    ``x``'s leading dimension holds this rank's samples, possibly times a per-sample factor (Swin's
    windows); filling in memory order keeps one process's stream whatever the layout.
    """
    s = _DRAWS if _DRAWS is not None else _Shard(0, x.shape[0], x.shape[0])
    local = s.stop - s.start
    rows = x.shape[0]
    if local == 0 or rows % local:
        raise VitqError(f"cannot slice a random draw of {rows} rows over {local} samples per rank")
    per = rows // local
    order = list(range(x.dim()))
    if not x.is_contiguous():
        layout = torch.empty_like(x)  # the strides rand_like fills (x's for dense x, else contiguous)
        if not layout.is_contiguous():
            order = sorted(order, key=lambda i: (-layout.stride(i), i))
    if order[0] != 0 and _DRAWS is not None:
        raise VitqError("a QDrop input whose batch is not its outermost dimension cannot be sharded")
    shape = [s.total * per if i == 0 else x.shape[i] for i in order]
    full = fill(shape).permute([order.index(i) for i in range(x.dim())])
    return full[s.start * per:s.stop * per]
