"""The low-rank factors ``delta W = B diag(m) A`` and their rank-search state (aiqvit.md §2.2-2.4).

:class:`LowRankFactors` is shared by both compensation forms (:mod:`.lowrank`): the merged
weight parametrization and the side branch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ...errors import VitqError
from ...quantizers import round_ste
from .choices import SUPERNETS, check_choice


def fake_quant_rows(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric fake quantization (straight-through), for 8-bit side-branch factors."""
    if t.numel() == 0:
        return t
    qmax = 2 ** (bits - 1) - 1
    s = (t.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    return torch.clamp(round_ste(t / s), -qmax - 1, qmax) * s


def svd_factors(E: torch.Tensor, rank: int, act_rms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with ``B A`` the rank-``rank`` truncated SVD of ``E`` (activation-scaled if given).

    With ``a = act_rms``: SVD of ``E diag(a)``, then ``A`` is unscaled by ``diag(1/a)`` so that
    ``B A`` approximates ``E`` where the inputs are large (LQER). Singular values are split as
    square roots on both factors so neither factor dominates the learning rate.
    """
    E64 = E.detach().double()
    a = None
    if act_rms is not None:
        a = act_rms.detach().double().reshape(1, -1).clamp(min=1e-8)
        E64 = E64 * a
    U, S, Vh = torch.linalg.svd(E64, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B = U[:, :r] * root[None, :]
    A = root[:, None] * Vh[:r]
    if a is not None:
        A = A / a
    if r < rank:  # more components asked than the matrix has: pad with zeros (no effect)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)
        A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], 0)
    # contiguous, as the LoRA-initialised factors a reload creates: GEMMs on another memory layout
    # sum in another order, and the outputs would differ in the last bits
    return B.to(E.dtype).contiguous(), A.to(E.dtype).contiguous()


class LowRankFactors(nn.Module):
    """``delta W = B diag(m) A`` with optional rank-search logits (aiqvit.md §2.3).

    Without ``candidates``: a fixed rank, ``m = 1``. With ``candidates`` (K ranks): logits
    ``alpha`` (K, init 0), ``pi = softmax(alpha / tau)`` and

    * ``supernet="nested"`` (default): one A/B pair of ``r_max`` components,
      ``m_j = sum_{k: r_k >= j} pi_k`` for j = 1..r_max (the first j components are shared);
    * ``supernet="independent"``: one segment of ``r_k`` components per candidate, each scaled by
      ``pi_k`` (the textbook DARTS mixture ``sum_k pi_k B_k A_k``).

    :meth:`discretise` keeps the components of ``r_{argmax alpha}`` and drops ``alpha``.
    Re-create optimizers over A/B afterwards (the Parameters are replaced).
    ``factor_bits=8`` fake-quantizes A and B per row (symmetric) wherever they are used.
    """

    def __init__(self, d_out: int, d_in: int, rank: int = 0, *, candidates: Sequence[int] | None = None,
                 tau: float = 1.0, supernet: str = "nested", factor_bits: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_choice("supernet", supernet, SUPERNETS)
        if factor_bits not in (None, 8):
            raise VitqError(f"factor_bits must be None (full precision) or 8, got {factor_bits!r}")
        if tau <= 0:
            raise VitqError(f"tau must be positive, got {tau}")
        self.d_out, self.d_in = int(d_out), int(d_in)
        self.supernet, self.tau, self.factor_bits = supernet, float(tau), factor_bits
        if candidates is not None:
            cands = sorted({int(r) for r in candidates})
            if not cands or cands[0] < 0:
                raise VitqError(f"rank candidates must be non-negative integers, got {list(candidates)}")
            self.register_buffer("candidates", torch.tensor(cands, dtype=torch.long))
            self.alpha: Optional[nn.Parameter] = nn.Parameter(torch.zeros(len(cands)))
            total = max(cands) if supernet == "nested" else sum(cands)
        else:
            if rank < 0:
                raise VitqError(f"rank must be >= 0, got {rank}")
            self.register_buffer("candidates", torch.empty(0, dtype=torch.long))
            self.alpha = None
            total = int(rank)
        self.A = nn.Parameter(torch.zeros(total, self.d_in))
        self.B = nn.Parameter(torch.zeros(self.d_out, total))
        # (E, act_rms) of an SVD init, so reinit_after_search can redo it
        self.svd_source: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.reset_lora_(generator)

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def reset_lora_(self, generator: torch.Generator | None = None) -> None:
        """LoRA init: A Kaiming-uniform (as nn.Linear), B = 0, so ``delta W = 0`` exactly."""
        if self.A.numel():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B.zero_()

    @torch.no_grad()
    def init_svd_(self, E: torch.Tensor, act_rms: torch.Tensor | None = None) -> None:
        """Factors from the truncated SVD of the error ``E`` (d_out, d_in) (aiqvit.md §2.2)."""
        if tuple(E.shape) != (self.d_out, self.d_in):
            raise ValueError(f"error matrix {tuple(E.shape)} does not match ({self.d_out}, {self.d_in})")
        self.svd_source = (E.detach().clone(), None if act_rms is None else act_rms.detach().clone())
        if self.supernet == "nested" or self.alpha is None:
            B, A = svd_factors(E, self.A.shape[0], act_rms)
        else:  # every candidate segment starts from its own top-r_k components
            parts = [svd_factors(E, int(r), act_rms) for r in self.candidates.tolist()]
            B = torch.cat([p[0] for p in parts], 1)
            A = torch.cat([p[1] for p in parts], 0)
        self.A.data = A.to(self.A.device, self.A.dtype)
        self.B.data = B.to(self.B.device, self.B.dtype)

    # ----------------------------------------------------------------- search state
    @property
    def rank(self) -> int:
        """Number of stored components (r_max during a nested search)."""
        return int(self.A.shape[0])

    @property
    def searching(self) -> bool:
        """True while rank-search logits exist (before :meth:`discretise`)."""
        return self.alpha is not None

    def pi(self) -> torch.Tensor:
        """``softmax(alpha / tau)`` over the candidates."""
        if self.alpha is None:
            raise RuntimeError("pi() without rank candidates (no search)")
        return torch.softmax(self.alpha / self.tau, dim=0)

    def mask(self) -> torch.Tensor | None:
        """Soft component mask ``m`` (rank,), or None when the rank is fixed."""
        if self.alpha is None:
            return None
        pi = self.pi()
        ranks = self.candidates.to(pi.device)
        if self.supernet == "nested":
            j = torch.arange(1, self.rank + 1, device=pi.device)
            return (ranks[None, :] >= j[:, None]).to(pi.dtype) @ pi
        return torch.repeat_interleave(pi, ranks, output_size=self.rank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as used: fake-quantized per row when ``factor_bits`` is set."""
        if self.factor_bits is None:
            return self.A, self.B
        return fake_quant_rows(self.A, self.factor_bits), fake_quant_rows(self.B, self.factor_bits)

    def delta(self) -> torch.Tensor:
        """``B diag(m) A`` (d_out, d_in); exact zeros for rank 0 or B = 0."""
        A, B = self.factors()
        m = self.mask()
        if m is not None:
            B = B * m[None, :]
        return B @ A

    def expected_cost(self) -> torch.Tensor:
        """``sum_k pi_k r_k (d_in + d_out) / (d_in d_out)``: expected relative parameter overhead.

        For a fixed rank: ``r (d_in + d_out) / (d_in d_out)`` (a constant).
        """
        rel = (self.d_in + self.d_out) / (self.d_in * self.d_out)
        if self.alpha is None:
            return torch.tensor(self.rank * rel, device=self.A.device)
        return (self.pi() * self.candidates.to(self.alpha.dtype)).sum() * rel

    def chosen_rank(self) -> int:
        """``r_{argmax alpha}`` (the stored rank when not searching)."""
        if self.alpha is None:
            return self.rank
        return int(self.candidates[int(torch.argmax(self.alpha.detach()))])

    @torch.no_grad()
    def discretise(self, reinit: bool = False, generator: torch.Generator | None = None) -> int:
        """Slice A, B to the chosen rank, drop ``alpha``; returns the rank.

        ``reinit=True`` restarts from the initialisation instead of keeping the searched values
        (aiqvit.md §2.4 ``reinit_after_search``): the SVD of the stored error if the factors
        started from one, else LoRA (B = 0, A Kaiming).
        """
        if self.alpha is None:
            return self.rank
        k = int(torch.argmax(self.alpha.detach()))
        r = int(self.candidates[k])
        start = 0 if self.supernet == "nested" else int(self.candidates[:k].sum())
        self.A = nn.Parameter(self.A.detach()[start:start + r].clone())
        self.B = nn.Parameter(self.B.detach()[:, start:start + r].clone())
        self.alpha = None
        self.candidates = torch.empty(0, dtype=torch.long, device=self.A.device)
        if reinit:
            if self.svd_source is None:
                self.reset_lora_(generator)
            else:
                self.init_svd_(*self.svd_source)
        return r

    def extra_repr(self) -> str:
        search = f", candidates={self.candidates.tolist()}, supernet={self.supernet}, tau={self.tau}" \
            if self.alpha is not None else ""
        bits = "fp" if self.factor_bits is None else f"int{self.factor_bits}"
        return f"d_out={self.d_out}, d_in={self.d_in}, rank={self.rank}, factors={bits}{search}"
