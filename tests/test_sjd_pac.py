"""SJD-PAC (decode/sjd_pac.py, decode/draft_tree.py): the tree layout, the tree forward against chain
forwards (batch 1 and batched, with the kept path moved in place), greedy == AR on tiny and the tiny random
Lumina-mGPT / Emu3 configs, losslessness on the enumerable toy (and a broken sibling test caught), batches
equal to batch 1, options and registration."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import decode.draft_tree as draft_tree_module
from decode.api import DECODERS, STEPS, generate, resolve_decoder
from decode.ar import ar_decode
from decode.batch import Forward, run_batched, run_one
from decode.draft_tree import draft_tree, n_tree_inputs
from decode.sampling import SamplingConfig, sample
from decode.sjd_pac import sjd_pac_decode, sjd_pac_steps
from decode.speculative import residual
from tests import test_batch
from tests.test_ar_sjd import chi_square_p_value, exact_ar_distribution
from tests.test_batch import emu64, lumina64  # noqa: F401 (module fixtures: the tiny random real classes)

CONF = Path(__file__).resolve().parents[1] / "conf" / "decoder"
PROMPT = "a red circle left of a blue square"
GREEDY = SamplingConfig(top_k=1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the tree


def test_tree_layout():
    tree = draft_tree(5, (3, 2))  # depth 1: 3 candidates, depth 2: 2 under each, depths 3..5 a chain
    assert tree.size == 1 + 5 + (3 - 1) + (6 - 1)
    assert tree.depth[:6] == (0, 1, 2, 3, 4, 5) and tree.parent[:6] == (-1, 0, 1, 2, 3, 4)  # main path first
    assert [tree.depth.count(d) for d in range(6)] == [1, 3, 6, 1, 1, 1]
    for i in range(tree.size):
        chain = [i]
        while tree.parent[chain[-1]] >= 0:
            chain.append(tree.parent[chain[-1]])
        assert tree.ancestors[i].nonzero().flatten().tolist() == sorted(chain)  # exactly its path
        assert [tree.slot[j] for j in tree.children[i]] == list(range(len(tree.children[i])))
    leaves = [i for i in range(tree.size) if not tree.children[i]]
    assert len(leaves) == 6 and max(tree.depth[i] for i in leaves) == 5
    assert n_tree_inputs(3, 3) == draft_tree(2, (3, 3)).size == 13 and n_tree_inputs(4, 3) == 21


# ---------------------------------------------------------------- tree forward == chain forwards


def leaf_paths(tree) -> list[list[int]]:
    out = []
    for leaf in (i for i in range(tree.size) if not tree.children[i]):
        path = [leaf]
        while tree.parent[path[-1]] > 0:
            path.append(tree.parent[path[-1]])
        out.append(path[::-1])
    return out


def tree_script(adapter, text: str, tree, tokens: torch.Tensor, path: list[int], after: int):
    """Prefill, the tree, then ``after`` fed with only the root + ``path`` kept; returns both logits."""
    prefill = adapter.prompt(text)
    ids = prefill.input_ids.to(adapter.device)
    yield Forward(adapter.embed(ids), mask=prefill.attention_mask.to(adapter.device))
    tree_logits = yield Forward(adapter.embed(tokens.expand(ids.shape[0], -1)), tree=tree.ancestors)
    next_logits = yield Forward(adapter.embed(torch.tensor([[after]]).expand(ids.shape[0], -1)),
                                keep=torch.tensor([0] + path))
    return tree_logits, next_logits


def chain_script(adapter, text: str, chain: torch.Tensor):
    prefill = adapter.prompt(text)
    ids = prefill.input_ids.to(adapter.device)
    yield Forward(adapter.embed(ids), mask=prefill.attention_mask.to(adapter.device))
    logits = yield Forward(adapter.embed(chain.expand(ids.shape[0], -1)))
    return logits


@pytest.mark.parametrize("model", ["tiny_random", "lumina64", "emu64"])
def test_tree_forward_equals_chain_forwards(request, model):
    """Every path's rows of one tree forward equal a chain forward of that path; after keeping an off-main
    path (its KV moved in place) the next input's logits equal the chain's, at batch 1 and batched."""
    adapter = request.getfixturevalue(model)
    lay = adapter.layout
    tree = draft_tree(5, (3, 2))
    g = gen(0)
    tokens = torch.randint(lay.code_start, lay.code_stop, (tree.size,), generator=g)
    paths = leaf_paths(tree)
    kept = paths[-1]  # the last leaf: off the main path from depth 1
    assert kept[0] > 5
    after = int(torch.randint(lay.code_start, lay.code_stop, (1,), generator=g))
    tree_logits, next_logits = run_one(adapter, tree_script(adapter, PROMPT, tree, tokens, kept, after))
    for path in paths:
        chain = run_one(adapter, chain_script(adapter, PROMPT, tokens[[0] + path]))
        torch.testing.assert_close(tree_logits[:, [0] + path], chain, atol=1e-4, rtol=1e-4)
    chain = run_one(adapter, chain_script(adapter, PROMPT, torch.cat([tokens[[0] + kept], torch.tensor([after])])))
    torch.testing.assert_close(next_logits[:, 0], chain[:, -1], atol=1e-4, rtol=1e-4)
    # batched: three rows with prompts of different lengths, each equal to its batch-1 run
    texts = [PROMPT, "a square", "a blue circle"]
    jobs = [(i, tree_script(adapter, t, tree, tokens, paths[i], after)) for i, t in enumerate(texts)]
    for done in run_batched(adapter, jobs, 3):
        alone = run_one(adapter, tree_script(adapter, texts[done.key], tree, tokens, paths[done.key], after))
        for got, want in zip(done.result, alone):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_sampled_decode_verifies_every_commit_against_the_causal_target(tiny_trained, monkeypatch):
    """A whole sampled decode (CFG 3) on the trained tiny model: the row each committed token was verified
    against (root + accepted path of every tree forward, after many kept-path compactions) equals the row a
    plain causal forward of the final sequence gives; side branches must be accepted for this to mean much."""
    import decode.sjd_pac as sjd_pac_module
    from decode.sampling import final_probs

    sampling, seen, rows = SamplingConfig(cfg_scale=3.0), [], {}

    def recording_probs(logits, positions, layout, s):
        rows["positions"], rows["p"] = positions, final_probs(logits, positions, layout, s)
        return rows["p"]

    def recording_verify(tree, p, q, tokens, generator):
        path, token = draft_tree_module.verify_tree(tree, p, q, tokens, generator)
        seen.append((rows["positions"][[0] + path], p[[0] + path], sum(tree.slot[i] > 0 for i in path)))
        return path, token

    monkeypatch.setattr(sjd_pac_module, "final_probs", recording_probs)
    monkeypatch.setattr(sjd_pac_module, "verify_tree", recording_verify)
    side = 0
    for seed, text in enumerate([PROMPT, "two yellow circles"]):
        seen.clear()
        prefill = tiny_trained.prompt(text)
        seq = sjd_pac_decode(tiny_trained, prefill, sampling, gen(seed)).tokens
        causal = run_one(tiny_trained, chain_script(tiny_trained, text, seq[:-1]))  # row j predicts seq[j + 1]
        want = final_probs(causal, torch.arange(1, len(seq)), tiny_trained.layout, sampling)
        for positions, p, n_side in seen:
            torch.testing.assert_close(p, want[positions - 1], atol=1e-4, rtol=0)
            side += n_side
        assert torch.cat([pos for pos, _, _ in seen]).tolist() == list(range(1, len(seq)))  # each commit once
    assert side >= 5  # siblings off the main path were committed (their KV moved in place)


# ---------------------------------------------------------------- greedy == AR

OPTIONS = [
    {"window": 64, "tree_width": 3, "tree_depth": 3},
    {"window": 24, "tree_width": 4, "tree_depth": 3},
    {"window": 20, "tree_width": 2, "tree_depth": 4, "continuation": False, "jacobi_region": "all"},
]


@pytest.mark.parametrize("model", ["tiny_random", "tiny_trained", "lumina64", "emu64"])
def test_greedy_sjd_pac_equals_greedy_ar(request, model):
    adapter = request.getfixturevalue(model)
    tiny = model.startswith("tiny")
    for text in (PROMPT, "a blue square") if tiny else (PROMPT,):
        prefill = adapter.prompt(text)
        ar = ar_decode(adapter, prefill, GREEDY, gen(0))
        for options in OPTIONS if tiny else OPTIONS[1:]:
            res = sjd_pac_decode(adapter, prefill, GREEDY, gen(1), **options)
            assert res.tokens.tolist() == ar.tokens.tolist(), options
            assert sum(res.accepted_per_forward) == res.n_tokens and min(res.accepted_per_forward) >= 1
            if tiny:
                assert res.n_forwards < ar.n_forwards, f"greedy SJD-PAC saved no forwards: {res.accepted_per_forward}"


def test_sampled_sjd_pac_respects_the_layout_and_is_reproducible(tiny_random):
    sampling = SamplingConfig(temperature=1.3, top_k=5, top_p=0.95)
    for seed in range(3):
        for options in OPTIONS:
            a, b = (sjd_pac_decode(tiny_random, tiny_random.prompt(PROMPT), sampling, gen(seed), **options)
                    for _ in range(2))
            assert tiny_random.layout.violations(a.tokens) == []
            assert torch.equal(a.tokens, b.tokens) and a.accepted_per_forward == b.accepted_per_forward


# ---------------------------------------------------------------- losslessness on the enumerable toy

N_TOY = 600
TOY_CASES = [  # the first: every tree depth holds every code (no residual commits), the sibling test's power
    (SamplingConfig(cfg_scale=2.0, temperature=0.5), {"window": 40, "tree_width": 3, "tree_depth": 4,
                                                       "jacobi_region": "all"}),
    (SamplingConfig(cfg_scale=2.0, temperature=1.5, top_k=2), {"window": 16, "tree_width": 3, "tree_depth": 3,
                                                                "jacobi_region": "image"}),
    (SamplingConfig(cfg_scale=2.0, temperature=0.7), {"window": 7, "tree_width": 2, "tree_depth": 3,
                                                       "jacobi_region": "all", "continuation": False}),
]


def pac_samples(adapter, prefill, sampling, n: int, seed: int, **options) -> list[tuple[int, ...]]:
    layout = adapter.layout
    free = (layout.forced_ids(torch.arange(layout.n_tokens)) < 0).nonzero().flatten()
    g, out = gen(seed), []
    for _ in range(n):
        res = sjd_pac_decode(adapter, prefill, sampling, g, **options)
        assert layout.violations(res.tokens) == []
        out.append(tuple(res.tokens[free].tolist()))
    return out


@pytest.mark.parametrize("sampling, options", TOY_CASES, ids=["full-support-trees", "topk-image", "k2-no-ac"])
def test_sjd_pac_is_lossless_on_an_enumerable_toy(toy_model, sampling, options):
    prefill = toy_model.prompt("a red circle")
    exact = exact_ar_distribution(toy_model, prefill, sampling)
    samples = pac_samples(toy_model, prefill, sampling, N_TOY, seed=0, **options)
    assert chi_square_p_value(samples, exact) > 1e-3


def siblings_against_p(p, q, drafts, generator):
    """Broken: every sibling tested against p, not against the residual its earlier siblings leave."""
    target = p
    for i, x in enumerate(drafts):
        r = float(torch.rand(1, generator=generator))
        if float(q[x]) > 0 and r < float(target[x]) / float(q[x]):
            return i, torch.tensor([x])
        p = residual(p, q)
        q = q.clone()
        q[x] = 0.0
        q = q / q.sum()
    return None, sample(p[None], generator)


def test_the_lossless_test_fails_for_siblings_tested_against_p(toy_model, monkeypatch):
    sampling, options = TOY_CASES[0]
    prefill = toy_model.prompt("a red circle")
    exact = exact_ar_distribution(toy_model, prefill, sampling)
    monkeypatch.setattr(draft_tree_module, "accept_siblings", siblings_against_p)
    samples = pac_samples(toy_model, prefill, sampling, N_TOY, seed=0, **options)
    assert chi_square_p_value(samples, exact) < 1e-6


def test_sjd_pac_is_lossless_at_batch_three(toy_model):
    sampling, options = TOY_CASES[1]
    prefill = toy_model.prompt("a red circle")
    exact = exact_ar_distribution(toy_model, prefill, sampling)
    layout = toy_model.layout
    free = (layout.forced_ids(torch.arange(layout.n_tokens)) < 0).nonzero().flatten()
    jobs = ((i, sjd_pac_steps(toy_model, prefill, sampling, gen(1000 + i), **options)) for i in range(N_TOY))
    done = list(run_batched(toy_model, jobs, 3))
    assert len({f.result.n_forwards for f in done}) > 1  # rows of a batch finish at different times
    assert chi_square_p_value([tuple(f.result.tokens[free].tolist()) for f in done], exact) > 1e-3


# ---------------------------------------------------------------- batches equal batch 1


@pytest.mark.parametrize("model, sampling", [
    pytest.param("tiny_trained", test_batch.GREEDY, id="tiny-greedy"),
    pytest.param("tiny_trained", test_batch.SAMPLED, id="tiny-sampled"),
    pytest.param("lumina64", test_batch.GREEDY, id="lumina-greedy"),
    pytest.param("emu64", test_batch.GREEDY, id="emu3-greedy", marks=pytest.mark.slow),  # ~25 s; trees on
])  # Emu3 are batched in test_tree_forward_equals_chain_forwards too
def test_batch_of_four_equals_batch_one(request, monkeypatch, model, sampling):
    adapter = request.getfixturevalue(model)
    monkeypatch.setitem(test_batch.DECODERS, "sjd_pac", (sjd_pac_steps, {"window": 24, "tree_width": 3}))
    texts = test_batch.TEXTS if model == "tiny_trained" else test_batch.TEXTS[:3]
    alone, batched, stats, _ = test_batch.alone_and_batched(adapter, "sjd_pac", sampling, texts=texts)
    test_batch.assert_rows_equal(alone, batched)
    assert stats.n_compactions > 0


# ---------------------------------------------------------------- options and registration


@pytest.mark.parametrize("kwargs, fix", [
    ({"tree_width": 0}, "tree_width must be an integer >= 1"), ({"tree_depth": 1.5}, "tree_depth"),
    ({"window": 12}, r"window=12 cannot hold the tree .* \(13 inputs\)"),
    ({"window": 20, "tree_width": 4}, r"\(21 inputs\)"), ({"jacobi_region": "text"}, "jacobi_region must be one of"),
])
def test_bad_sjd_pac_options(tiny_random, kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        sjd_pac_decode(tiny_random, tiny_random.prompt(PROMPT), SamplingConfig(), gen(0), **kwargs)


def test_registered_and_yaml_shows_the_code_defaults(tiny_random):
    assert "sjd_pac" in DECODERS and "sjd_pac" in STEPS
    conf = OmegaConf.to_container(OmegaConf.load(CONF / "sjd_pac.yaml"))
    conf.pop("defaults")
    fn, options = resolve_decoder(conf)
    keyword = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert options == keyword
    res = generate(tiny_random, PROMPT, {"name": "sjd_pac", "window": 16, "tree_width": 2}, SamplingConfig(), gen(0))
    assert res.extra["decoder"] == "sjd_pac" and res.extra["tree_width"] == 2
    for preset, width in [("sjd_pac_lumina_mgpt", 3), ("sjd_pac_emu3", 3), ("sjd_pac_k4", 4)]:
        merged = OmegaConf.merge(OmegaConf.load(CONF / "sjd_pac.yaml"), OmegaConf.load(CONF / f"{preset}.yaml"))
        assert (merged.window, merged.tree_width, merged.tree_depth) == (64, width, 3)
