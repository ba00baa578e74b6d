"""Driving a decoder: one image at a time (batch 1), or many at once with every row exact on its own.

Every decoder (:mod:`decode.ar`, :mod:`decode.sjd`, :mod:`decode.sjd2`) is written once, as a *step
coroutine* over the adapter protocol: a Python generator that yields a :class:`Forward` request (the
inputs it wants appended to its own context, after dropping the last ``drop`` inputs of its previous
request), receives the logits of exactly those inputs, and finally returns its ``DecodeResult``. The
coroutine owns everything that makes the row what it is -- its generator, acceptance, committed length,
layout constraints and drafts; the driver owns only the model's cache and attention mask.

* :func:`run_one` (batch 1): one cache; a drop is ``adapter.rollback`` (a crop). This is the path every
  decoder had before batching, call for call, so batch 1 gives the same numbers as before.
* :func:`run_batched`: ``B`` coroutines (``B * S`` streams, ``S = 2`` with CFG) share one cache on one
  time axis. Each forward appends ``L_max`` columns (the longest request); a shorter request is padded at
  its end with masked slots. Dropped inputs cannot be cropped (other rows own the same columns), so they
  are masked out: *holes*. Positions are passed explicitly as the number of attended inputs before each
  input in its stream, so every row attends to exactly its own inputs at the relative positions batch 1
  gives them (masked keys get attention weight exactly 0; rotary attention depends on relative positions
  only). Trailing columns masked in every stream are cropped; when holes fill half the cache it is
  compacted (each stream's attended entries gathered, ``adapter.gather_cache``). A finished row frees its
  slot at once: the next job takes its streams (their old entries masked out) and sends its prompt as its
  first request in the next batched forward (continuous refill), so a batch never waits for its slowest
  row. Per row the result equals batch 1 up to float round-off of the batched matmuls.

A draft tree (SJD-PAC) asks with ``Forward.tree`` (which of its inputs each input attends) and keeps any
subset of its last inputs with ``Forward.keep``: batch 1 moves the kept entries in place
(``adapter.keep_tail``) and passes a per-input mask [S, L, T] with positions column + depth; batched,
the dropped inputs become holes like any drop and the per-input mask covers every stream.
"""
from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from decode.result import DecodeResult


@dataclass
class Forward:
    """One request of a decoder row: append ``embeds`` [S, L, D] (model inputs of its S streams) to its
    context, first dropping the last ``drop`` inputs of its previous request; ``mask`` [S, L] marks the
    inputs to attend (a prompt's left padding: 0; None: all).

    A draft tree (:mod:`decode.draft_tree`) instead gives ``tree`` [L, L] bool, the inputs of this request
    each input attends (its ancestors and itself; None: causal), so input i sits at the position of its
    context + its depth ``tree[i].sum() - 1``; and ``keep``: the indices (increasing) of its previous
    request's inputs to keep, every other one dropped (None: ``drop`` applies)."""

    embeds: torch.Tensor
    drop: int = 0
    mask: torch.Tensor | None = None
    tree: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])


Steps = Generator[Forward, torch.Tensor, DecodeResult]  # yields requests, is sent their logits [S, L, V]


def _attend(request: Forward, device: torch.device) -> torch.Tensor:
    if request.mask is not None:
        return request.mask.to(device)
    return torch.ones(request.embeds.shape[:2], dtype=torch.long, device=device)


