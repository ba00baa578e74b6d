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

The same loop is two more decoders of the family (``conf/decoder/scd.yaml``, ``gsd.yaml``):

* SCD, ``coupling="maximal" | "gumbel"`` (:mod:`decode.coupling`): step 4's redraft of the positions that
  stay uncommitted is coupled to their old drafts instead of fresh; still exact. ``"none"`` is SJD.
* GSD, ``acceptance="grouped"`` (:mod:`decode.grouped`): step 2 accepts a draft with the probability of
  a group of tokens around it (``group_*`` options); lossy. ``"exact"`` is SJD's test.
"""
from __future__ import annotations

import torch

from decode import coupling as couple
from decode import grouped
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
ACCEPTANCES = ("exact", "grouped")


def validate_options(window: int, init: str, jacobi_region: str, coupling: str = "none", coupled_q: str = "target",
                     acceptance: str = "exact", group_half_width: int = 7, group_p_thr: float = 0.15,
                     group_d_thr: float = 0.5) -> None:
    """Clear errors for impossible SJD / SCD / GSD settings."""
    check_window(window, "1 = plain AR; the SJD paper uses 16")
    if init not in INITS:
        raise ValueError(f"decoder.init must be one of {list(INITS)}, got {init!r}")
    if jacobi_region not in REGIONS:
        raise ValueError(f"decoder.jacobi_region must be one of {list(REGIONS)}, got {jacobi_region!r}")
    couple.validate(coupling, coupled_q)
    if acceptance not in ACCEPTANCES:
        raise ValueError(f"decoder.acceptance must be one of {list(ACCEPTANCES)}, got {acceptance!r}")
    grouped.validate(group_half_width, group_p_thr, group_d_thr)


def family_name(coupling: str, acceptance: str) -> str:
    """The decoder a setting is: ``gsd`` (grouped test), ``scd`` (coupled redrafts) or ``sjd``."""
    return "gsd" if acceptance == "grouped" else "scd" if coupling != "none" else "sjd"


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
    coupling: str = "none",
    coupled_q: str = "target",
    acceptance: str = "exact",
    group_half_width: int = 7,
    group_p_thr: float = 0.15,
    group_d_thr: float = 0.5,
) -> Steps:
    """The SJD (SCD, GSD) step coroutine (:mod:`decode.batch`); options as :func:`sjd_decode`."""
    validate_options(window, init, jacobi_region, coupling, coupled_q, acceptance, group_half_width, group_p_thr,
                     group_d_thr)
    layout, vocab_size = adapter.layout, adapter.vocab_size
    n_tokens, span = layout.n_tokens, jacobi_span(layout, jacobi_region)
    test = None if acceptance == "exact" else grouped.GroupedTest(
        grouped.embedding_lookup(adapter), (layout.code_start, layout.code_stop), group_half_width, group_p_thr,
        group_d_thr)

    seq, n_streams = yield from open_sequence(adapter, prefill, sampling, generator)  # committed, then drafts
    device = seq.device
    noise = couple.GumbelNoise(vocab_size, device) if coupling == "gumbel" else None
    n_reject = 0  # inputs of the last forward that were not committed (dropped before the next one)
    n_committed, per_forward = 1, [1]
    n_drafts = 0  # drafts for positions n_committed, n_committed + 1, ... (held in seq)
    q = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)  # [n_drafts, V]
    n_tested = n_accepted = 0
    n_redrafts, n_unchanged = 0, torch.zeros((), dtype=torch.long, device=device)  # stale drafts redrawn / same token

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

        gumbel = None if noise is None else noise.sample(p, n_committed, generator)
        n_acc, committed, fresh = verify(p, q, inputs[1:], generator, fresh=gumbel, test=test)
        n_reject = k - n_acc  # uncommitted inputs: drafts n_acc+1..k
        stale = slice(n_acc + 1, k)  # drafts that stay uncommitted: their next drafts
        old = inputs[1:][stale].clone()  # (inputs is a view of seq, rewritten below)
        nxt, q_next = fresh[n_acc + 1 :], p[n_acc + 1 :]  # + the row after the last draft: a new position
        if coupling == "maximal" and old.numel():
            coupled, kept = couple.maximal_coupling(p[stale], q[stale], old, generator)
            nxt = torch.cat([coupled, nxt[old.numel():]])
            q_next = torch.cat([couple.coupled_q(p[stale], q[stale], kept, coupled_q), q_next[old.numel():]])
        n_redrafts, n_unchanged = n_redrafts + old.numel(), n_unchanged + (nxt[: old.numel()] == old).sum()
        seq[n_committed : n_committed + n_acc + 1] = committed
        n_committed += n_acc + 1
        n_drafts = k - n_acc
        q = q_next  # the unaccepted samples are the next drafts, their p is their q
        seq[n_committed : n_committed + n_drafts] = nxt
        per_forward.append(n_acc + 1)
        n_tested, n_accepted = n_tested + k, n_accepted + n_acc

    return DecodeResult(
        tokens=seq.cpu(),
        n_forwards=len(per_forward),
        n_tokens=n_tokens,
        accepted_per_forward=per_forward,
        extra={"decoder": family_name(coupling, acceptance), "window": window, "init": init,
               "jacobi_region": jacobi_region, "coupling": coupling, "coupled_q": coupled_q,
               "acceptance": acceptance, "group_half_width": group_half_width, "group_p_thr": group_p_thr,
               "group_d_thr": group_d_thr, "n_drafts_tested": n_tested, "n_drafts_accepted": n_accepted,
               "n_redrafts": n_redrafts, "n_redrafts_unchanged": int(n_unchanged)},
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
    coupling: str = "none",
    coupled_q: str = "target",
    acceptance: str = "exact",
    group_half_width: int = 7,
    group_p_thr: float = 0.15,
    group_d_thr: float = 0.5,
) -> DecodeResult:
    """Decode the image sequence with SJD; same output distribution as :func:`decode.ar.ar_decode` unless
    ``acceptance="grouped"`` (GSD) or ``coupled_q="kept_old"``.

    window: inputs per forward (the newest committed token + ``window - 1`` drafts); 1 = plain AR.
    init: ``"random"`` | ``"spatial"``, the first draft of a new window slot.
    jacobi_region: ``"image"`` (code rows incl. EOLs; AR for head/tail) | ``"all"``.
    coupling: ``"none"`` (SJD) | ``"maximal"`` | ``"gumbel"`` (SCD, :mod:`decode.coupling`).
    coupled_q: q of a kept draft under maximal coupling, ``"target"`` (exact) | ``"kept_old"`` (the SCD code's).
    acceptance: ``"exact"`` (SJD's test) | ``"grouped"`` (GSD, lossy; ``group_*``: :mod:`decode.grouped`).
    """
    options = {name: value for name, value in locals().items()
               if name not in ("adapter", "prefill", "sampling", "generator")}
    return run_one(adapter, sjd_steps(adapter, prefill, sampling, generator, **options))

