"""Exact batched decoding (decode/batch.py): every row of a batch decodes what it would decode alone.

Greedy and sampled tokens at B = 4 (with refill: more prompts than rows, different prompt lengths) equal
batch 1 for ar, sjd and sjd2 on tiny and on the tiny random Lumina-mGPT / Emu3 configs (CFG, left-padded
unconditional streams); the shared cache's compaction is exercised at both extremes; SJD stays lossless
at B = 3 on the enumerable toy; records of a batched run are what each row did.
"""
from __future__ import annotations

import pytest
import torch

from decode.ar import ar_steps
from decode.batch import BatchStats, run_batched, run_one
from decode.sampling import SamplingConfig
from decode.sjd import sjd_steps
from decode.sjd2 import sjd2_steps
from tests.test_ar_sjd import N_TOY, TOY_CASES, chi_square_p_value, exact_ar_distribution

GREEDY = SamplingConfig(cfg_scale=3.0, top_k=1)
SAMPLED = SamplingConfig(cfg_scale=3.0)
TEXTS = ["a red circle", "two blue squares left of a green triangle", "a square", "three circles",
         "a yellow triangle above a purple square", "four red triangles"]

DECODERS = {
    "ar": (ar_steps, {}),
    "sjd": (sjd_steps, {"window": 6}),
    "sjd2": (sjd2_steps, {"window": 6, "denoise_steps": 3, "accept_only_clean_inputs": True}),
    "sjd2_lossy": (sjd2_steps, {"window": 6, "denoise_steps": 3}),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def alone_and_batched(adapter, name, sampling, texts=TEXTS, batch_size=4, hole_share=0.5):
    steps, options = DECODERS[name]
    alone = [run_one(adapter, steps(adapter, adapter.prompt(t), sampling, gen(i), **options))
             for i, t in enumerate(texts)]
    stats = BatchStats()
    jobs = ((i, steps(adapter, adapter.prompt(t), sampling, gen(i), **options)) for i, t in enumerate(texts))
    done = list(run_batched(adapter, jobs, batch_size, stats, hole_share=hole_share))
    assert sorted(f.key for f in done) == list(range(len(texts)))  # every job once
    return alone, {f.key: f.result for f in done}, stats, done


def assert_rows_equal(alone, batched):
    for i, a in enumerate(alone):
        b = batched[i]
        assert torch.equal(a.tokens, b.tokens), f"row {i}: batched tokens differ from batch 1"
        assert a.n_forwards == b.n_forwards and a.accepted_per_forward == b.accepted_per_forward
        assert a.extra == b.extra


@pytest.mark.parametrize("name, sampling", [("ar", GREEDY), ("sjd", GREEDY), ("sjd2", GREEDY), ("sjd2_lossy", SAMPLED)],
                         ids=["ar-greedy", "sjd-greedy", "sjd2-greedy", "sjd2_lossy-sampled"])
def test_batch_of_four_equals_batch_one_on_tiny(tiny_trained, tiny_sjd2_trained, name, sampling):
    adapter = tiny_sjd2_trained if name.startswith("sjd2") else tiny_trained
    alone, batched, stats, done = alone_and_batched(adapter, name, sampling)
    assert_rows_equal(alone, batched)
    assert len({len(adapter.prompt_ids(t)) for t in TEXTS}) > 2  # prompts of different lengths
    assert stats.n_compactions > 0  # holes were compacted away (and streams dropped at the end)
    if name != "ar":  # continuous refill: job 4 joined while one of the first four was still decoding
        at = {f.key: f for f in done}
        joined = at[4].finished_at_s - at[4].in_batch_s
        assert joined < max(at[k].finished_at_s for k in range(4))


@pytest.mark.parametrize("hole_share", [0.0, 1.0], ids=["compact-every-forward", "never-compact"])
def test_compaction_does_not_change_rows(tiny_trained, hole_share):
    alone, batched, stats, _ = alone_and_batched(tiny_trained, "sjd", SAMPLED, hole_share=hole_share)
    assert_rows_equal(alone, batched)
    if hole_share == 1.0:  # only the end-of-queue stream drops compact
        assert stats.n_compactions <= 3
    else:
        assert stats.n_compactions > 50


def test_the_equality_test_can_fail(tiny_trained, monkeypatch):
    """Positions taken from the cache column (batch 1's rule) instead of the attended count break rows."""
    from decode import batch

    original = batch.BatchedCache.forward

    def column_positions(self, rows):
        self.valid = torch.full_like(self.valid, self.mask.shape[1])  # "position = column"
        return original(self, rows)

    monkeypatch.setattr(batch.BatchedCache, "forward", column_positions)
    alone, batched, _, _ = alone_and_batched(tiny_trained, "sjd", GREEDY)
    assert any(not torch.equal(a.tokens, batched[i].tokens) for i, a in enumerate(alone))


@pytest.fixture(scope="module")
def lumina64():
    from models.lumina_mgpt import LuminaMGPTConfig, RandomSizes, build_random
    from tests.hf_helpers import random_config

    return build_random(random_config(LuminaMGPTConfig, RandomSizes(), {"name": "lumina_b", "image_size": 64}))


@pytest.fixture(scope="module")
def emu64():
    from models.emu3 import Emu3Config, RandomSizes, build_random
    from tests.hf_helpers import random_config

    return build_random(random_config(Emu3Config, RandomSizes(), {"name": "emu3_b", "image_size": 64,
                                                                  "negative_prompt": "lowres, blurry."}))


@pytest.mark.parametrize("model", ["lumina64", "emu64"])
@pytest.mark.parametrize("name", ["ar", "sjd", "sjd2"])
def test_batch_of_four_equals_batch_one_on_real_classes(request, model, name):
    adapter = request.getfixturevalue(model)
    texts = TEXTS[:5]
    prefill = adapter.prompt(texts[1])
    assert prefill.input_ids.shape[0] == 2 and bool((prefill.attention_mask == 0).any())  # left-padded CFG row
    sampling = SamplingConfig(cfg_scale=3.0, top_k=1)
    alone, batched, _, _ = alone_and_batched(adapter, name, sampling, texts=texts)
    assert_rows_equal(alone, batched)


def test_sjd_is_lossless_at_batch_three(toy_model):
    """600 SJD samples drawn three rows at a time (rows finish at different forwards) follow exact AR."""
    sampling, options = TOY_CASES[0]
    prefill = toy_model.prompt("a red circle")
    exact = exact_ar_distribution(toy_model, prefill, sampling)
    layout = toy_model.layout
    free = (layout.forced_ids(torch.arange(layout.n_tokens)) < 0).nonzero().flatten()
    jobs = ((i, sjd_steps(toy_model, prefill, sampling, gen(1000 + i), **options)) for i in range(N_TOY))
    done = list(run_batched(toy_model, jobs, 3))
    assert len({f.result.n_forwards for f in done}) > 1  # rows of a batch finish at different times
    samples = [tuple(f.result.tokens[free].tolist()) for f in done]
    assert all(layout.violations(f.result.tokens) == [] for f in done)
    assert chi_square_p_value(samples, exact) > 1e-3


def test_bad_batches_are_refused(tiny_random):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        list(run_batched(tiny_random, [], 0))
    jobs = [(0, ar_steps(tiny_random, tiny_random.prompt("a", cfg=True), SAMPLED, gen(0))),
            (1, ar_steps(tiny_random, tiny_random.prompt("a", cfg=False), SamplingConfig(cfg_scale=1.0), gen(1)))]
    with pytest.raises(ValueError, match="same number of streams"):
        list(run_batched(tiny_random, jobs, 2))
