"""Speculative Jacobi Decoding (SJD; Teng et al., ICLR 2025, arXiv 2410.01699): exact, training-free.

One iteration feeds a window of ``k + 1`` inputs ``[x_last, d_1 .. d_k]`` (``x_last``: the newest
committed token, not cached yet; ``d_i``: the draft for the i-th uncommitted position) in one forward
with both CFG streams:

1. the output row ``i - 1`` is the target p_i of draft ``d_i``; row ``k`` is the target of the position
   after the last draft; one fresh token is sampled from every row;
2. :func:`decode.speculative.accept` tests the drafts in order against their draft distributions q;
   the accepted prefix is committed, then the residual sample at the first rejection, or, when all
   pass, the fresh (bonus) sample of row ``k`` -- every forward commits at least one token;
3. the cache keeps exactly the committed inputs (``x_last`` and the accepted drafts); the rest is dropped
   in every stream together (the next request's ``drop``: a rollback at batch 1, masked out in a batch);
4. the fresh samples after the committed ones become the next drafts with their p as q; new slots at the
   window's tail start as a random image code of the model's own range (``init="random"``) or a copy
   of the spatial neighbour (``init="spatial"``), with one-hot q; forced layout positions are drafted
   as their forced id.

``jacobi_region`` says where windows are used: ``"image"`` for the code rows (EOLs included), plain AR
(a window with no drafts) for the head and tail tokens; ``"all"`` everywhere after the prefill. The
prefill is a plain forward that commits token 0. Step = one forward, prefill included.
"""
from __future__ import annotations

import torch

from decode.batch import Forward, Steps, run_one
from decode.result import DecodeResult
from decode.sampling import SamplingConfig, final_probs, forced_ids
from decode.window import (
    REGIONS,
    check_window,
    jacobi_span,
    n_window_drafts,
    one_hot,
    open_sequence,
    verify,
)
from models.base import FREE, ImageLayout, ModelAdapter, Prefill

INITS = ("random", "spatial")


def validate_options(window: int, init: str, jacobi_region: str) -> None:
    """Clear errors for impossible SJD settings."""
    check_window(window, "1 = plain AR; the SJD paper uses 16")
    if init not in INITS:
        raise ValueError(f"decoder.init must be one of {list(INITS)}, got {init!r}")
    if jacobi_region not in REGIONS:
        raise ValueError(f"decoder.jacobi_region must be one of {list(REGIONS)}, got {jacobi_region!r}")


def spatial_neighbour(layout: ImageLayout, j: int) -> int | None:
    """Index of the code left of position j (above it at a row start); None outside the grid or at (0, 0)."""
    n_head = len(layout.head)
    row, col = divmod(j - n_head, layout.row_len)
    if j < n_head or row >= layout.height or col >= layout.width:
        return None
    if col > 0:
        return j - 1
    return j - layout.row_len if row > 0 else None


def new_drafts(
    seq: torch.Tensor, start: int, stop: int, layout: ImageLayout, init: str, generator: torch.Generator
) -> torch.Tensor:
    """Initial drafts for positions [start, stop), written into ``seq`` [n_tokens] and returned.

    Forced positions get their forced id; free ones a random image code (``init="random"``, drawn from
    ``generator``) or the code of their spatial neighbour in ``seq`` (``init="spatial"``; random where
    there is none). Every such draft has a one-hot q.
    """
    n = stop - start
    forced = forced_ids(layout, torch.arange(start, stop)).tolist()
    codes = torch.randint(layout.code_start, layout.code_stop, (n,), generator=generator,
                          device=generator.device).to(seq.device)
    for i, j in enumerate(range(start, stop)):
        if forced[i] != FREE:
            seq[j] = forced[i]
            continue
        left = spatial_neighbour(layout, j) if init == "spatial" else None
        seq[j] = seq[left] if left is not None else codes[i]
    return seq[start:stop].clone()


@torch.no_grad()
def sjd_steps(
    adapter: ModelAdapter,
    prefill: Prefill,
    sampling: SamplingConfig,
    generator: torch.Generator,
    *,
    window: int = 16,
    init: str = "random",
    jacobi_region: str = "image",
) -> Steps:
    """The SJD step coroutine (:mod:`decode.batch`); options as :func:`sjd_decode`."""
    validate_options(window, init, jacobi_region)
    layout, vocab_size = adapter.layout, adapter.vocab_size
    n_tokens, span = layout.n_tokens, jacobi_span(layout, jacobi_region)

    seq, n_streams = yield from open_sequence(adapter, prefill, sampling, generator)  # committed, then drafts
    device = seq.device
    n_reject = 0  # inputs of the last forward that were not committed (dropped before the next one)
    n_committed, per_forward = 1, [1]
    drafts = seq.new_zeros(0)  # drafts for positions n_committed, n_committed + 1, ...
    q = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)  # [n_drafts, V]
    n_tested = n_accepted = 0

    while n_committed < n_tokens:
        k = n_window_drafts(n_committed, window, span, n_tokens)
        drafts, q = drafts[:k], q[:k]
        if drafts.numel() < k:  # new tail slots
            fresh_slots = new_drafts(seq, n_committed + drafts.numel(), n_committed + k, layout, init, generator)
            drafts, q = torch.cat([drafts, fresh_slots]), torch.cat([q, one_hot(fresh_slots, vocab_size)])
        inputs = torch.cat([seq[n_committed - 1 : n_committed], drafts])  # [k + 1]: x_last, d_1..d_k
        logits = yield Forward(adapter.embed(inputs.expand(n_streams, -1)), drop=n_reject)
        positions = range(n_committed, n_committed + k + 1)
        p = final_probs(logits, positions, layout, sampling)  # [k + 1, V]

        n_acc, committed, fresh = verify(p, q, drafts, generator)
        n_reject = k - n_acc  # uncommitted inputs: drafts n_acc+1..k
        seq[n_committed : n_committed + n_acc + 1] = committed
        n_committed += n_acc + 1
        drafts, q = fresh[n_acc + 1 :], p[n_acc + 1 :]  # unaccepted fresh samples, their p as q
        seq[n_committed : n_committed + drafts.numel()] = drafts
        per_forward.append(n_acc + 1)
        n_tested, n_accepted = n_tested + k, n_accepted + n_acc

    return DecodeResult(
        tokens=seq.cpu(),
        n_forwards=len(per_forward),
        n_tokens=n_tokens,
        accepted_per_forward=per_forward,
        extra={"decoder": "sjd", "window": window, "init": init, "jacobi_region": jacobi_region,
               "n_drafts_tested": n_tested, "n_drafts_accepted": n_accepted},
    )


@torch.no_grad()
def sjd_decode(
    adapter: ModelAdapter,
    prefill: Prefill,
    sampling: SamplingConfig,
    generator: torch.Generator,
    *,
    window: int = 16,
    init: str = "random",
    jacobi_region: str = "image",
) -> DecodeResult:
    """Decode the image sequence with SJD; same output distribution as :func:`decode.ar.ar_decode`.

    window: inputs per forward (the newest committed token + ``window - 1`` drafts); 1 = plain AR.
    init: ``"random"`` | ``"spatial"``, the first draft of a new window slot.
    jacobi_region: ``"image"`` (code rows incl. EOLs; AR for head/tail) | ``"all"``.
    """
    return run_one(adapter, sjd_steps(adapter, prefill, sampling, generator, window=window, init=init,
                                      jacobi_region=jacobi_region))
