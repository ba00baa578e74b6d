"""Coupled redrafting (Speculative Coupled Decoding, SCD; So et al., ICML 2026, arXiv 2510.24211).

SJD (and SJD2's slots) redraw every window position that stays uncommitted after a forward: the next draft
of position j is a fresh sample from its new target p_new(j), with q = p_new(j). Coupling keeps that
marginal -- the next draft is still distributed as p_new(j), so q = p_new(j) stays right and the decoder
stays exact -- but correlates the new draft with the old one, so a draft survives while its target barely
moves and the next verification accepts it more often. Letters as in :mod:`decode.speculative`:
``d`` the old draft of a position, ``q`` the distribution it was drawn from, ``p`` the position's new
target (the output row before it in this forward).

* *maximal coupling* (:func:`maximal_coupling`): keep d with probability ``min(1, p(d) / q(d))``, else
  draw from ``normalize(max(0, p - q))``. Given d ~ q the result is distributed as p exactly (the rule
  of the acceptance test, applied to a position that is not committed), and it equals d with the
  largest probability any coupling of q and p allows. The new draft's q is p.
* *Gumbel coupling* (:class:`GumbelNoise`): every absolute position gets one noise vector when it first
  enters the window, drawn once from the image's generator; its draft is ``argmax(log p + g)`` under the
  current p (here ``argmax(p / e)`` with ``e ~ Exp(1)``, ``g = -log e``: the same Gumbel-max trick
  :func:`decode.sampling.sample` uses with fresh noise), so the same noise redraws the same token while
  p barely moves. The draft is an exact sample of p because the noise of a position is used for nothing
  that the position's own target depends on (targets only see earlier positions); its q is p.

Both are exact per position, so they are exact in a batch too (each row owns its generator and noise).
"""
from __future__ import annotations

import torch

from decode.sampling import sample
from decode.speculative import RESIDUAL_EPS

COUPLINGS = ("none", "maximal", "gumbel")
# q of a kept draft under maximal coupling: "target" = p_new (the rule the issue and the paper state: the
# kept-or-redrawn draft follows p_new exactly); "kept_old" = the old draft's q, as junhyukso/SCD's
# SCDMC.py stores it for a kept draft (a redrawn one gets p_new) -- NOT exact: the next test then divides
# by a q the draft was not drawn from (tests/test_coupling.py rejects it on the enumerable toy).
COUPLED_QS = ("target", "kept_old")


def validate(coupling: str, coupled_q: str) -> None:
    """Clear errors for unknown coupling options."""
    if coupling not in COUPLINGS:
        raise ValueError(f"decoder.coupling must be one of {list(COUPLINGS)}, got {coupling!r}")
    if coupled_q not in COUPLED_QS:
        raise ValueError(f"decoder.coupled_q must be one of {list(COUPLED_QS)}, got {coupled_q!r}")


def maximal_coupling(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The next drafts of positions that stay uncommitted: p, q [n, V] float32 (new target, old draft's
    distribution), d [n] the old drafts (d ~ q). Returns (new drafts [n], kept [n] bool).

    Draws n uniforms, then one residual sample per redrawn row (rows in order), from ``generator``.
    """
    n = int(d.numel())
    if n == 0:
        return d.clone(), torch.zeros(0, dtype=torch.bool, device=d.device)
    index = d[:, None]
    p_d, q_d = p.gather(1, index)[:, 0], q.gather(1, index)[:, 0]  # [n]
    ratio = torch.where(q_d > 0, p_d / q_d.clamp_min(1e-30), (p_d > 0).float())  # as decode.speculative.accept
    u = torch.rand(n, generator=generator, device=generator.device)
    if u.device != p.device:
        u = u.to(p.device)
    kept = u < ratio
    out = d.clone()
    redraw = (~kept).nonzero()[:, 0]
    if redraw.numel():
        res = (p[redraw] - q[redraw]).clamp_min(0.0)  # [r, V]
        empty = res.sum(1) <= RESIDUAL_EPS  # p == q up to round-off: rejection is (almost) impossible; draw from p
        res = torch.where(empty[:, None], p[redraw], res)
        out[redraw] = sample(res, generator)  # sample() needs no normalised rows
    return out, kept


def coupled_q(p: torch.Tensor, q_old: torch.Tensor, kept: torch.Tensor, rule: str) -> torch.Tensor:
    """The q of maximally coupled drafts: p (``rule="target"``), or the old q where the draft was kept
    (``"kept_old"``, the reference code's bookkeeping; not exact)."""
    if rule == "target" or not bool(kept.any()):
        return p
    return torch.where(kept[:, None], q_old, p)


class GumbelNoise:
    """One Exp(1) noise vector per absolute position, drawn from the image's generator the first time the
    position is asked for and kept until the decoder forgets it (it was committed)."""

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.vocab_size, self.device = vocab_size, device
        self.start = 0  # absolute position of row 0
        self.table = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)  # [n, V]

    def rows(self, start: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """The noise of positions [start, start + n) [n, V]: positions before ``start`` are forgotten, new
        ones drawn (in position order)."""
        if start < self.start:
            raise ValueError(f"position {start} was forgotten (the table starts at {self.start})")
        self.table = self.table[start - self.start :] if start - self.start < self.table.shape[0] else self.table[:0]
        self.start = start
        missing = n - self.table.shape[0]
        if missing > 0:
            fresh = torch.empty(missing, self.vocab_size, dtype=torch.float32, device=generator.device)
            fresh.exponential_(1, generator=generator)
            self.table = torch.cat([self.table, fresh.to(self.device)])
        return self.table[:n]

    def sample(self, p: torch.Tensor, start: int, generator: torch.Generator) -> torch.Tensor:
        """Drafts of the positions [start, start + L) under their targets p [L, V]: ``argmax(p / e)``."""
        return torch.argmax(p / self.rows(start, p.shape[0], generator), dim=-1)
