"""AR and SJD decoders: step counts, layout, cache exactness, greedy equality, losslessness, the API."""
from __future__ import annotations

import inspect
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare

import decode.window as window_module
from decode.api import DECODERS, generate, resolve_decoder
from decode.ar import ar_decode
from decode.sampling import SamplingConfig, final_probs, sample
from decode.sjd import sjd_decode
from decode.speculative import accept
from tests.conftest import RecomputeChecked

CONF = Path(__file__).resolve().parents[1] / "conf" / "decoder"
PROMPT = "a red circle left of a blue square"
SJD_OPTIONS = [
    {"init": "random", "jacobi_region": "image"},
    {"init": "spatial", "jacobi_region": "image"},
    {"init": "random", "jacobi_region": "all", "window": 5},
    {"init": "spatial", "jacobi_region": "all", "window": 7},
]
# Models the greedy proof runs on: a random micro model and the committed trained tiny model.
GREEDY_MODELS = ["tiny_random", "tiny_trained"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_result(res, layout) -> None:
    assert layout.violations(res.tokens) == []
    assert res.n_tokens == layout.n_tokens == res.tokens.numel()
    assert res.n_forwards == len(res.accepted_per_forward)
    assert all(n >= 1 for n in res.accepted_per_forward) and sum(res.accepted_per_forward) == res.n_tokens


# ---------------------------------------------------------------- AR


@pytest.mark.parametrize("cfg", [True, False])
def test_ar_spends_one_forward_per_token_and_respects_the_layout(tiny_random, cfg):
    checked = RecomputeChecked(tiny_random)
    res = ar_decode(checked, tiny_random.prompt(PROMPT, cfg=cfg), SamplingConfig(), gen(0))
    check_result(res, tiny_random.layout)
    assert res.n_forwards == checked.n_forwards == tiny_random.layout.n_tokens == 25


def test_ar_is_reproducible_and_seed_dependent(tiny_random):
    prefill = tiny_random.prompt(PROMPT)
    a, b, c = (ar_decode(tiny_random, prefill, SamplingConfig(), gen(s)).tokens for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- SJD mechanics


@pytest.mark.parametrize("options", SJD_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_sjd_cache_equals_full_recompute(tiny_random, options):
    """Every windowed forward (after rollbacks, both CFG streams) equals a forward without cache."""
    checked = RecomputeChecked(tiny_random)
    sampling = SamplingConfig(cfg_scale=3.0, temperature=1.0)
    res = sjd_decode(checked, tiny_random.prompt(PROMPT), sampling, gen(3), **options)
    check_result(res, tiny_random.layout)
    assert res.n_forwards == checked.n_forwards
    assert res.extra["n_drafts_accepted"] == res.n_tokens - res.n_forwards  # one non-draft token per forward


def test_window_one_is_ar_draw_for_draw(tiny_random):
    prefill = tiny_random.prompt(PROMPT)
    for seed in range(3):
        ar = ar_decode(tiny_random, prefill, SamplingConfig(), gen(seed))
        sjd = sjd_decode(tiny_random, prefill, SamplingConfig(), gen(seed), window=1)
        assert torch.equal(ar.tokens, sjd.tokens) and sjd.n_forwards == ar.n_forwards


@pytest.mark.parametrize("model", GREEDY_MODELS)
@pytest.mark.parametrize("options", SJD_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_greedy_sjd_equals_greedy_ar(request, model, options):
    adapter = request.getfixturevalue(model)
    greedy = SamplingConfig(top_k=1)
    for text in (PROMPT, "a blue square"):
        prefill = adapter.prompt(text)
        ar = ar_decode(adapter, prefill, greedy, gen(0))
        sjd = sjd_decode(adapter, prefill, greedy, gen(1), **options)
        assert sjd.tokens.tolist() == ar.tokens.tolist()
        assert sjd.n_forwards < ar.n_forwards, f"greedy SJD saved no forwards: {sjd.accepted_per_forward}"


def test_image_region_decodes_head_and_tail_autoregressively(tiny_random):
    layout = tiny_random.layout
    res = sjd_decode(tiny_random, tiny_random.prompt(PROMPT), SamplingConfig(top_k=1), gen(0), window=16)
    n_head = len(layout.head)
    assert res.accepted_per_forward[:n_head] == [1] * n_head  # prefill + AR head steps
    assert res.accepted_per_forward[-1] == 1  # the last tail token: an AR step
    assert max(res.accepted_per_forward) <= 16


@pytest.mark.parametrize("seed", range(4))
def test_sampled_sjd_respects_the_layout(tiny_random, seed):
    for options in SJD_OPTIONS:
        sampling = SamplingConfig(temperature=1.3, top_k=5, top_p=0.95)
        res = sjd_decode(tiny_random, tiny_random.prompt(PROMPT), sampling, gen(seed), **options)
        check_result(res, tiny_random.layout)
        assert res.extra["decoder"] == "sjd" and res.extra["window"] == options.get("window", 16)


def test_sjd_is_reproducible(tiny_random):
    prefill = tiny_random.prompt(PROMPT)
    a, b = (sjd_decode(tiny_random, prefill, SamplingConfig(), gen(5)) for _ in range(2))
    assert torch.equal(a.tokens, b.tokens) and a.accepted_per_forward == b.accepted_per_forward


@pytest.mark.parametrize(
    "kwargs, fix",
    [({"window": 0}, "window must be an integer >= 1"), ({"window": -3}, "window"), ({"window": 2.5}, "window"),
     ({"init": "zeros"}, "init must be one of"), ({"jacobi_region": "text"}, "jacobi_region must be one of")],
)
def test_bad_sjd_options(tiny_random, kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        sjd_decode(tiny_random, tiny_random.prompt(PROMPT), SamplingConfig(), gen(0), **kwargs)


# ---------------------------------------------------------------- losslessness on an enumerable toy


def exact_ar_distribution(adapter, prefill, sampling) -> dict[tuple[int, ...], float]:
    """Probability of every image sequence under AR sampling: the product of its p's (full recompute)."""
    layout = adapter.layout
    forced = layout.forced_ids(torch.arange(layout.n_tokens))
    free = (forced < 0).nonzero().flatten()
    n_streams, t_prompt = prefill.input_ids.shape
    out = {}
    for codes in itertools.product(range(layout.code_start, layout.code_stop), repeat=free.numel()):
        seq = forced.clone()
        seq[free] = torch.tensor(codes)
        ids = torch.cat([prefill.input_ids, seq.expand(n_streams, -1)], dim=1)
        mask = torch.cat([prefill.attention_mask, torch.ones(n_streams, layout.n_tokens, dtype=torch.long)], 1)
        logits, _ = adapter.forward(adapter.embed(ids), None, mask)
        p = final_probs(logits[:, t_prompt - 1 : -1], torch.arange(layout.n_tokens), layout, sampling)
        out[codes] = float(p[torch.arange(layout.n_tokens), seq].prod())
    return out


def chi_square_p_value(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> float:
    """Pearson chi-square of samples against exact probabilities; bins expected < 5 are pooled."""
    keys = list(exact)
    probs = np.array([exact[k] for k in keys])
    counts = np.zeros(len(keys))
    index = {k: i for i, k in enumerate(keys)}
    for s in samples:
        counts[index[s]] += 1
    expected = probs / probs.sum() * len(samples)
    big = expected >= 5
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        assert obs[-1] == 0, "a sequence of probability 0 was sampled"
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp).pvalue)


def sjd_samples(adapter, prefill, sampling, n: int, seed: int, **options) -> list[tuple[int, ...]]:
    layout = adapter.layout
    free = (layout.forced_ids(torch.arange(layout.n_tokens)) < 0).nonzero().flatten()
    g = gen(seed)
    out = []
    for _ in range(n):
        res = sjd_decode(adapter, prefill, sampling, g, **options)
        assert layout.violations(res.tokens) == []
        out.append(tuple(res.tokens[free].tolist()))
    return out


def broken_accept(p, q, drafts, generator):
    """Resampling from p instead of the residual (the bug of a derived SJD copy)."""
    n, token = accept(p, q, drafts, generator)
    return (n, token) if token is None else (n, int(sample(p[n][None], generator)[0]))


TOY_CASES = [  # the first one gives the distribution test the most power against the broken rule
    (SamplingConfig(cfg_scale=2.0, temperature=1.5, top_k=2), {"window": 3, "init": "spatial",
                                                                "jacobi_region": "image"}),
    (SamplingConfig(cfg_scale=2.0), {"window": 4, "init": "random", "jacobi_region": "all"}),
]
N_TOY = 600


@pytest.mark.parametrize("sampling, options", TOY_CASES, ids=["spatial-image-topk", "random-all"])
def test_sjd_is_lossless_on_an_enumerable_toy(toy_model, sampling, options):
    prefill = toy_model.prompt("a red circle")
    exact = exact_ar_distribution(toy_model, prefill, sampling)
    assert len(exact) == 81 and abs(sum(exact.values()) - 1) < 1e-5
    samples = sjd_samples(toy_model, prefill, sampling, N_TOY, seed=0, **options)
    assert chi_square_p_value(samples, exact) > 1e-3


def test_the_lossless_test_fails_for_resampling_from_p(toy_model, monkeypatch):
    sampling, options = TOY_CASES[0]
    prefill = toy_model.prompt("a red circle")
    exact = exact_ar_distribution(toy_model, prefill, sampling)
    monkeypatch.setattr(window_module, "accept", broken_accept)  # the one verification step (sjd and sjd2)
    samples = sjd_samples(toy_model, prefill, sampling, N_TOY, seed=0, **options)
    assert chi_square_p_value(samples, exact) < 1e-6


# ---------------------------------------------------------------- API


class PromptSpy:
    """Records the ``cfg`` flag the API asks the prompt with."""

    def __init__(self, inner):
        self.inner, self.cfg_flags = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prompt(self, text, cfg=True):
        self.cfg_flags.append(cfg)
        return self.inner.prompt(text, cfg=cfg)


def test_decoder_table_has_every_decoder():
    """Every decoder has its conf/decoder/<name>.yaml and every such name is a decoder."""
    names = {OmegaConf.load(p).get("name") for p in CONF.glob("*.yaml")} - {None}  # presets inherit a name
    assert set(DECODERS) == names and {"ar", "sjd", "sjd2", "scd", "gsd", "sjd_pac"} <= names


@pytest.mark.parametrize("name", ["ar", "sjd"])  # scd, gsd: tests/test_decoder_family.py
def test_decoder_yaml_fields_equal_kwargs(name):
    conf = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    conf.pop("defaults")  # the Hydra defaults list (its typed schema), not an option
    fn, options = resolve_decoder(conf)
    keyword = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert options == keyword  # same names, and the YAML shows the code defaults


def test_generate_dispatches_and_applies_the_cfg_rule(tiny_random):
    spy = PromptSpy(tiny_random)
    for cfg_scale, expected_flag in [(3.0, True), (1.0, False)]:
        sampling = SamplingConfig(cfg_scale=cfg_scale)
        ar = generate(spy, PROMPT, {"name": "ar"}, sampling, gen(0))
        direct = ar_decode(tiny_random, tiny_random.prompt(PROMPT, cfg=expected_flag), sampling, gen(0))
        assert torch.equal(ar.tokens, direct.tokens) and spy.cfg_flags[-1] is expected_flag
    res = generate(tiny_random, PROMPT, {"name": "sjd", "window": 4, "init": "spatial"}, SamplingConfig(), gen(0))
    assert res.extra["window"] == 4 and res.extra["init"] == "spatial"
    check_result(res, tiny_random.layout)


def test_generate_refuses_unknown_decoders_and_options(tiny_random):
    with pytest.raises(ValueError, match=r"unknown decoder 'beam'.*\['ar', .*'sjd2'.*\]"):
        generate(tiny_random, PROMPT, {"name": "beam"}, SamplingConfig(), gen(0))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\].*'window'"):
        generate(tiny_random, PROMPT, {"name": "sjd", "windw": 4}, SamplingConfig(), gen(0))
    with pytest.raises(ValueError, match="unknown option"):
        generate(tiny_random, PROMPT, {"name": "ar", "window": 4}, SamplingConfig(), gen(0))
