"""Grouped acceptance (Grouped Speculative Decoding, GSD; So et al., ICCV 2025, arXiv 2508.07747): LOSSY.

SJD's test accepts a draft d with probability ``min(1, p(d) / q(d))``. GSD accepts it with the probability
of a *group* G of tokens around d instead, ``min(1, p(G) / q(G))``, so a draft passes when the target
puts its mass on tokens close to d rather than on d itself. On rejection the token is drawn from the
token-level residual ``normalize(max(0, p - q))`` as in SJD (:func:`decode.speculative.accept_by_ratio`).
The output no longer follows the AR distribution: GSD trades exactness for acceptance.

G, as the reference code defines it (junhyukso/GSD, ``scheduler/jacobi_iteration_lumina_mgpt.py``,
``SpeculativeSampler.__call__``; read for the rule, not copied):

1. rank the vocabulary by the target row (ascending; the code sorts the processed logits, the same order
   as p); the candidates are the ``half_width`` tokens ranked just below d, d itself and the
   ``half_width - 1`` ranked just above it (the code's slice ``[rank - 7 : rank + 7]``), clipped at the top;
2. keep a candidate g when ``|p(g) - p(d)| < p_thr`` (0.15);
3. keep it when its input-embedding row is within squared Euclidean distance ``d_thr`` (0.5) of d's --
   the code computes the distances from ``embed_tokens.weight[:10000]`` and applies this filter only when
   every candidate id is at most 10000 (on Lumina-mGPT: the image codes 4..8195 and a few specials);
   here: only when every candidate is an image code of the model (the same intent for any model);
4. d itself always stays in G. When d ranks among the ``half_width`` lowest tokens of the whole vocabulary
   the code's slice wraps to an empty group, which raises inside its ``try``, and it falls back to SJD's
   ratio ``p(d) / q(d)``: so does this module.

The draft q is SJD's (the previous target for a Jacobi draft, one-hot for a new random slot).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from decode.speculative import accept_by_ratio


def validate(half_width: int, p_thr: float, d_thr: float) -> None:
    """Clear errors for impossible group settings."""
    if isinstance(half_width, bool) or int(half_width) != half_width or half_width < 1:
        raise ValueError(f"decoder.group_half_width must be an integer >= 1 (the GSD code uses 7), got {half_width!r}")
    if not p_thr > 0:
        raise ValueError(f"decoder.group_p_thr must be > 0 (the GSD code uses 0.15), got {p_thr!r}")
    if not d_thr > 0:
        raise ValueError(f"decoder.group_d_thr must be > 0 (the GSD code uses 0.5), got {d_thr!r}")


@dataclass(frozen=True)
class GroupedTest:
    """GSD's verification as a drop-in for :func:`decode.speculative.accept_prefix` (``test`` of
    :func:`decode.window.verify`). ``embed``: ids [n] -> input embeddings [n, D] (the model's table);
    ``codes``: [start, stop) of the model's image-code ids."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    codes: tuple[int, int]
    half_width: int = 7
    p_thr: float = 0.15
    d_thr: float = 0.5

    def ratio(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """Acceptance probabilities [L] of drafts [L] under p, q [L, V] (rows 0..L-1 are read)."""
        n, vocab = int(drafts.numel()), p.shape[1]
        p, q = p[:n], q[:n]
        order = torch.sort(p, dim=1, stable=True).indices  # [L, V] ascending
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(vocab, device=p.device).expand(n, -1))
        r_d = rank.gather(1, drafts[:, None])  # [L, 1]
        idx = r_d + torch.arange(-self.half_width, self.half_width, device=p.device)  # [L, 2h]
        inside = idx < vocab  # the low end never leaves the vocabulary unless the whole row falls back (4.)
        group = order.gather(1, idx.clamp(0, vocab - 1))  # [L, 2h] token ids
        p_g, q_g = p.gather(1, group), q.gather(1, group)
        p_d, q_d = p.gather(1, drafts[:, None]), q.gather(1, drafts[:, None])
        keep = inside & ((p_g - p_d).abs() < self.p_thr)
        start, stop = self.codes
        all_codes = ((group >= start) & (group < stop) | ~inside).all(1, keepdim=True)  # [L, 1]
        e_g = self.embed(group.reshape(-1)).float().reshape(n, group.shape[1], -1)  # [L, 2h, D]
        e_d = self.embed(drafts).float()[:, None]  # [L, 1, D]
        near = ((e_g - e_d) ** 2).sum(-1) < self.d_thr
        keep &= near | ~all_codes
        keep |= idx == r_d  # d is always in its group (distance 0, |p - p| = 0), once
        p_sum, q_sum = (p_g * keep).sum(1), (q_g * keep).sum(1)
        grouped = torch.where(q_sum > 0, p_sum / q_sum.clamp_min(1e-30), (p_sum > 0).float())
        plain = torch.where(q_d > 0, p_d / q_d.clamp_min(1e-30), (p_d > 0).float())[:, 0]
        return torch.where(r_d[:, 0] < self.half_width, plain, grouped).clamp(max=1.0)

    def __call__(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                 generator: torch.Generator) -> tuple[int, torch.Tensor | None]:
        if drafts.numel() == 0:
            return 0, None
        return accept_by_ratio(p, q, self.ratio(p, q, drafts), generator)


def embedding_lookup(adapter: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [n] -> the adapter's input embeddings [n, D] (no gradients)."""

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return adapter.embed(ids[None])[0]  # type: ignore[attr-defined]

    return lookup
