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
from decode.sampling import SamplingConfig, final_probs, forced_list, forced_table
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
    if n and (start < 0 or stop > layout.n_tokens):
        raise IndexError(f"position outside the image sequence [0, {layout.n_tokens})")
    forced, is_forced = forced_table(layout, seq.device)
    codes = torch.randint(layout.code_start, layout.code_stop, (n,), generator=generator,
                          device=generator.device)
    if codes.device != seq.device:
        codes = codes.to(seq.device)
    drafts = torch.where(is_forced[start:stop], forced[start:stop], codes)  # the random init
    if init == "spatial":  # a free slot copies its neighbour, which may itself be a new slot (copy its source)
        source: dict[int, int] = {}
        table = forced_list(layout)
        for j in range(start, stop):
            left = spatial_neighbour(layout, j) if table[j] == FREE else None
            if left is not None:
                source[j] = source.get(left, left)
        old = [(j, s) for j, s in source.items() if s < start]  # copies of tokens already in seq
        new = [(j, s) for j, s in source.items() if s >= start]  # copies of new slots without a neighbour
        if old:
            drafts[[j - start for j, _ in old]] = seq[[s for _, s in old]]
        if new:
            drafts[[j - start for j, _ in new]] = drafts[[s - start for _, s in new]]
    seq[start:stop] = drafts
    return drafts


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
    n_drafts = 0  # drafts for positions n_committed, n_committed + 1, ... (held in seq)
    q = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)  # [n_drafts, V]
    n_tested = n_accepted = 0

    while n_committed < n_tokens:
        k = n_window_drafts(n_committed, window, span, n_tokens)
        if n_drafts > k:
            q, n_drafts = q[:k], k
        if n_drafts < k:  # new tail slots
            fresh_slots = new_drafts(seq, n_committed + n_drafts, n_committed + k, layout, init, generator)
            q, n_drafts = torch.cat([q, one_hot(fresh_slots, vocab_size)]), k
        inputs = seq[n_committed - 1 : n_committed + k]  # [k + 1]: x_last, d_1..d_k (seq holds the drafts)
        logits = yield Forward(adapter.embed(inputs.expand(n_streams, -1)), drop=n_reject)
        positions = range(n_committed, n_committed + k + 1)
        p = final_probs(logits, positions, layout, sampling)  # [k + 1, V]

        n_acc, committed, fresh = verify(p, q, inputs[1:], generator)
        n_reject = k - n_acc  # uncommitted inputs: drafts n_acc+1..k
        seq[n_committed : n_committed + n_acc + 1] = committed
        n_committed += n_acc + 1
        n_drafts = k - n_acc
        q = p[n_acc + 1 :]  # the unaccepted fresh samples are the next drafts, their p is their q
        seq[n_committed : n_committed + n_drafts] = fresh[n_acc + 1 :]
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
