"""AIQConfig: every switch of AIQViT's low-rank compensation, rank search and curriculum."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

from ...errors import VitqError
from .choices import (CANDIDATE_MODES, DEFAULT_CANDIDATES, DEFAULT_FRACTIONS, LOWRANK_INITS, LOWRANK_MODES,
                      LOWRANK_ROLES, MODE_ALIASES, RANK_POLICIES, SUPERNETS, check_choice)
from .rank_search import candidate_ranks

if TYPE_CHECKING:
    from .extension import AIQViTExtension


@dataclass
class AIQConfig:
    """AIQViT's own switches; defaults are aiqvit.md's recommendations (W3/W4 budget).

    The §6 open points map to switches as follows. Here: 1 merged vs side -> ``lrc_mode``;
    2 factor precision -> ``factor_bits``; 3 init -> ``lrc_init``, ``lrc_act_scaled``; 4 search ->
    ``rank_policy``, ``supernet``, ``tau``, ``reinit_after_search``; 5 search space ->
    ``candidate_mode``, ``candidates``, ``candidate_fractions``, ``rank_limit``; 6 cost term ->
    ``size_penalty``, ``normalise_search_loss``; 10 (part) -> ``search_iters``, ``search_warmup``,
    ``lrc_lr``; 15 -> ``curriculum*``. The DFQ is not switched here: it is the recipe's
    ``softmax_quantizer="dfq"``, with ``softmax_options`` ``granularity`` (11), ``below`` (12) and
    ``init`` (13, initialisation), and its learning rate (13) is ``ReconConfig.interval_lr``.
    Settings the recipe already owns are not repeated here either: the fine-tuning budget,
    batch, loss, activation-scale learning (8-10) are its ``ReconConfig``; the base quantizers
    and granularities (8) its calibration and quantizer spec. Only the static DFQ (14), the
    block search scope (7), first-order DARTS with argmax discretisation (4) and the
    initial-MSE difficulty (15) are implemented, so they are not switches. 16 (detection, point
    clouds) is outside this toolkit; 17 (the paper's numbers) is not a switch.
    """

    # --- low-rank compensation (§2; §6.1-6.3)
    lrc: bool = True
    lrc_mode: str = "merged"              # merged (premerge) | side (residual)  (§6.1)
    factor_bits: Optional[int] = None     # side branch: None = FP16, 8 = per-row int8  (§6.2)
    lrc_init: str = "auto"                # auto (merged: lora, side: svd) | lora | svd  (§6.3)
    lrc_act_scaled: bool = True           # activation-scaled SVD (init and energy policy)  (§6.3)
    lrc_roles: tuple[str, ...] = LOWRANK_ROLES
    lrc_patch_embed: bool = False
    lrc_head: bool = False
    lrc_lr: float = 1e-4                  # Adam on A, B  (§6.10)
    # --- rank (§2.3-2.4; §6.4-6.7)
    rank_policy: str = "search"           # search (DARTS) | fixed | energy  (§6.4)
    fixed_rank: int = 20
    candidate_mode: str = "absolute"      # absolute | relative  (§6.5)
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    candidate_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    rank_limit: float = 1.5               # keep candidates < min(d_in, d_out) / rank_limit
    supernet: str = "nested"              # nested | independent  (§6.4)
    tau: float = 1.0
    search_iters: int = 300
    # Share of search_iters that train only A, B before the architecture steps start: with B = 0
    # every candidate rank gives the same output, so without a warm-up only the size penalty moves
    # alpha and short searches pick rank 0 everywhere (seen on the reference model).
    search_warmup: float = 0.25
    search_split: float = 0.8             # train share of the calibration set during the search
    arch_lr: float = 5e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    size_penalty: float = 0.01            # lambda of the expected-parameter cost  (§6.6)
    normalise_search_loss: bool = True    # divide L_rec(val) by L_rec,0  (§6.6)
    reinit_after_search: bool = False
    energy: float = 0.9                   # rank_policy="energy"
    # --- curriculum (§4; §6.15)
    curriculum: bool = True
    curriculum_start: float = 0.3
    curriculum_end: float = 1.0
    curriculum_ramp: float = 0.5          # share of the block's iterations (search + fine-tune)
    seed: int = 0

    def __post_init__(self) -> None:
        self.lrc_mode = MODE_ALIASES.get(self.lrc_mode, self.lrc_mode)
        self.candidates = tuple(int(r) for r in self.candidates)
        self.candidate_fractions = tuple(float(f) for f in self.candidate_fractions)
        self.lrc_roles = tuple(self.lrc_roles)
        self.arch_betas = tuple(self.arch_betas)  # type: ignore[assignment]
        for name, choices in (("lrc_mode", LOWRANK_MODES), ("lrc_init", LOWRANK_INITS),
                              ("rank_policy", RANK_POLICIES), ("candidate_mode", CANDIDATE_MODES),
                              ("supernet", SUPERNETS)):
            check_choice(name, getattr(self, name), choices)
        if self.factor_bits not in (None, 8):
            raise VitqError(f"factor_bits must be None (FP16) or 8, got {self.factor_bits!r}")
        if self.lrc_mode == "merged" and self.lrc_init == "svd":
            raise VitqError("lrc_init='svd' is for lrc_mode='side'; the merged form starts at B = 0")
        bad_roles = set(self.lrc_roles) - set(LOWRANK_ROLES)
        if bad_roles:
            raise VitqError(f"lrc_roles must be among {', '.join(LOWRANK_ROLES)}, got {sorted(bad_roles)}")
        if self.fixed_rank < 0:
            raise VitqError(f"fixed_rank must be >= 0, got {self.fixed_rank}")
        if not self.candidates or min(self.candidates) < 0:
            raise VitqError(f"candidates must be non-negative ranks, got {self.candidates}")
        if not self.candidate_fractions or not all(0.0 <= f < 1.0 for f in self.candidate_fractions):
            raise VitqError(f"candidate_fractions must be in [0, 1), got {self.candidate_fractions}")
        if self.rank_limit < 1.0:
            raise VitqError(f"rank_limit must be >= 1, got {self.rank_limit}")
        if self.tau <= 0:
            raise VitqError(f"tau must be positive, got {self.tau}")
        if not 0.0 < self.search_split < 1.0:
            raise VitqError(f"search_split must be in (0, 1), got {self.search_split}")
        if not 0.0 < self.energy <= 1.0:
            raise VitqError(f"energy must be in (0, 1], got {self.energy}")
        if self.size_penalty < 0:
            raise VitqError(f"size_penalty must be >= 0, got {self.size_penalty}")
        for name in ("lrc_lr", "arch_lr"):
            if getattr(self, name) <= 0:
                raise VitqError(f"{name} must be positive, got {getattr(self, name)}")
        if self.arch_weight_decay < 0:
            raise VitqError(f"arch_weight_decay must be >= 0, got {self.arch_weight_decay}")
        if len(self.arch_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.arch_betas):
            raise VitqError(f"arch_betas must be two numbers in [0, 1), got {self.arch_betas}")
        if self.search_iters < 0:
            raise VitqError(f"search_iters must be >= 0, got {self.search_iters}")
        if not 0.0 <= self.search_warmup < 1.0:
            raise VitqError(f"search_warmup is a share of search_iters in [0, 1), got {self.search_warmup}")
        if not 0.0 < self.curriculum_start <= self.curriculum_end <= 1.0:
            raise VitqError("curriculum needs 0 < curriculum_start <= curriculum_end <= 1, "
                            f"got {self.curriculum_start}, {self.curriculum_end}")
        if not 0.0 <= self.curriculum_ramp <= 1.0:
            raise VitqError(f"curriculum_ramp must be in [0, 1], got {self.curriculum_ramp}")

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> "AIQConfig":
        """The recommended budget for ``bits`` (aiqvit.md §1.2): W6 uses 100 + 200 iterations, lr 5e-5."""
        base: dict[str, Any] = {}
        if bits >= 6:
            base = {"search_iters": 100, "lrc_lr": 5e-5}
        base.update(overrides)
        return cls(**base)

    def rank_candidates(self, d_in: int, d_out: int) -> list[int]:
        """This config's candidate ranks for a (d_out, d_in) layer."""
        return candidate_ranks(d_in, d_out, self.candidates, self.candidate_mode, self.candidate_fractions,
                               limit=self.rank_limit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def make_extension(self) -> "AIQViTExtension":
        """The reconstruction extension that applies this config (pass it to ``reconstruct``)."""
        from .extension import AIQViTExtension  # the engine is imported only when a run needs it

        return AIQViTExtension(self)
