"""Draft trees for SJD-PAC (:mod:`decode.sjd_pac`): the layout of one window and its verification.

Letters as in :mod:`decode.speculative`: ``p`` the target, ``q`` the draft distribution.

**Layout.** A window is a tree of model inputs. Input 0 is the *root*, the newest committed token; every
other input is a *node* holding a draft for the position ``depth`` after the root. Depths ``1..t`` branch:
depth d holds ``b_d`` candidates ``C_d[0..b_d-1]`` (drawn without replacement from ``q_d``), and every node
at depth d-1 has one child per candidate, so the node of an index tuple ``(i_1..i_d)`` holds ``C_d[i_d]``.
Depths ``t+1..k`` are a chain under the *main path* (the all-zero tuple), each holding one draft. Inputs
are ordered main path first (input j is the main node of depth j), then the other tree nodes by depth.

**Verification** (:func:`verify_tree`) walks down from the root. At a node it tests its children in
candidate order by recursive rejection sampling without replacement (:func:`accept_siblings`): candidate
i passes iff ``r < p_i(x_i) / q_i(x_i)``, where ``p_1 = p`` (the node's output row), ``q_1 = q_d``, and
after a rejection ``p_{i+1} = normalize(max(0, p_i - q_i))`` and ``q_{i+1}`` is ``q_i`` with ``x_i``
removed and renormalised (what ``x_{i+1}`` was drawn from). The first child that passes is committed and
the walk goes on from it; when none passes, a token drawn from the last residual is committed; a node
without children (the end of the path) commits a token drawn from its own row (the bonus). Each tested
node draws one uniform, and a node is tested at most once. The emitted token at every depth then follows
p exactly, as in SpecInfer's multi-step speculative sampling (Miao et al. 2024).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from decode.sampling import sample
from decode.speculative import residual


@dataclass(frozen=True)
class DraftTree:
    """One window's tree (module docstring). Per input: ``parent`` (-1 for the root), ``depth`` (0 for
    the root), ``slot`` (its candidate index at its depth; 0 on the main path); ``children`` per input in
    candidate order; ``ancestors`` [L, L] bool, row i = the inputs input i attends (itself included)."""

    parent: tuple[int, ...]
    depth: tuple[int, ...]
    slot: tuple[int, ...]
    children: tuple[tuple[int, ...], ...]
    ancestors: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.parent)


def n_tree_inputs(width: int, depth: int) -> int:
    """Inputs of the full K-ary tree of ``depth`` levels, root included: 1 + K + ... + K^(depth-1)."""
    return sum(width**d for d in range(depth))


@functools.lru_cache(maxsize=512)
def draft_tree(k: int, branching: tuple[int, ...]) -> DraftTree:
    """The tree of ``k`` drafted positions whose first ``len(branching)`` depths have ``branching[d-1]``
    candidates each (the rest: one, a chain under the main path). Cached: windows repeat shapes."""
    t = len(branching)
    if t > k or any(b < 1 for b in branching):
        raise ValueError(f"impossible draft tree: {k} positions, branching {branching}")
    parent, depth, slot = [-1] + list(range(k)), list(range(k + 1)), [0] * (k + 1)  # root, main path
    index = {(0,) * d: d for d in range(t + 1)}  # index tuple -> input
    for d in range(1, t + 1):
        for tup in itertools.product(*(range(b) for b in branching[:d])):
            if tup in index:
                continue
            index[tup] = len(parent)
            parent.append(index[tup[:-1]])
            depth.append(d)
            slot.append(tup[-1])
    children: list[list[int]] = [[] for _ in parent]
    for i, par in enumerate(parent):
        if par >= 0:
            children[par].append(i)
    ancestors = torch.zeros(len(parent), len(parent), dtype=torch.bool)
    for i, par in enumerate(parent):  # parents come before their children
        if par >= 0:
            ancestors[i] = ancestors[par]
        ancestors[i, i] = True
    return DraftTree(tuple(parent), tuple(depth), tuple(slot),
                     tuple(tuple(sorted(c, key=lambda j: slot[j])) for c in children), ancestors)


def extra_candidates(q: torch.Tensor, first: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` more candidates for a depth whose candidate 0 is ``first``: drawn from ``q`` [V] without
    replacement and without ``first`` (exponential races: the n largest ``q / Exp(1)``, in order)."""
    keys = q / torch.empty_like(q).exponential_(1, generator=generator)
    keys[first] = -1.0
    keys = keys.masked_fill(q <= 0, -1.0)
    return torch.topk(keys, n).indices


def accept_siblings(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], generator: torch.Generator
) -> tuple[int | None, torch.Tensor]:
    """Recursive rejection sampling without replacement (module docstring) over ``drafts``, drawn in
    order without replacement from ``q`` [V], against the target ``p`` [V]. Returns (the index of the
    first draft that passes, its token [1]) or (None, the token [1] drawn from the last residual)."""
    for i, x in enumerate(drafts):
        r = float(torch.rand(1, generator=generator, device=generator.device))
        q_x, p_x = float(q[x]), float(p[x])
        if q_x > 0 and r < p_x / q_x:
            return i, torch.tensor([x], device=p.device)
        p = residual(p, q)
        q = q.clone()
        q[x] = 0.0
        q = q / q.sum().clamp_min(1e-30)
    return None, sample(p[None], generator)


def verify_tree(
    tree: DraftTree, p: torch.Tensor, q: torch.Tensor, tokens: list[int], generator: torch.Generator
) -> tuple[list[int], torch.Tensor]:
    """Walk the tree (module docstring). p: [L, V] one target row per input (the distribution of its
    children's position); q: [k, V] the draft distribution of each depth 1..k; tokens: the input ids.
    Returns (the accepted inputs from depth 1 down, the committed token after them [1])."""
    node, path = 0, []
    while tree.children[node]:
        kids = tree.children[node]
        picked, token = accept_siblings(p[node], q[tree.depth[node]], [tokens[j] for j in kids], generator)
        if picked is None:
            return path, token
        node = kids[picked]
        path.append(node)
    return path, sample(p[node][None], generator)


def stale_targets(tree: DraftTree, stop: int, k: int) -> list[int]:
    """The inputs whose rows serve as the stale targets of the positions after a walk that stopped below
    input ``stop``: from depth ``depth(stop) + 1`` to ``k``, first children down from ``stop``, then the main
    path where a node has none. Their rows are the targets of depths ``depth(stop) + 2 .. k + 1``."""
    out, node = [], stop
    for d in range(tree.depth[stop] + 1, k + 1):
        kids = tree.children[node]
        node = kids[0] if kids else d  # input d is the main path's node of depth d
        out.append(node)
    return out

