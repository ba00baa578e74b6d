"""Plain autoregressive decoding: one token per forward, the reference every other decoder must match.

Written as a step coroutine (:mod:`decode.batch`): :func:`ar_steps` yields one request per forward and is
driven at batch 1 by :func:`ar_decode`, or with other rows by :func:`decode.batch.run_batched`.
"""
from __future__ import annotations

import torch

from decode.batch import Forward, Steps, run_one
from decode.result import DecodeResult
from decode.sampling import SamplingConfig, final_probs, sample
from decode.window import check_generator, prefill_request
from models.base import ModelAdapter, Prefill


@torch.no_grad()
def ar_steps(adapter: ModelAdapter, prefill: Prefill, sampling: SamplingConfig, generator: torch.Generator) -> Steps:
    """The AR step coroutine: the prompt, then one token per request (``layout.n_tokens`` forwards)."""
    check_generator(generator, adapter.device)
    layout = adapter.layout
    n_tokens = layout.n_tokens
    logits = yield prefill_request(adapter, prefill)  # step 1: the prompt predicts token 0
    logits = logits[:, -1:]
    n_forwards, n_streams = 1, logits.shape[0]
    tokens: list[torch.Tensor] = []
    for j in range(n_tokens):
        p = final_probs(logits, range(j, j + 1), layout, sampling)  # [1, V]
        token = sample(p, generator)  # [1]
        tokens.append(token)
        if j == n_tokens - 1:
            break  # the last token is never fed back
        logits = yield Forward(adapter.embed(token.expand(n_streams, 1)))
        n_forwards += 1
    return DecodeResult(
        tokens=torch.cat(tokens).cpu(),
        n_forwards=n_forwards,
        n_tokens=n_tokens,
        accepted_per_forward=[1] * n_tokens,
        extra={"decoder": "ar"},
    )


@torch.no_grad()
def ar_decode(
    adapter: ModelAdapter, prefill: Prefill, sampling: SamplingConfig, generator: torch.Generator
) -> DecodeResult:
    """Sample the image sequence one token per forward (forwards == ``layout.n_tokens``, prefill included)."""
    return run_one(adapter, ar_steps(adapter, prefill, sampling, generator))
