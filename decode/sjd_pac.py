"""SJD-PAC: SJD with proactive drafting and adaptive continuation (Kang et al., CVPR 2026, arXiv 2603.18599;
code ``KangJialiang/SJD-PAC``, ``scheduler/sjd_pac_iteration_lumina_mgpt.py``). Exact and training-free.

One iteration feeds a draft tree (:mod:`decode.draft_tree`) in one forward with both CFG streams:

1. *proactive drafting*: the root is the newest committed token (the one a rejection just resampled);
   the next ``tree_depth - 1`` positions hold ``tree_width`` candidates each, drawn without replacement
   from their draft distribution q, every candidate under every node of the depth before (a K-ary tree,
   attention mask = ancestors, position = the root's + depth); the first-candidate path goes on as a
   chain until the tree fills ``window`` inputs;
2. the tree is verified by recursive rejection sampling without replacement, the first passing child
   of each node taken (:func:`decode.draft_tree.verify_tree`); the accepted path and one more token (the
   last residual's or the bonus) are committed, and the accepted inputs' KV is kept (moved in place when
   the path leaves the main path), the rest dropped;
3. *adaptive continuation*: every position after the committed token keeps its old draft (candidate 0)
   if it passes the test against its stale target (the row of the stale path: first children below the
   stop, then the main path), else is redrawn from ``normalize(max(0, p_stale - q))`` -- the maximal
   coupling, so the new draft follows p_stale, which becomes its q; the position after the last draft
   gets a fresh sample of its stale row. New tail slots draw a uniform image code with uniform q (forced
   layout positions: their id, one-hot q). ``continuation=false`` drafts every position with a fresh
   sample of its stale row, as SJD does (the ablation without AC).

Where our code differs from the reference code, on purpose (each keeps the output distribution exact;
tests/test_sjd_pac.py checks it against exact AR): the reference commits the *longest* accepted path among
all siblings, which favours siblings whose subtrees pass more often (a biased choice); we commit the
path of the first passing sibling at each depth. Its extra siblings come from the residual of the stale
test, while its verification assumes them drawn without replacement from q; ours are drawn that way.
Its sibling candidates are read from a ``[K, L]`` table with stride ``M`` != ``L`` (``from_tree_ids``);
ours are the candidates of their own depth.
"""
from __future__ import annotations

import torch

from decode.batch import Forward, Steps, run_one
from decode.draft_tree import draft_tree, extra_candidates, n_tree_inputs, stale_targets, verify_tree
from decode.result import DecodeResult
from decode.sampling import SamplingConfig, final_probs, forced_table, sample
from decode.speculative import RESIDUAL_EPS
from decode.window import REGIONS, check_window, jacobi_span, n_window_drafts, open_sequence
from models.base import ImageLayout, ModelAdapter, Prefill


def validate_options(window: int, tree_width: int, tree_depth: int, jacobi_region: str) -> None:
    """Clear errors for impossible SJD-PAC settings."""
    for name, value in (("tree_width", tree_width), ("tree_depth", tree_depth)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"decoder.{name} must be an integer >= 1 (1 = no branching; the paper uses 3 or 4), "
                             f"got {value!r}")
    check_window(window, "inputs per forward, the tree included; the SJD-PAC code uses 64")
    need = n_tree_inputs(tree_width, tree_depth)
    if window < need:
        raise ValueError(f"decoder.window={window} cannot hold the tree of tree_width={tree_width}, "
                         f"tree_depth={tree_depth} ({need} inputs); raise decoder.window or shrink the tree")
    if jacobi_region not in REGIONS:
        raise ValueError(f"decoder.jacobi_region must be one of {list(REGIONS)}, got {jacobi_region!r}")


