"""Run folders, JSON reports, and per-stage time / peak-memory measurement."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch

from .data import atomic_write_bytes


def versions() -> dict[str, str]:
    """Versions of vitq and the libraries that decide its numbers."""
    import numpy
    import timm

    from . import __version__

    return {
        "vitq": __version__, "torch": torch.__version__, "timm": timm.__version__,
        "numpy": numpy.__version__, "python": platform.python_version(),
    }


def new_run_dir(base: str | Path = "runs", prefix: str = "run") -> Path:
    """A fresh folder ``base/<prefix>-<timestamp>[-n]`` (never an existing one)."""
    base = Path(base)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = base / (f"{prefix}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {base}")


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a killed run never leaves half a report)."""
    payload = json.dumps(data, indent=2, sort_keys=False, default=str).encode()
    atomic_write_bytes(Path(path), lambda fh: fh.write(payload))


def _rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class _PeakSampler:
    """Samples resident memory in a thread; the peak over a stage is what a report wants."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> "_PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


@contextmanager
def stage(stages: dict[str, dict[str, float]], name: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Record the wall time and peak memory of a block of work into ``stages[name]``.

    On CUDA the peak is the allocator's peak of that device; on CPU, the peak
    resident memory of the process during the stage.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with _PeakSampler() as sampler:
        yield
    entry = {"seconds": round(time.perf_counter() - t0, 3), "peak_mem_mb": round(sampler.peak, 1)}
    if cuda:
        entry["peak_cuda_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    stages[name] = entry
