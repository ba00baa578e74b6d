"""Final token distributions and sampling (DESIGN.md section 4).

One function, :func:`final_probs`, turns model logits into the distribution a token is drawn from.
It serves both the target p and the draft q of speculative decoding, so the two are always built
the same way, in this order and in float32:

1. classifier-free guidance on raw logits, ``u + s * (c - u)`` (row 0 conditional, row 1
   unconditional; a single stream means no guidance),
2. layout constraints per row from the generated-token index (forced id -> exactly one-hot;
   free position -> only image codes),
3. temperature, 4. top-k, 5. top-p, 6. softmax.
"""
from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch

from models.base import FREE, ImageLayout


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become probabilities. YAML ``sampling:`` keys equal these field names."""

    cfg_scale: float = 3.0  # classifier-free guidance scale s; 1.0 = no guidance (conditional logits)
    temperature: float = 1.0  # > 0; use top_k=1 for greedy decoding
    top_k: int = 0  # keep the k most likely tokens; 0 = off (real models use 2000 image codes)
    top_p: float = 1.0  # nucleus: keep the smallest set with mass >= top_p; 1.0 = off

    def __post_init__(self) -> None:
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"sampling.cfg_scale must be a finite number >= 0 (1.0 = no guidance, 0 = "
                             f"unconditional), got {self.cfg_scale}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"sampling.temperature must be > 0, got {self.temperature}; for greedy decoding set "
                "sampling.top_k=1 and keep temperature=1.0"
            )
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"sampling.top_k must be an integer >= 0 (0 = off, 1 = greedy), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1] (1.0 = off), got {self.top_p}")


@functools.lru_cache(maxsize=16)
def _forced_table(layout: ImageLayout, device: torch.device) -> torch.Tensor:
    return layout.forced_ids(torch.arange(layout.n_tokens, device=device))


@functools.lru_cache(maxsize=16)
def _forced_list(layout: ImageLayout) -> tuple[int, ...]:
    return tuple(layout.forced_ids(torch.arange(layout.n_tokens)).tolist())


def forced_list(layout: ImageLayout) -> tuple[int, ...]:
    """The forced id (or ``FREE``) of every position, on the host, built once per layout."""
    return _forced_list(layout)


@functools.lru_cache(maxsize=16)
def forced_table(layout: ImageLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced id or ``FREE`` [n_tokens], is forced [n_tokens] bool) on ``device``, built once per layout
    and device (shared: never write into them)."""
    forced = _forced_table(layout, device)
    return forced, forced != FREE


@functools.lru_cache(maxsize=16)
def _not_code(layout: ImageLayout, vocab_size: int, device: torch.device) -> torch.Tensor:
    return ~layout.code_mask(vocab_size, device=device)  # [V] True on ids that are not image codes


def forced_ids(layout: ImageLayout, positions: torch.Tensor) -> torch.Tensor:
    """``layout.forced_ids(positions)`` from a table built once per layout and device (decoders call it
    every forward). positions: LongTensor [L] on any device; the result lives on the same device."""
    if positions.numel() and not bool(((positions >= 0) & (positions < layout.n_tokens)).all()):
        raise IndexError(f"position outside the image sequence [0, {layout.n_tokens})")
    return _forced_table(layout, positions.device)[positions]


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """[B, L, V] raw logits -> [L, V] float32: ``u + s * (c - u)`` for B == 2, the single row for B == 1."""
    logits = logits.float()
    if logits.shape[0] == 1:
        return logits[0]
    if logits.shape[0] != 2:
        raise ValueError(
            f"expected 1 stream (no CFG) or 2 streams (conditional, unconditional), got {logits.shape[0]}; "
            "decode one image at a time"
        )
    cond, uncond = logits[0], logits[1]
    return uncond + cfg_scale * (cond - uncond)