def new_slots(layout: ImageLayout, start: int, stop: int, vocab_size: int, generator: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts [n] and their q [n, V] for new tail positions [start, stop): a uniform image code with uniform
    q over the codes, or the forced id with one-hot q."""
    n = stop - start
    forced, is_forced = forced_table(layout, device)
    codes = torch.randint(layout.code_start, layout.code_stop, (n,), generator=generator, device=generator.device)
    drafts = torch.where(is_forced[start:stop], forced[start:stop], codes.to(device))
    q = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
    q[:, layout.code_start : layout.code_stop] = 1.0 / layout.n_codes
    rows = is_forced[start:stop]
    q[rows] = 0.0
    q[rows, drafts[rows]] = 1.0
    return drafts, q


def couple_rows(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Maximal coupling of old drafts with new targets, per row: keep ``drafts`` [m] (drawn from q [m, V])
    where ``r < p(d) / q(d)``, else a draw from ``normalize(max(0, p - q))``. Returns (the tokens [m],
    which ones were kept [m] bool); either way each token follows its row of p."""
    index = drafts[:, None]
    p_d, q_d = p.gather(1, index)[:, 0], q.gather(1, index)[:, 0]
    r = torch.rand(drafts.numel(), generator=generator, device=generator.device).to(p.device)
    kept = (q_d > 0) & (r * q_d < p_d)
    res = (p - q).clamp_min(0.0)
    mass = res.sum(1, keepdim=True)
    res = torch.where(mass > RESIDUAL_EPS, res / mass.clamp_min(1e-30), p)  # no residual mass: p (== q)
    return torch.where(kept, drafts, sample(res, generator)), kept


@torch.no_grad()
def sjd_pac_steps(
    adapter: ModelAdapter,
    prefill: Prefill,
    sampling: SamplingConfig,
    generator: torch.Generator,
    *,
    window: int = 64,
    tree_width: int = 3,
    tree_depth: int = 3,
    continuation: bool = True,
    jacobi_region: str = "image",
) -> Steps:
    """The SJD-PAC step coroutine (:mod:`decode.batch`); options as :func:`sjd_pac_decode`."""
    validate_options(window, tree_width, tree_depth, jacobi_region)
    layout, vocab_size = adapter.layout, adapter.vocab_size
    n_tokens, span = layout.n_tokens, jacobi_span(layout, jacobi_region)
    path_window = window - n_tree_inputs(tree_width, tree_depth) + tree_depth  # main-path inputs, root incl.

    seq, n_streams = yield from open_sequence(adapter, prefill, sampling, generator)
    device = seq.device
    n_committed, per_forward = 1, [1]
    drafts = torch.zeros(0, dtype=torch.long, device=device)  # candidate 0 of positions n_committed, ...
    q = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)  # [len(drafts), V]
    keep: torch.Tensor | None = None  # inputs of the last request whose KV stays
    stats = {"n_sibling_accepts": 0, "n_continuation_tests": 0, "n_continuation_kept": 0, "n_inputs": 0}

    while n_committed < n_tokens:
        k = n_window_drafts(n_committed, path_window, span, n_tokens)
        drafts, q = drafts[:k], q[:k]
        if drafts.numel() < k:  # new tail slots
            fresh, fresh_q = new_slots(layout, n_committed + drafts.numel(), n_committed + k, vocab_size,
                                       generator, device)
            drafts, q = torch.cat([drafts, fresh]), torch.cat([q, fresh_q])
        # 1. the tree: candidates of the branching depths, then the inputs
        t = min(tree_depth - 1, k)
        support = (q[:t] > 0).sum(1).tolist()
        branching = tuple(min(tree_width, int(s)) for s in support)
        candidates = [[x] for x in drafts.tolist()]
        for d, b in enumerate(branching):
            if b > 1:
                candidates[d] += extra_candidates(q[d], drafts[d], b - 1, generator).tolist()
        tree = draft_tree(k, branching)
        root = int(seq[n_committed - 1])
        tokens = [root] + [candidates[tree.depth[i] - 1][tree.slot[i]] for i in range(1, tree.size)]
        inputs = torch.tensor(tokens, dtype=torch.long, device=device)
        logits = yield Forward(adapter.embed(inputs.expand(n_streams, -1)), keep=keep,
                               tree=tree.ancestors if tree.size > 1 else None)
        depth = torch.tensor(tree.depth, device=device)
        p = final_probs(logits, n_committed + depth, layout, sampling)  # [L, V], row i: its children's target
        # 2. verification
        path, token = verify_tree(tree, p, q, tokens, generator)
        n_acc = len(path)
        seq[n_committed : n_committed + n_acc] = inputs[path]
        seq[n_committed + n_acc] = token[0]
        stats["n_sibling_accepts"] += sum(tree.slot[i] > 0 for i in path)
        stats["n_inputs"] += tree.size
        keep = torch.tensor([0] + path, dtype=torch.long)
        # 3. continuation: the positions after the committed token, against their stale targets
        stale = stale_targets(tree, path[-1] if path else 0, k)  # rows for depths n_acc + 2 .. k + 1
        q_next = p[stale]
        old = drafts[n_acc + 1 :]  # candidate 0 of depths n_acc + 2 .. k
        if continuation and old.numel():
            coupled, kept = couple_rows(q_next[: old.numel()], q[n_acc + 1 :], old, generator)
            stats["n_continuation_tests"] += old.numel()
            stats["n_continuation_kept"] += int(kept.sum())
            drafts = torch.cat([coupled, sample(q_next[old.numel() :], generator)])
        else:
            drafts = sample(q_next, generator)
        q = q_next
        n_committed += n_acc + 1
        per_forward.append(n_acc + 1)

    n_windows = max(1, len(per_forward) - 1)
    extra = {"decoder": "sjd_pac", "window": window, "tree_width": tree_width, "tree_depth": tree_depth,
             "continuation": continuation, "jacobi_region": jacobi_region,
             "mean_inputs_per_forward": stats.pop("n_inputs") / n_windows, **stats}
    return DecodeResult(tokens=seq.cpu(), n_forwards=len(per_forward), n_tokens=n_tokens,
                        accepted_per_forward=per_forward, extra=extra)


@torch.no_grad()
def sjd_pac_decode(
    adapter: ModelAdapter,
    prefill: Prefill,
    sampling: SamplingConfig,
    generator: torch.Generator,
    *,
    window: int = 64,
    tree_width: int = 3,
    tree_depth: int = 3,
    continuation: bool = True,
    jacobi_region: str = "image",
) -> DecodeResult:
    """Decode the image sequence with SJD-PAC; same output distribution as :func:`decode.ar.ar_decode`.

    window: inputs per forward, root and tree included (the code's ``max_num_new_tokens``; 64).
    tree_width: K, candidates per branching depth (code default 3; the README names 4).
    tree_depth: D, levels of the tree, root included (D - 1 branching depths; 3 in both); 1 = no tree.
    continuation: adaptive continuation (true) or SJD's fresh samples of the stale rows (false).
    jacobi_region: ``"image"`` (code rows incl. EOLs; AR for head/tail) | ``"all"``.
    """
    return run_one(adapter, sjd_pac_steps(adapter, prefill, sampling, generator, window=window,
                                          tree_width=tree_width, tree_depth=tree_depth,
                                          continuation=continuation, jacobi_region=jacobi_region))