def _tree_inputs(request: Forward, mask: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 1's attention mask [S, L, T] and positions [S, L] of a tree request whose inputs are the
    columns ``first..T`` of ``mask`` [S, T] (positions: the column of the context + the depth)."""
    tree = request.tree.to(mask.device)
    per_input = mask.bool()[:, None, :].repeat(1, request.length, 1)
    per_input[:, :, first:] = tree
    return per_input, (first + tree.sum(1) - 1).expand(mask.shape[0], -1)


def run_one(adapter: Any, steps: Steps) -> DecodeResult:
    """Drive one decoder coroutine with its own cache (batch 1): drops are rollbacks (a tree's kept inputs
    are first moved in place, ``adapter.keep_tail``). The attention mask is a view of one buffer (ones
    beyond what a request's mask wrote), not rebuilt every forward."""
    cache, buffer, width, ones_from = None, None, 0, 0  # columns >= ones_from of the buffer hold 1
    last = 0  # inputs of the previous request
    request = next(steps)
    while True:
        if request.keep is not None:
            n_keep = int(request.keep.numel())
            if not torch.equal(request.keep.cpu(), torch.arange(n_keep)):
                cache = adapter.keep_tail(cache, last, request.keep)
            else:  # a prefix: a plain rollback
                cache = adapter.rollback(cache, last - n_keep)
            width -= last - n_keep
        elif request.drop:
            cache = adapter.rollback(cache, request.drop)
            width -= request.drop
        stop = width + request.length
        if buffer is None or stop > buffer.shape[1]:
            grown = torch.ones(request.embeds.shape[0], max(2 * stop, 64), dtype=torch.long, device=adapter.device)
            if buffer is not None:
                grown[:, :width] = buffer[:, :width]
            buffer, ones_from = grown, width
        if request.mask is not None:
            buffer[:, width:stop] = request.mask.to(buffer.device)
            ones_from = max(ones_from, stop)
        elif ones_from > width:
            buffer[:, width:ones_from] = 1
            ones_from = width
        width, last = stop, request.length
        if request.tree is None:
            logits, cache = adapter.forward(request.embeds, cache, buffer[:, :width])
        else:
            per_input, positions = _tree_inputs(request, buffer[:, :width], width - last)
            logits, cache = adapter.forward(request.embeds, cache, per_input, position_ids=positions)
        try:
            request = steps.send(logits)
        except StopIteration as stop_iteration:
            return stop_iteration.value


@dataclass
class Finished:
    """A row that finished in :func:`run_batched`: its job key, result and costs."""

    key: Any
    result: DecodeResult
    in_batch_s: float  # wall time from joining the batch to finishing (shared with the other rows)
    finished_at_s: float  # since run_batched started
    batch_size: int


@dataclass
class _Row:
    key: Any
    steps: Steps
    request: Forward
    streams: torch.Tensor  # [S] cache rows of this job
    joined: float
    start: int = 0  # first column of its last request
    length: int = 0  # inputs of its last request


@dataclass
class BatchStats:
    """What the shared cache went through (tests and the bench read it)."""

    n_forwards: int = 0
    n_compactions: int = 0
    max_width: int = 0
    padded_inputs: int = 0  # masked pad slots fed to even out request lengths
    real_inputs: int = 0
    widths: list[int] = field(default_factory=list)


class BatchedCache:
    """The shared cache of :func:`run_batched`: attention mask [N, T] and attended count per stream."""

    def __init__(self, adapter: Any, hole_share: float = 0.5):
        self.adapter, self.hole_share = adapter, hole_share
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=adapter.device)
        self.valid = torch.zeros(0, dtype=torch.long, device=adapter.device)  # attended entries per stream
        self.stats = BatchStats()

    def add_streams(self, n: int) -> torch.Tensor:
        """n new streams with nothing attended; returns their rows."""
        first = self.mask.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_zeros(n, self.mask.shape[1])])
        self.valid = torch.cat([self.valid, self.valid.new_zeros(n)])
        if self.cache is not None:  # grow the cache's batch: the new rows' entries stay masked
            rows = torch.cat([torch.arange(first, device=self.mask.device),
                              torch.zeros(n, dtype=torch.long, device=self.mask.device)])
            cols = torch.arange(self.mask.shape[1], device=self.mask.device).expand(rows.numel(), -1)
            self.cache = self.adapter.gather_cache(self.cache, rows, cols)
        return torch.arange(first, first + n, device=self.mask.device)

    def forget(self, streams: torch.Tensor) -> None:
        """A new job takes these streams: everything they attended is masked out."""
        self.mask[streams] = 0
        self.valid[streams] = 0

    def drop(self, row: _Row, request: Forward) -> None:
        """Mask out the inputs of the row's previous request that ``request`` drops (``drop`` / ``keep``)."""
        gone = torch.zeros(row.length, dtype=torch.bool, device=self.mask.device)
        if request.keep is None:
            gone[row.length - request.drop :] = True
        else:
            gone[:] = True
            gone[request.keep.to(gone.device)] = False
        cols = row.start + gone.nonzero()[:, 0]
        self.valid[row.streams] -= self.mask[row.streams[:, None], cols].sum(1)
        self.mask[row.streams[:, None], cols] = 0

    def tidy(self, rows: list[_Row]) -> None:
        """Crop the columns masked in every stream at the end; compact when holes fill the cache, or when
        streams are no longer used (their rows leave the cache)."""
        live = torch.cat([r.streams for r in rows]) if rows else self.valid[:0]
        if self.cache is None or not rows:
            return
        attended = self.mask.any(0).nonzero()
        trailing = self.mask.shape[1] - (int(attended[-1, 0]) + 1 if attended.numel() else 0)
        if trailing:
            self.cache = self.adapter.rollback(self.cache, trailing)
            self.mask = self.mask[:, : self.mask.shape[1] - trailing]
        n, width = self.mask.shape
        holes = n * width - int(self.valid.sum())
        if live.numel() < n or (width and holes > self.hole_share * n * width):
            self.compact(rows, live)

    def compact(self, rows: list[_Row], live: torch.Tensor) -> None:
        """Gather each live stream's attended entries (in order, right-aligned) into a new, narrower cache."""
        n_old, mask = self.mask.shape[0], self.mask[live]
        width = int(mask.sum(1).max())
        order = torch.argsort(mask, dim=1, stable=True)  # masked columns first, attended ones in order
        cols = order[:, mask.shape[1] - width :]  # [N', width]
        self.cache = self.adapter.gather_cache(self.cache, live, cols)
        self.mask, self.valid = torch.gather(mask, 1, cols), self.valid[live]
        new_index = torch.full((n_old,), -1, dtype=torch.long, device=live.device)
        new_index[live] = torch.arange(live.numel(), device=live.device)
        for r in rows:
            r.streams = new_index[r.streams]
        self.stats.n_compactions += 1

    def forward(self, rows: list[_Row]) -> torch.Tensor:
        """One batched forward of every row's request; returns logits [N, L_max, V]."""
        n, device = self.mask.shape[0], self.mask.device
        longest = max(r.request.length for r in rows)
        dim = rows[0].request.embeds.shape[-1]
        embeds = torch.zeros(n, longest, dim, dtype=rows[0].request.embeds.dtype, device=device)
        new = self.mask.new_zeros(n, longest)
        width = self.mask.shape[1]
        for r in rows:
            length = r.request.length
            embeds[r.streams, :length] = r.request.embeds.to(device)
            new[r.streams, :length] = _attend(r.request, device)
            r.start, r.length = width, length
            self.stats.real_inputs += length
        self.stats.padded_inputs += len(rows) * longest - sum(r.length for r in rows)
        within = self._within(rows, new)  # [N, L, L] (draft trees) or None (every request causal)
        attended_before = new.cumsum(1) if within is None else within.sum(-1)
        positions = (self.valid[:, None] + attended_before - 1).clamp_min(0)
        old = self.mask
        self.mask = torch.cat([self.mask, new], dim=1)
        self.valid = self.valid + new.sum(1)
        attention = self.mask
        if within is not None:
            attention = torch.cat([old.bool()[:, None, :].expand(-1, longest, -1), within], dim=2)
        logits, self.cache = self.adapter.forward(embeds, self.cache, attention, position_ids=positions)
        self.stats.n_forwards += 1
        self.stats.max_width = max(self.stats.max_width, self.mask.shape[1])
        return logits


    @staticmethod
    def _within(rows: list[_Row], new: torch.Tensor) -> torch.Tensor | None:
        """Which new inputs each new input attends [N, L, L] when a row sends a draft tree, else None."""
        if all(r.request.tree is None for r in rows):
            return None
        longest = new.shape[1]
        within = torch.ones(longest, longest, dtype=torch.bool, device=new.device).tril()
        within = within.expand(new.shape[0], -1, -1).clone()
        for r in rows:
            if r.request.tree is not None:
                within[r.streams, : r.length, : r.length] = r.request.tree.to(new.device)
        return within & new.bool()[:, None, :]


