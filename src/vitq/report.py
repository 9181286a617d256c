"""Run folders, JSON reports, and per-stage time / peak-memory measurement."""

from __future__ import annotations

import json
import os
import platform
import resource
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


# the CPU features that change vitq's numbers or speed: AVX-512 and VNNI/AMX pick other float and
# integer kernels (the same calibration gives another top-1 across them; the int8-vnni ONNX profile is
# exact only with VNNI/AMX-INT8), native bf16 decides whether bf16 autocast pays
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in Linux's /proc/cpuinfo (None where unreadable or absent)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.split(":", 1)[0].strip() == field), None)
    except OSError:
        return None


def cpu_features() -> set[str]:
    """Which of :data:`CPU_FEATURES` this CPU has (empty where /proc/cpuinfo is unreadable)."""
    return set(CPU_FEATURES) & set((_cpuinfo("flags") or "").split())


def machine() -> dict[str, Any]:
    """The hardware a report's numbers were measured on."""
    info: dict[str, Any] = {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "cpu_features": sorted(cpu_features()),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


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


def _peak_rss_mb() -> float:
    """The process's resident-memory high-water mark in MB (since the last reset)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def _reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident size (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a stretch of work: the process's resident high-water mark on CPU (the kernel
    keeps it; no sampling thread), plus the allocator's peak on CUDA.

    Contexts nest: the kernel's mark is restarted when one opens, so every open context first
    takes in the peak so far.
    """

    _open: list["PeakMemory"] = []  # the process's mark is global, so are the contexts watching it

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0.0
        self.cuda_peak: float | None = None

    def _take_in(self) -> None:
        now = _peak_rss_mb()
        for ctx in PeakMemory._open:
            ctx.peak = max(ctx.peak, now)

    def __enter__(self) -> "PeakMemory":
        self._take_in()
        if not _reset_peak_rss():
            self.peak = _peak_rss_mb()  # no reset possible: the lifetime peak is an upper bound
        PeakMemory._open.append(self)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self._take_in()
        PeakMemory._open.remove(self)
        if self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device) / 2**20

    def summary(self) -> dict[str, float]:
        out = {"peak_mem_mb": round(self.peak, 1)}
        if self.cuda_peak is not None:
            out["peak_cuda_mem_mb"] = round(self.cuda_peak, 1)
        return out


@contextmanager
def stage(stages: dict[str, dict[str, float]], name: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Record the wall time and peak memory of a block of work into ``stages[name]``.

    On CPU the peak resident memory of the process during the stage; on CUDA also the
    allocator's peak of that device.
    """
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        yield
    stages[name] = {"seconds": round(time.perf_counter() - t0, 3), **mem.summary()}
