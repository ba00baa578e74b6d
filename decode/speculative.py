"""The speculative acceptance rule (Leviathan et al. 2023; Chen et al. 2023; SJD, Teng et al. 2025).

Letters, fixed for this module and its callers:

* ``p`` -- the **target** distribution: what plain AR decoding would sample the token from, given the
  committed prefix and the drafts before it (one row per draft, from :func:`decode.sampling.final_probs`).
* ``q`` -- the **draft** distribution the draft token ``d`` was drawn from (one-hot for a draft that
  was set deterministically, e.g. a random or copied initial code, or a forced layout token).

For i = 1, 2, ... in order: accept ``d_i`` iff ``r_i < min(1, p_i(d_i) / q_i(d_i))`` with one uniform
``r_i`` per position; at the first rejection draw the token from the residual
``normalize(max(0, p_i - q_i))`` and stop. The emitted token then follows p_i exactly, whatever q_i
was, so a decoder built on this rule samples the same distribution as AR decoding.
"""
from __future__ import annotations

import torch

from decode.sampling import sample

# Residual mass below this is float32 round-off of p == q (rejection then has probability ~0 and the
# "residual" is noise): sample from p instead.
RESIDUAL_EPS = 1e-6


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``normalize(max(0, p - q))`` for one row [V] (or [1, V]); falls back to p when the residual has no mass."""
    r = (p - q).clamp_min(0.0)
    mass = r.sum()
    if float(mass) <= RESIDUAL_EPS:
        return p
    return r / mass


def accept(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator
) -> tuple[int, int | None]:
    """Speculative test of a prefix of drafts.

    p, q: [L, V] float32, row i is the target / draft distribution of ``drafts[i]``; drafts: LongTensor [L].
    Returns ``(n_accepted, next_token)``: the first ``n_accepted`` drafts are accepted; ``next_token`` is the
    residual sample at the first rejection, or ``None`` when all L drafts pass (the caller then takes the
    bonus token from the target row after the last draft -- it is not drawn here).
    Draws exactly L uniforms (none for L == 0) and one residual sample on rejection from ``generator``.
    """
    n = int(drafts.numel())
    if p.shape != q.shape or p.shape[0] != n:
        raise ValueError(f"accept needs p, q of shape [L, V] and L drafts; got p {tuple(p.shape)}, "
                         f"q {tuple(q.shape)}, {n} drafts")
    n_acc, token = accept_prefix(p, q, drafts, generator)
    return n_acc, None if token is None else int(token[0])


def accept_prefix(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator
) -> tuple[int, torch.Tensor | None]:
    """:func:`accept` for decoders: the same test and draws without the shape checks, the residual sample
    returned as a LongTensor [1] on p's device (no host round trip); p and q may hold more rows than the
    L drafts (rows L.. are not read)."""
    n = int(drafts.numel())
    if n == 0:
        return 0, None
    index = drafts[:, None]
    p_d, q_d = p.gather(1, index), q.gather(1, index)  # [L, 1]
    # q_d == 0 cannot happen for a draft drawn from q; should a caller pass one, accept iff p_d > 0.
    ratio = torch.where(q_d > 0, p_d / q_d.clamp_min(1e-30), p_d > 0)  # (the bool branch reads as 0. / 1.)
    return accept_by_ratio(p, q, ratio[:, 0], generator)


def accept_by_ratio(p: torch.Tensor, q: torch.Tensor, ratio: torch.Tensor,
                generator: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """The sequential test given the acceptance ratios [L] (:func:`accept_prefix` passes ``p(d)/q(d)``, a
    relaxed rule such as GSD's grouped ratio passes its own): accept row i iff ``r_i < ratio_i``, stop at
    the first rejection and draw its token from ``normalize(max(0, p_i - q_i))``. Draws L uniforms and, on
    rejection, one residual sample from ``generator``."""
    n = int(ratio.numel())
    r = torch.rand(n, generator=generator, device=generator.device)  # one uniform per position, in [0, 1)
    if r.device != p.device:
        r = r.to(p.device)
    rejected = (r >= ratio).tolist()  # == r >= min(1, ratio): r < 1
    if True not in rejected:
        return n, None
    i = rejected.index(True)
    return i, sample(residual(p[i : i + 1], q[i : i + 1]), generator)
