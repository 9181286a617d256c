"""Block-reconstruction settings (defaults: the paper's / official code's, fimaq.md §4)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..errors import VitqError
from ..losses import LOWRANK_FORMS

# Reconstruction losses; every name means exactly what it computes (see vitq.losses):
#   mse / mae              the official lp_loss, p = 2 / 1
#   brecq                  BRECQ's squared per-sample gradient diagonal Fisher
#   fimaq_diag             FIMA-Q's diagonal term alone (linear in the mean |KL gradient|)
#   fimaq_lowrank          the official code's `fisher_lr`: mean_b mean_j (mean_n |Δ|_bn g_jn)^2
#   fimaq_dplr             FIMA-Q (DPLR): p1 * low-rank term (lowrank_form) + p2 * diagonal term
#   fimaq_dplr_lowrank     DPLR's low-rank term (lowrank_form) alone, no diagonal
LOSSES = ("mse", "mae", "brecq", "fimaq_diag", "fimaq_lowrank", "fimaq_dplr", "fimaq_dplr_lowrank")
FISHER_LOSSES = ("fimaq_diag", "fimaq_lowrank", "fimaq_dplr", "fimaq_dplr_lowrank")
INPUT_MODES = ("qdrop", "rinp", "qinp")
SNAPSHOT_SCHEDULES = ("q", "qf", "r")
AUTOCAST = (None, "bf16", "fp16")
COMPILE = ("auto", "on", "off")
# auto compiles the fused kernels from this many iterations per block: below, a run takes
# minutes and the one-off compilation (seconds to a minute per process) would not pay
COMPILE_FROM_ITERS = 200


def compiles(setting: str, iters: int) -> bool:
    """Whether the fused fake-quantization kernels go through torch.compile (see ``compile_kernels``)."""
    return setting == "on" or (setting == "auto" and iters >= COMPILE_FROM_ITERS)


@dataclass
class ReconConfig:
    """Block-reconstruction settings. Defaults are the paper's / official code's (fimaq.md §4)."""

    loss: str = "fimaq_dplr"
    iters: int = 20000                # iterations per block
    # iterations of the first transformer block (the block after the patch embedding, which every
    # adapter lists first), None: ``iters``. On both proving-ground models that block's own output
    # error falls most with more iterations, yet giving it 4x did not improve the final model
    # (benchmarks/beyond.md, group firstblock): a switch for budget experiments, off by default.
    first_block_iters: int | None = None
    batch_size: int = 32
    optim_size: int = 1024            # optimisation images
    input_mode: str = "qdrop"         # qdrop | rinp (float input) | qinp (quantized-prefix input)
    drop_prob: float = 0.5            # QDrop: probability of KEEPING the quantized value
    adaround: bool = True             # learn the weight rounding (off: nearest rounding, weights frozen)
    weight_lr: float = 1e-3           # Adam on the rounding variables (group "rounding")
    act_lr: float = 4e-5              # Adam on activation scales (group "scale"), cosine-annealed to 0
    learn_act_scales: bool = True
    interval_lr: float = 1e-4         # Adam on learned clipping intervals (group "interval", e.g. DFQ)
    round_lambda: float = 0.01        # weight of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2               # share of iterations without the regulariser
    rank: int = 5                     # k: number of Fisher snapshots
    # images each snapshot averages its KL gradients over: a fixed strided subset of the optimisation
    # images (None: all). A snapshot is a pass through the rest of the network, forward and backward,
    # about half of a 250-iteration block's time on the proving ground; a mean over fewer images costs
    # proportionally less and is a noisier estimate of the same vector
    snapshot_images: int | None = None
    temperature: float = 20.0         # T of the KL behind the Fisher snapshots
    head_temperature: float = 1.0     # T of the head block's KL loss
    snapshot_schedule: str = "q"      # q: spread over the iterations; qf: the first k; r: perturbation
    lowrank_form: str = "gram_inverse"  # gram_inverse | identity | paper_rms | secant (losses.LOWRANK_FORMS)
    p1: float = 1.0                   # weight of the normalised low-rank term
    p2: float = 1.0                   # weight of the normalised diagonal term
    alpha: float | None = None        # if set: p1 = 2*alpha, p2 = 2*(1-alpha)
    renormalize: str = "refresh"      # refresh (official HEAD) | once (paper-era code)
    ridge: float = 1e-6
    snapshot_input: str = "fp"        # fp (official) | quant | qdrop: block input during a snapshot
    snapshot_qdrop: bool = True       # QDrop stays on during snapshots, as in the official code
    perturb_scale: float = 1e-6       # schedule "r": size of the positive output perturbation
    keep_on_device: bool = True       # caches on the compute device (else host memory)
    cache_on_disk: bool = False       # caches in memory-mapped files ($VITQ_CACHE_DIR or the temp dir)
    autocast: str | None = None       # None (float32) | bf16 | fp16 (CUDA): the block's forward/backward
    capture_batch_size: int = 64      # batch for caching inputs and for snapshots
    log_every: int = 10               # loss terms kept in the block summary every N iterations
    # GLF-Q-style global term: the block's quantized output through the frozen float rest of the
    # network, matched (MSE) at the penultimate feature (the classifier's input), normalised like
    # the local loss and weighted; 0 turns it off. It costs the rest of the network's forward and
    # backward, so global_every > 1 adds it on every N-th iteration only.
    global_weight: float = 0.0
    global_every: int = 1
    # torch.compile of the fused fake-quantization kernels (quantizers/kernels.py): on, off, or
    # auto (on from COMPILE_FROM_ITERS iterations per block); eager wherever compilation fails
    compile_kernels: str = "auto"

    def __post_init__(self) -> None:
        checks = [("loss", self.loss, LOSSES), ("input_mode", self.input_mode, INPUT_MODES),
                  ("snapshot_schedule", self.snapshot_schedule, SNAPSHOT_SCHEDULES),
                  ("lowrank_form", self.lowrank_form, LOWRANK_FORMS),
                  ("renormalize", self.renormalize, ("refresh", "once")),
                  ("snapshot_input", self.snapshot_input, ("fp", "quant", "qdrop")),
                  ("autocast", self.autocast, AUTOCAST), ("compile_kernels", self.compile_kernels, COMPILE)]
        for field, value, choices in checks:
            if value not in choices:
                raise VitqError(f"{field} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if min(self.iters, self.batch_size, self.optim_size, self.capture_batch_size, self.log_every,
               self.global_every) <= 0:
            raise VitqError("iters, batch_size, optim_size, capture_batch_size, log_every and global_every "
                            "must be positive")
        if not (self.global_weight >= 0.0 and math.isfinite(self.global_weight)):
            raise VitqError(f"global_weight must be a finite number >= 0, got {self.global_weight}")
        if self.rank < 1:
            raise VitqError(f"rank must be >= 1, got {self.rank}")
        if self.first_block_iters is not None and self.first_block_iters <= 0:
            raise VitqError(f"first_block_iters must be positive or None (= iters), got {self.first_block_iters}")
        if self.snapshot_images is not None and not 1 <= self.snapshot_images <= self.optim_size:
            raise VitqError(f"snapshot_images must be between 1 and optim_size ({self.optim_size}), "
                            f"got {self.snapshot_images}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise VitqError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise VitqError(f"alpha must be in [0, 1], got {self.alpha}")

    def iters_for(self, index: int) -> int:
        """Iterations of the block at ``index`` in the reconstruction order (0: the patch embedding)."""
        return self.first_block_iters if index == 1 and self.first_block_iters is not None else self.iters

    @property
    def weights(self) -> tuple[float, float]:
        """(p1, p2): the weights of the normalised low-rank and diagonal terms."""
        if self.loss == "fimaq_diag":
            return 0.0, 2.0
        if self.loss in ("fimaq_lowrank", "fimaq_dplr_lowrank"):
            return 2.0, 0.0
        if self.alpha is not None:
            return 2.0 * self.alpha, 2.0 * (1.0 - self.alpha)
        return self.p1, self.p2

    def autocast_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast region of the block's optimisation passes (a no-op for float32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        if self.autocast == "fp16" and device.type != "cuda":
            raise VitqError("fp16 autocast needs a CUDA device: use autocast='bf16' (--autocast bf16) on a CPU")
        return torch.autocast(device.type, dtype=torch.bfloat16 if self.autocast == "bf16" else torch.float16)

    def learning_rate(self, group: str) -> float:
        """The Adam learning rate of a quantizer parameter group (see Quantizer.trainable_parameters)."""
        rates = {"rounding": self.weight_lr, "scale": self.act_lr, "interval": self.interval_lr}
        if group not in rates:
            raise VitqError(f"no learning rate for quantizer parameter group {group!r}: "
                            f"known groups are {', '.join(rates)}")
        return rates[group]


def snapshot_subset(n: int, m: int | None) -> torch.Tensor | None:
    """Indices of the ``m`` of ``n`` images a snapshot uses (None: all of them): evenly strided, so
    every rank of a distributed run picks the same ones without drawing and the subset spans the
    whole (shuffled) optimisation sample."""
    if m is None or m >= n:
        return None
    return torch.arange(m) * n // m


def snapshot_iterations(iters: int, k: int, schedule: str) -> list[int]:
    """Iterations at which Fisher snapshots are taken: exactly ``k`` of them.

    ``q``: ``round(j * iters / k)`` for j < k (the official ``it % floor(iters/k)`` takes k+1
    when k does not divide iters, fimaq.md §7.2); ``qf``: 0..k-1; ``r``: all k before iteration 0.
    """
    if schedule == "q":
        return sorted({min(iters - 1, round(j * iters / k)) for j in range(k)})
    if schedule == "qf":
        return list(range(min(k, iters)))
    return [0]
