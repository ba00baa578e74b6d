"""Plain autoregressive decoding: one token per forward, the reference every other decoder must match.

Also holds the small steps every decoder shares (generator check, prefill), so that SJD and SJD2 start
from exactly the same state as AR.
"""
from __future__ import annotations

from typing import Any

import torch

from decode.result import DecodeResult
from decode.sampling import SamplingConfig, final_probs, sample
from models.base import ModelAdapter, Prefill


def check_generator(generator: torch.Generator, device: torch.device | str) -> None:
    """Refuse a generator on another device than the model (its draws would fail or be slow)."""
    if torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(
            f"the generator lives on {generator.device} but the model on {device}; "
            f"pass torch.Generator(device={str(device)!r}).manual_seed(seed)"
        )


def prefill_forward(adapter: ModelAdapter, prefill: Prefill) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Run the prompt. Returns (logits of the last prompt position [B, 1, V], cache, attention mask [B, T])."""
    ids = prefill.input_ids.to(adapter.device)  # [B, T]
    mask = prefill.attention_mask.to(adapter.device)  # [B, T]
    if ids.shape[0] not in (1, 2):
        raise ValueError(f"prefill has {ids.shape[0]} rows; expected 1 (no CFG) or 2 (cond, uncond)")
    logits, cache = adapter.forward(adapter.embed(ids), None, mask)
    return logits[:, -1:], cache, mask


def grow_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Append n attended positions to every stream's attention mask [B, T] -> [B, T + n]."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)


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