def run_batched(adapter: Any, jobs: Iterable[tuple[Any, Steps]], batch_size: int,
                stats: BatchStats | None = None, hole_share: float = 0.5) -> Iterator[Finished]:
    """Drive up to ``batch_size`` decoder coroutines at once (module docstring); yields each row as it
    finishes (not in job order). ``jobs``: (key, an unstarted step coroutine), pulled lazily;
    ``hole_share``: compact the cache once masked entries exceed this share of it."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    pending = iter(jobs)
    shared = BatchedCache(adapter, hole_share)
    if stats is not None:
        shared.stats = stats
    t0 = time.perf_counter()
    rows: list[_Row] = []
    n_streams: int | None = None

    def start(streams: torch.Tensor | None) -> _Row | None:
        nonlocal n_streams
        try:
            key, steps = next(pending)
        except StopIteration:
            return None
        request = next(steps)
        s = int(request.embeds.shape[0])
        if n_streams is None:
            n_streams = s
        if s != n_streams:
            raise ValueError(f"every row of a batch needs the same number of streams; got {s} and {n_streams} "
                             "(all prompts of a batch share sampling.cfg_scale)")
        if streams is None:
            streams = shared.add_streams(s)
        else:
            shared.forget(streams)
        return _Row(key, steps, request, streams, time.perf_counter())

    while len(rows) < batch_size and (row := start(None)) is not None:
        rows.append(row)
    while rows:
        for r in rows:
            if r.request.drop or r.request.keep is not None:
                shared.drop(r, r.request)
        shared.tidy(rows)
        logits = shared.forward(rows)
        shared.stats.widths.append(shared.mask.shape[1])
        still: list[_Row] = []
        for r in rows:
            try:
                r.request = r.steps.send(logits[r.streams, : r.length])
                still.append(r)
            except StopIteration as stop:
                now = time.perf_counter()
                yield Finished(r.key, stop.value, now - r.joined, now - t0, batch_size)
                nxt = start(r.streams)
                if nxt is not None:
                    still.append(nxt)
        rows = still
