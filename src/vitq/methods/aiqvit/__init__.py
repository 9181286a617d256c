"""AIQViT (research note aiqvit.md) as a method package on vitq's core interfaces.

* :mod:`.dfq`: :class:`DynamicFocusingQuantizer`, a :class:`~vitq.quantizers.Quantizer`
  registered as the post-softmax quantizer ``"dfq"`` (options ``granularity``, ``below``, ``init``);
* :mod:`.factors`, :mod:`.lowrank`: low-rank compensation, merged (a weight parametrization,
  :class:`LowRankDelta`) or as a side branch (:class:`SideBranch` in ``QuantLinear.side``);
* :mod:`.rank_search`: rank candidates, the SVD-energy rule, first-order DARTS;
* :mod:`.curriculum`: easy-to-hard sample pacing;
* :mod:`.config`: :class:`AIQConfig`; :mod:`.extension`: :class:`AIQViTExtension`, the
  reconstruction-engine hooks (``AIQConfig.make_extension()``).
"""

from typing import Any

from .config import AIQConfig
from .curriculum import curriculum_order, curriculum_pool_size, sample_batch, sample_difficulty
from .dfq import DFQ_EPS, DynamicFocusingQuantizer, make_dfq
from .factors import LowRankFactors
from .lowrank import (LowRankDelta, SideBranch, attach_lowrank, compensated_weight, detach_lowrank, find_lowrank,
                      fold_merged, lowrank_modules, lowrank_overhead, lowrank_parameters, nearest_rounding_error,
                      restore_side_branches)
from .rank_search import (arch_objective, arch_parameters, candidate_ranks, energy_rank, first_order_darts_step,
                          make_arch_optimizer, search_split)


def __getattr__(name: str) -> Any:
    # The extension imports the reconstruction engine; loading it on first use keeps
    # ``import vitq.methods`` (which the core does for the registrations) free of import cycles.
    if name == "AIQViTExtension":
        from .extension import AIQViTExtension

        return AIQViTExtension
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AIQConfig",
    "AIQViTExtension",
    "DFQ_EPS",
    "DynamicFocusingQuantizer",
    "LowRankDelta",
    "LowRankFactors",
    "SideBranch",
    "arch_objective",
    "arch_parameters",
    "attach_lowrank",
    "candidate_ranks",
    "compensated_weight",
    "curriculum_order",
    "curriculum_pool_size",
    "detach_lowrank",
    "energy_rank",
    "find_lowrank",
    "first_order_darts_step",
    "fold_merged",
    "lowrank_modules",
    "lowrank_overhead",
    "lowrank_parameters",
    "make_arch_optimizer",
    "make_dfq",
    "nearest_rounding_error",
    "restore_side_branches",
    "sample_batch",
    "sample_difficulty",
    "search_split",
]
