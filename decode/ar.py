"""Plain autoregressive decoding: one token per forward, the reference every other decoder must match.

The steps every decoder shares (generator check, prefill, mask growth) live in :mod:`decode.window`, so
that SJD and SJD2 start from exactly the same state as AR.
"""
from __future__ import annotations

import torch

from decode.result import DecodeResult
from decode.sampling import SamplingConfig, final_probs, sample
from decode.window import check_generator, grow_mask, prefill_forward
from models.base import ModelAdapter, Prefill


@torch.no_grad()
def ar_decode(
    adapter: ModelAdapter, prefill: Prefill, sampling: SamplingConfig, generator: torch.Generator
) -> DecodeResult:
    """Sample the image sequence one token per forward (forwards == ``layout.n_tokens``, prefill included)."""
    check_generator(generator, adapter.device)
    layout = adapter.layout
    n_tokens = layout.n_tokens
    logits, cache, mask = prefill_forward(adapter, prefill)  # step 1: the prompt predicts token 0
    n_forwards, n_streams = 1, mask.shape[0]
    tokens: list[torch.Tensor] = []
    for j in range(n_tokens):
        p = final_probs(logits, torch.tensor([j]), layout, sampling)  # [1, V]
        token = sample(p, generator)  # [1]
        tokens.append(token)
        if j == n_tokens - 1:
            break  # the last token is never fed back
        mask = grow_mask(mask, 1)
        logits, cache = adapter.forward(adapter.embed(token.expand(n_streams, 1)), cache, mask)
        n_forwards += 1
    return DecodeResult(
        tokens=torch.cat(tokens).cpu(),
        n_forwards=n_forwards,
        n_tokens=n_tokens,
        accepted_per_forward=[1] * n_tokens,
        extra={"decoder": "ar"},
    )