def constrain(logits: torch.Tensor, forced: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
    """Mask every non-image-code id to -inf on free rows. logits [L, V]; forced [L] (``FREE`` or an id).

    Forced rows are left as they are: :func:`final_probs` replaces them by one-hot rows at the end.
    """
    not_code = _not_code(layout, logits.shape[-1], logits.device)  # [V]
    free = (forced == FREE)[:, None]  # [L, 1]
    return logits.masked_fill(free & not_code[None, :], -math.inf)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept), -inf elsewhere. k=0: off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [L, 1]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep per row the most likely tokens until their mass reaches ``top_p`` (at least one). 1.0: off."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [L, V]
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def final_probs(
    logits: torch.Tensor, positions: torch.Tensor, layout: ImageLayout, sampling: SamplingConfig
) -> torch.Tensor:
    """Model logits -> the float32 distribution each row's token is drawn from (p and q alike).

    logits: [B, L, V] (B = 2 with CFG: row 0 conditional, row 1 unconditional; B = 1 without).
    positions: LongTensor [L] (or a ``range``), generated-token index of the token each row predicts.
    Returns [L, V] float32 rows summing to 1; forced rows are exactly one-hot. Does not modify ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"final_probs expects logits [B, L, V], got shape {tuple(logits.shape)}")
    n_rows, vocab_size = logits.shape[1], logits.shape[2]
    forced_rows = _forced_rows(positions, n_rows, layout)  # [(row, forced id)] on the host
    if len(forced_rows) == n_rows:  # every row forced: one-hot rows, nothing else to compute
        probs = torch.zeros(n_rows, vocab_size, dtype=torch.float32, device=logits.device)
        for i, f in forced_rows:
            probs[i, f] = 1.0
        return probs
    # Every step below works row by row, so forced rows may go through the free rows' path: they are
    # replaced by their one-hot rows at the end. Guidance is elementwise, so it is computed on the code
    # columns only, the other columns are -inf (== guide() then constrain() on free rows).
    if logits.shape[0] not in (1, 2):
        guide(logits, sampling.cfg_scale)  # raises with the fix
    codes = slice(layout.code_start, layout.code_stop)
    x = torch.full((n_rows, vocab_size), -math.inf, dtype=torch.float32, device=logits.device)
    code_logits = logits[:, :, codes]
    if code_logits.dtype != torch.float32:
        code_logits = code_logits.float()
    if logits.shape[0] == 1:
        x[:, codes] = code_logits[0]
    else:
        cond, uncond = code_logits[0], code_logits[1]
        torch.add(uncond, sampling.cfg_scale * (cond - uncond), out=x[:, codes])
    if sampling.temperature != 1.0:
        x = x / sampling.temperature
    x = top_k_filter(x, sampling.top_k)
    x = top_p_filter(x, sampling.top_p)
    probs = torch.softmax(x, dim=-1)
    for i, f in forced_rows:  # (a window holds a few forced positions: row views, no index tensors)
        row = probs[i]
        row.zero_()
        row[f] = 1.0
    return probs


@functools.lru_cache(maxsize=16)
def _forced_positions(layout: ImageLayout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the forced positions, their ids), built once per layout."""
    table = _forced_list(layout)
    pos = tuple(j for j, f in enumerate(table) if f != FREE)
    return pos, tuple(table[j] for j in pos)


def _forced_rows(positions: torch.Tensor | range, n_rows: int, layout: ImageLayout) -> list[tuple[int, int]]:
    """(row, forced id) of the forced positions among ``positions``; refuses bad positions."""
    if isinstance(positions, range) and positions.step == 1:  # a window: look the forced rows up
        start, stop = positions.start, max(positions.start, positions.stop)
        if stop - start != n_rows:
            raise ValueError(f"{stop - start} positions for {n_rows} logit rows")
        if stop > start and (start < 0 or stop > layout.n_tokens):
            raise IndexError(f"position outside the image sequence [0, {layout.n_tokens})")
        forced, ids = _forced_positions(layout)
        lo, hi = bisect.bisect_left(forced, start), bisect.bisect_left(forced, stop)
        return [(forced[j] - start, ids[j]) for j in range(lo, hi)]
    pos = list(positions) if isinstance(positions, range) else torch.as_tensor(positions).reshape(-1).tolist()
    if len(pos) != n_rows:
        raise ValueError(f"{len(pos)} positions for {n_rows} logit rows")
    if pos and (min(pos) < 0 or max(pos) >= layout.n_tokens):
        raise IndexError(f"position outside the image sequence [0, {layout.n_tokens})")
    table = _forced_list(layout)
    return [(i, table[j]) for i, j in enumerate(pos) if table[j] != FREE]


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row: probs [L, V] (rows need not be normalised) -> LongTensor [L].

    ``generator`` must live on ``probs.device`` (e.g. ``torch.Generator(device=adapter.device)``).
    """
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=probs.device)
    # torch.multinomial(probs, 1) draws exactly this (ATen's one-sample path: argmax of p / Exp(1) noise,
    # the same draws from the generator) minus its per-call input checks; tests/test_sampling.py pins it.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(torch.div(probs, noise, out=noise), dim=-1)
