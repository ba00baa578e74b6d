"""What ar, sjd and sjd2 share: the prompt request, the opening, where windows may open, how many drafts a
window holds, and the one verification step of a speculative window. (The cache and attention mask are
the driver's, :mod:`decode.batch`.)

The decoders are siblings over this module and the adapter protocol; none imports another.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch

from decode.batch import Forward
from decode.sampling import SamplingConfig, final_probs, sample
from decode.speculative import accept_prefix
from models.base import ImageLayout, ModelAdapter, Prefill

REGIONS = ("image", "all")

# The one acceptance step of every window decoder: :func:`decode.speculative.accept` with the residual
# sample kept on the device (a test swaps in a broken rule that returns an int token: also understood).
accept = accept_prefix


def check_generator(generator: torch.Generator, device: torch.device | str) -> None:
    """Refuse a generator on another device than the model (its draws would fail or be slow)."""
    if torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(
            f"the generator lives on {generator.device} but the model on {device}; "
            f"pass torch.Generator(device={str(device)!r}).manual_seed(seed)"
        )


def check_window(window: Any, hint: str) -> None:
    """Refuse a window that is not an integer >= 1 (``hint``: the decoder's own note on the value)."""
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"decoder.window must be an integer >= 1 ({hint}), got {window!r}")


def prefill_request(adapter: ModelAdapter, prefill: Prefill) -> Forward:
    """The prompt as a decoder's first request (its left padding masked out)."""
    ids = prefill.input_ids.to(adapter.device)  # [S, T]
    if ids.shape[0] not in (1, 2):
        raise ValueError(f"prefill has {ids.shape[0]} rows; expected 1 (no CFG) or 2 (cond, uncond)")
    return Forward(adapter.embed(ids), mask=prefill.attention_mask.to(adapter.device))


def open_sequence(adapter: ModelAdapter, prefill: Prefill, sampling: SamplingConfig,
                  generator: torch.Generator) -> Generator[Forward, torch.Tensor, tuple[torch.Tensor, int]]:
    """The opening every window decoder shares (a sub-coroutine: ``seq, n_streams = yield from ...``): check
    the generator, run the prompt, sample token 0 (no window opens before it). Returns (the sequence
    [n_tokens] with token 0 committed, the number of streams)."""
    check_generator(generator, adapter.device)
    logits = yield prefill_request(adapter, prefill)
    seq = torch.zeros(adapter.layout.n_tokens, dtype=torch.long, device=logits.device)
    seq[:1] = sample(final_probs(logits[:, -1:], torch.tensor([0]), adapter.layout, sampling), generator)
    return seq, int(logits.shape[0])


def jacobi_span(layout: ImageLayout, jacobi_region: str) -> tuple[int, int]:
    """[start, stop) of the generated-token indices whose tokens may be drafted."""
    if jacobi_region == "all":
        return 0, layout.n_tokens
    start = len(layout.head)
    return start, start + layout.height * layout.row_len


def n_window_drafts(n_committed: int, window: int, span: tuple[int, int], n_tokens: int) -> int:
    """Drafts k of the next window: at most ``window - 1``, only inside ``span``, none past the end."""
    start, stop = span
    if not start <= n_committed < stop:
        return 0
    return max(0, min(window - 1, stop - n_committed, n_tokens - 1 - n_committed))


def one_hot(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n] ids -> [n, V] float32 one-hot rows (the q of a deterministic draft)."""
    q = torch.zeros(tokens.numel(), vocab_size, dtype=torch.float32, device=tokens.device)
    return q.scatter_(1, tokens[:, None], 1.0)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator,
           n_testable: int | None = None, fresh: torch.Tensor | None = None,
           test: Callable[..., tuple[int, Any]] | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Steps 1-2 of a speculative window: p [k+1, V] targets, q [k, V] and drafts [k].

    One fresh token is sampled from every target row (or ``fresh`` [k + 1] is given: samples the caller
    drew, e.g. with Gumbel coupling), then the first ``n_testable`` drafts (default: all k; SJD2 stops at
    the first slot that may not be accepted) are tested in order (``test``, default
    :func:`decode.speculative.accept`; GSD passes its grouped test). Returns (n_accepted, the committed
    tokens [n_accepted + 1]: the accepted drafts, then the residual sample at the first rejection or,
    when all tested drafts pass, the fresh sample of row ``n_testable``; the fresh samples [k + 1]).
    """
    m = drafts.numel() if n_testable is None else n_testable
    if fresh is None:
        fresh = sample(p, generator)  # [k + 1]
    n_acc, token = (accept if test is None else test)(p[:m], q[:m], drafts[:m], generator)
    if token is None:
        nxt = fresh[m : m + 1]
    else:
        nxt = token if isinstance(token, torch.Tensor) else torch.tensor([token], device=fresh.device)
    return n_acc, torch.cat([drafts[:n_acc], nxt]), fresh
