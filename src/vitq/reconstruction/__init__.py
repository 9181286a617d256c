"""Block-wise reconstruction: AdaRound + QDrop + learned activation scales, with FIMA-Q's losses.

Files: ``config`` (ReconConfig, loss names), ``engine`` (``reconstruct``: the blocks in order,
resume), ``block`` (one block's optimisation loop), ``fisher`` (KL-gradient snapshots),
``rounding`` (learned rounding in and out, through the quantizer interface), ``checkpoint``
(per-block safetensors + JSON checkpoints and the run key), ``capture`` (cached block inputs),
``extension`` (how a method such as AIQViT adds to the loop).

For each block the adapter lists (patch embed, each transformer block, each Swin patch merging,
the head), in forward order (fimaq.md §1.4):

1. cache the block's float input ``X_fp`` over the optimisation images (everything float) and
   its float output ``Y_fp = block(X_fp)``; cache its quantized-prefix input ``X_q`` (blocks
   already reconstructed quantized, hard rounding);
2. give every weight quantizer of the block its learned-rounding form (AdaRound), switch its
   activation quantizers to training mode (straight-through rounding, QDrop with ``drop_prob``)
   and make their parameters learnable (``Quantizer.trainable_parameters``); freeze the rest;
3. run ``iters`` iterations: a random batch, the input mixed element-wise from ``X_q`` and
   ``X_fp`` (``qdrop``) or taken from one of them (``qinp`` / ``rinp``), the loss of
   :mod:`vitq.losses` plus the rounding regulariser, Adam on the rounding variables and on the
   activation-quantizer parameters (cosine-annealed);
4. keep the hard rounding; the next blocks see this block quantized in their ``X_q``.

After the last block the hard-rounded weights are folded into the weights and the plain
quantizers come back (nearest rounding of a folded weight reproduces it exactly).

Fisher snapshots (``fimaq_*`` losses) take the KL gradient at the block output with only the
current block quantized: they start from the cached block input and run the rest of the
network through the adapter's ``forward_after``, instead of the whole model.

Log-domain activation quantizers (log2 / log-sqrt2 post-softmax) get QDrop like the uniform ones,
but their scale is not learned: through the straight-through rounding a log grid's output does not
depend on its scale inside the range (see ``LogQuantizer.trainable_parameters``).

After each block the engine's state is saved atomically to ``work_dir`` (if given); the same
call resumes at the next block and reaches the same result as an uninterrupted run, because
every block draws its random numbers from generators seeded by ``(seed, block index)``. The
checkpoint is keyed by the model, the images, the settings and the package versions.
"""

from __future__ import annotations
from .block import reconstruct_block
from .capture import batched, capture_block_input
from .config import FISHER_LOSSES, INPUT_MODES, LOSSES, SNAPSHOT_SCHEDULES, ReconConfig, snapshot_iterations
from .engine import reconstruct
from .extension import BlockContext, BlockExtension
from .rounding import activation_quantizers, fold_learned_rounding, install_learned_rounding

__all__ = [
    "FISHER_LOSSES", "INPUT_MODES", "LOSSES", "SNAPSHOT_SCHEDULES", "BlockContext", "BlockExtension", "ReconConfig",
    "activation_quantizers", "batched", "capture_block_input", "fold_learned_rounding", "install_learned_rounding",
    "reconstruct", "reconstruct_block", "snapshot_iterations",
]
