"""SJD2 decoder (decode/sjd2.py) on micro models: exactness of the clean-only variant, layout, bookkeeping."""
from __future__ import annotations

import inspect
import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare

from decode.api import resolve_decoder
from decode.ar import ar_decode
from decode.sampling import SamplingConfig, final_probs
from decode.sjd2 import sjd2_decode
from models.noisy import NoiseConfig, Sjd2Recipe
from models.tiny import build
from tests.conftest import RecomputeChecked, micro_config, reinit

GREEDY = SamplingConfig(cfg_scale=3.0, top_k=1)
SAMPLED = SamplingConfig(cfg_scale=3.0, temperature=1.0)
CONF = Path(__file__).resolve().parents[1] / "conf" / "decoder" / "sjd2.yaml"


@pytest.fixture(scope="module")
def adapter():
    """4x4 codes + EOLs (25 tokens), 8 codes, re-drawn weights: peaked, context-dependent predictions,
    so a noisy input in the conditioning visibly changes them (the 0.02 init hardly uses context)."""
    return reinit(build(micro_config(n_codes=8), seed=0, image_size=16))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class KVChecked(RecomputeChecked):
    """:class:`RecomputeChecked` (cached forward == full recompute) that also records, per forward,
    the inputs whose KV the cache holds, to check they are the clean embeddings of committed tokens."""

    def __init__(self, inner):
        super().__init__(inner)
        self.cached_inputs: list[torch.Tensor] = []

    def forward(self, inputs_embeds, cache, attention_mask):
        if cache is not None:
            self.cached_inputs.append(cache[1][0].clone())  # [T, D] stream 0
        return super().forward(inputs_embeds, cache, attention_mask)

    def embedding_stats(self):
        return self.inner.embedding_stats()

    @property
    def reserved_ids(self):
        return self.inner.reserved_ids

    def trained_recipe(self):
        return self.inner.trained_recipe()


def check_bookkeeping(res, layout):
    assert layout.violations(res.tokens) == []
    assert res.tokens.shape == (layout.n_tokens,)
    assert all(n >= 1 for n in res.accepted_per_forward)
    assert sum(res.accepted_per_forward) == res.n_tokens == layout.n_tokens
    assert res.n_forwards == len(res.accepted_per_forward)
    x = res.extra
    assert sum(x["accepted_by_slot"]) == sum(x["accepted_by_level"]) == x["n_drafts_accepted"]
    assert x["n_drafts_accepted"] == sum(res.accepted_per_forward) - res.n_forwards  # one non-draft per forward
    assert x["n_drafts_accepted"] <= x["n_drafts_tested"]
    # every forward after the prefill fed the re-fed tokens, the newest committed token and its slots
    n_steps = res.n_forwards - 1
    assert x["mean_inputs_per_forward"] * n_steps == pytest.approx(x["n_refed_tokens"] + n_steps
                                                                   + sum(x["present_by_slot"]))
    assert all(a <= n for a, n in zip(x["accepted_by_slot"], x["present_by_slot"]))


CLEAN_ONLY_OPTIONS = [
    {"window": 4},
    {"window": 8, "init_levels": "max"},
    {"window": 30, "denoise_steps": 3, "x0": "expectation", "jacobi_region": "all"},
    {"window": 6, "denoise_steps": 2, "draft_q": "one_hot", "init_latent": "pure_noise", "spacing": "uniform"},
    {"window": 12, "denoise_steps": 4, "schedule": "cosine", "timestep_signal": "none"},
]


@pytest.mark.parametrize("options", CLEAN_ONLY_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_clean_only_greedy_equals_greedy_ar(adapter, options):
    prefill = adapter.prompt("a", cfg=True)
    ar = ar_decode(adapter, prefill, GREEDY, gen(0))
    res = sjd2_decode(adapter, prefill, GREEDY, gen(1), accept_only_clean_inputs=True, **options)
    assert res.tokens.tolist() == ar.tokens.tolist()
    check_bookkeeping(res, adapter.layout)
    assert res.extra["n_noisy_accepted"] == 0


def test_clean_only_accepts_drafts_and_saves_forwards_on_a_predictable_model():
    """A model whose argmax ignores the context (huge LM-head bias on one code) lets Jacobi converge:
    the exactness test above then also covers accepted clean drafts, not only resampled tokens."""
    adapter = build(micro_config(n_codes=8), seed=3, image_size=16)
    bias = torch.zeros(adapter.vocab_size)
    bias[adapter.layout.code_start + 2] = 50.0
    adapter.lm_head.bias = torch.nn.Parameter(bias)
    prefill = adapter.prompt("a", cfg=False)
    ar = ar_decode(adapter, prefill, SamplingConfig(cfg_scale=1.0, top_k=1), gen(0))
    res = sjd2_decode(adapter, prefill, SamplingConfig(cfg_scale=1.0, top_k=1), gen(0),
                      accept_only_clean_inputs=True, window=8, denoise_steps=2)
    assert res.tokens.tolist() == ar.tokens.tolist()
    assert res.extra["n_drafts_accepted"] > 0 and res.n_forwards < ar.n_forwards
    check_bookkeeping(res, adapter.layout)
    # the default variant accepts noisy-input slots too: it needs even fewer forwards here
    lossy = sjd2_decode(adapter, prefill, SamplingConfig(cfg_scale=1.0, top_k=1), gen(0), window=8,
                        denoise_steps=2)
    assert lossy.extra["n_noisy_accepted"] > 0 and lossy.n_forwards <= res.n_forwards
    assert lossy.extra["n_refed_tokens"] > 0  # accepted noisy inputs are fed again, clean
    check_bookkeeping(lossy, adapter.layout)


def test_window_one_is_plain_ar_draw_for_draw(adapter):
    prefill = adapter.prompt("a", cfg=True)
    for seed in range(3):
        ar = ar_decode(adapter, prefill, SAMPLED, gen(seed))
        res = sjd2_decode(adapter, prefill, SAMPLED, gen(seed), window=1)
        assert res.tokens.tolist() == ar.tokens.tolist() and res.n_forwards == ar.n_forwards


DEFAULT_OPTIONS = [
    {},  # the paper's setting: window 96 (> the whole 25-token sequence), 25 levels
    {"window": 5, "denoise_steps": 3},
    {"window": 10, "denoise_steps": 6, "init_levels": "max", "x0": "expectation"},
    {"window": 7, "denoise_steps": 4, "jacobi_region": "all", "draft_q": "one_hot", "schedule": "cosine"},
]


@pytest.mark.parametrize("options", DEFAULT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_default_variant_finishes_and_respects_the_layout(adapter, options):
    prefill = adapter.prompt("a", cfg=True)
    for seed in range(2):
        res = sjd2_decode(adapter, prefill, SAMPLED, gen(seed), **options)
        check_bookkeeping(res, adapter.layout)
        assert res.extra["decoder"] == "sjd2"
    greedy = sjd2_decode(adapter, prefill, GREEDY, gen(0), **options)
    check_bookkeeping(greedy, adapter.layout)


def test_same_seed_same_image(adapter):
    prefill = adapter.prompt("a", cfg=True)
    a = sjd2_decode(adapter, prefill, SAMPLED, gen(5), window=6, denoise_steps=3)
    b = sjd2_decode(adapter, prefill, SAMPLED, gen(5), window=6, denoise_steps=3)
    assert a.tokens.tolist() == b.tokens.tolist() and a.accepted_per_forward == b.accepted_per_forward


def test_bad_options_name_the_fix(adapter):
    prefill = adapter.prompt("a", cfg=True)
    with pytest.raises(ValueError, match="window"):
        sjd2_decode(adapter, prefill, SAMPLED, gen(0), window=0)
    with pytest.raises(ValueError, match="init_levels"):
        sjd2_decode(adapter, prefill, SAMPLED, gen(0), init_levels="pyramid")
    with pytest.raises(ValueError, match="reserved ids"):
        sjd2_decode(adapter, prefill, SAMPLED, gen(0), denoise_steps=len(adapter.reserved_ids) + 1)
    with pytest.raises(ValueError, match="timestep_mlp"):
        sjd2_decode(adapter, prefill, SAMPLED, gen(0), timestep_signal="mlp")


def test_yaml_mirrors_the_keyword_options():
    conf = OmegaConf.to_container(OmegaConf.load(CONF))
    conf.pop("defaults")  # the Hydra defaults list (its typed schema), not an option
    fn, options = resolve_decoder(conf)  # unknown keys would raise
    kw = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert options == kw


def exact_ar_distribution(adapter, prefill, sampling):
    """Probability of every image sequence of an enumerable toy under AR sampling (teacher forcing)."""
    layout = adapter.layout
    free = [j for j in range(layout.n_tokens) if int(layout.forced_ids(torch.tensor([j]))) < 0]
    codes = range(layout.code_start, layout.code_stop)
    forced = layout.forced_ids(torch.arange(layout.n_tokens))
    probs = {}
    for combo in itertools.product(codes, repeat=len(free)):
        seq = forced.clone()
        seq[free] = torch.tensor(combo)
        ids = torch.cat([prefill.input_ids, seq[None, :-1].expand(prefill.input_ids.shape[0], -1)], 1)
        mask = torch.cat([prefill.attention_mask, torch.ones(ids.shape[0], layout.n_tokens - 1, dtype=torch.long)], 1)
        logits, _ = adapter.forward(adapter.embed(ids), None, mask)
        p = final_probs(logits[:, prefill.input_ids.shape[1] - 1 :], torch.arange(layout.n_tokens), layout, sampling)
        probs[combo] = float(p[torch.arange(layout.n_tokens), seq].prod())
    return free, probs


def test_clean_only_sampling_follows_the_ar_distribution(toy_model):
    """Clean-only SJD2 is lossless: on the enumerable toy (2x2 codes of 3 kinds: 81 images) the
    empirical distribution of its samples matches the exact AR distribution (chi-square, fixed seeds)."""
    prefill = toy_model.prompt("a", cfg=True)
    free, probs = exact_ar_distribution(toy_model, prefill, SAMPLED)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    counts = dict.fromkeys(probs, 0)
    n, accepted = 500, 0
    for seed in range(n):
        res = sjd2_decode(toy_model, prefill, SAMPLED, gen(1000 + seed), window=6, denoise_steps=2,
                          accept_only_clean_inputs=True, jacobi_region="all")
        counts[tuple(res.tokens[free].tolist())] += 1
        accepted += res.extra["n_drafts_accepted"]
    assert accepted > 0.2 * n  # drafts were accepted, not only resampled
    observed, expected = pooled(counts, probs, n)
    stat, pvalue = chisquare(observed, expected)
    assert pvalue > 1e-3, (stat, pvalue)


def pooled(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> tuple[list[float], list[float]]:
    """Observed and expected counts with the outcomes of expected count < ``min_expected`` pooled."""
    total = sum(probs.values())
    keys = sorted(probs, key=probs.get, reverse=True)
    observed, expected, rest_o, rest_e = [], [], 0.0, 0.0
    for k in keys:
        e = n * probs[k] / total
        if e >= min_expected:
            observed.append(counts[k])
            expected.append(e)
        else:
            rest_o, rest_e = rest_o + counts[k], rest_e + e
    if rest_e > 0:
        observed.append(rest_o)
        expected.append(rest_e)
    return observed, expected


@pytest.mark.parametrize("options", [{"window": 6, "denoise_steps": 3}, {"window": 96, "denoise_steps": 25},
                                     {"window": 5, "denoise_steps": 2, "accept_only_clean_inputs": True}],
                         ids=["small", "paper", "clean-only"])
def test_kv_holds_only_clean_committed_inputs(adapter, options):
    """Every cached forward equals a full recompute, and before every forward the cache holds exactly
    the prompt + clean embeddings of a prefix of the committed tokens (DESIGN 5.4)."""
    checked = KVChecked(adapter)
    prefill = checked.prompt("a", cfg=True)
    n_prompt = prefill.input_ids.shape[1]
    res = sjd2_decode(checked, prefill, SAMPLED, gen(7), **options)
    check_bookkeeping(res, adapter.layout)
    assert checked.n_forwards == res.n_forwards
    clean = adapter.embed(res.tokens[None])[0]  # [n_tokens, D]
    for cached in checked.cached_inputs:
        n = cached.shape[0] - n_prompt
        assert 0 <= n < res.n_tokens
        torch.testing.assert_close(cached[n_prompt:], clean[:n], atol=0, rtol=0)


def with_recipe(adapter, recipe):
    """A shallow view of ``adapter`` that carries an SJD2 recipe (as a fine-tuned checkpoint does)."""
    view = KVChecked(adapter)
    view.trained_recipe = lambda: Sjd2Recipe.from_json(recipe)
    return view


def test_noise_options_must_match_the_models_recipe(adapter):
    prefill = adapter.prompt("a", cfg=True)
    trained = {"noise": {"schedule": "rectified_flow", "levels": 4, "spacing": "karras", "rho": 7.0, "t_min": 0.01,
                         "t_max": 1.0, "timestep_signal": "reserved_token", "signal_levels": None, "x0": "sample"}}
    model = with_recipe(adapter, trained)
    sjd2_decode(model, prefill, SAMPLED, gen(0), window=4, denoise_steps=4)
    swept = sjd2_decode(model, prefill, SAMPLED, gen(0), window=4, denoise_steps=9)  # a sweep: the grid stays
    assert swept.extra["noise_signal_levels"] == 4
    with pytest.raises(ValueError, match="signal_levels=4"):
        sjd2_decode(model, prefill, SAMPLED, gen(0), window=4, denoise_steps=9, signal_levels=9)
    with pytest.raises(ValueError, match="schedule"):
        sjd2_decode(model, prefill, SAMPLED, gen(0), window=4, denoise_steps=4, schedule="cosine")
    with pytest.raises(ValueError, match="t_min=0.01"):
        sjd2_decode(model, prefill, SAMPLED, gen(0), window=4, denoise_steps=4, t_min=0.05)
    sjd2_decode(model, prefill, SAMPLED, gen(0), window=4, denoise_steps=4, t_min=0.05, check_trained_noise=False)


def test_recipe_norm_replaces_the_current_embedding_stats(adapter):
    """The trainer's frozen statistics (of the weights before fine-tuning) win over the current ones."""
    prefill = adapter.prompt("a", cfg=True)
    mean, std = adapter.embedding_stats()
    plain = sjd2_decode(KVChecked(adapter), prefill, SAMPLED, gen(3), window=6, denoise_steps=3)
    same = with_recipe(adapter, {"norm": {"mean": mean.tolist(), "std": std.tolist()}})
    res = sjd2_decode(same, prefill, SAMPLED, gen(3), window=6, denoise_steps=3)
    assert res.extra["norm_from_recipe"] and not plain.extra["norm_from_recipe"]
    assert res.tokens.tolist() == plain.tokens.tolist()
    shifted = with_recipe(adapter, {"norm": {"mean": (mean + 3.0).tolist(), "std": (std * 4.0).tolist()}})
    other = sjd2_decode(shifted, prefill, SAMPLED, gen(3), window=6, denoise_steps=3)
    assert other.tokens.tolist() != plain.tokens.tolist()


# ---------------------------------------------------------------- the committed fine-tuned model


def test_clean_only_greedy_equals_greedy_ar_on_the_fine_tuned_tiny(tiny_sjd2_trained):
    """On the real fine-tuned model (its recipe checked, its frozen norm used): exact, and saves forwards."""
    greedy = SamplingConfig(top_k=1)
    for text in ("a red circle left of a blue square", "three triangles"):
        prefill = tiny_sjd2_trained.prompt(text)
        ar = ar_decode(tiny_sjd2_trained, prefill, greedy, torch.Generator().manual_seed(0))
        sjd2 = sjd2_decode(tiny_sjd2_trained, prefill, greedy, torch.Generator().manual_seed(1), window=32,
                           denoise_steps=25, accept_only_clean_inputs=True)
        assert sjd2.tokens.tolist() == ar.tokens.tolist()
        assert sjd2.n_forwards < ar.n_forwards


def test_default_sjd2_on_the_fine_tuned_tiny_respects_the_layout(tiny_sjd2_trained):
    layout = tiny_sjd2_trained.layout
    for seed in range(2):
        res = sjd2_decode(tiny_sjd2_trained, tiny_sjd2_trained.prompt("two blue circles"), SamplingConfig(),
                          torch.Generator().manual_seed(seed), window=32, denoise_steps=10)
        assert layout.violations(res.tokens) == []
        assert sum(res.accepted_per_forward) == layout.n_tokens and min(res.accepted_per_forward) >= 1


def test_the_noise_is_one_type_from_trainer_through_the_exported_recipe_to_the_decoder():
    import json

    from decode.schema import Sjd2Options
    from decode.sjd2 import noise_config
    from models.noisy import EmbeddingNorm
    from train.config import TrainConfig
    from train.export import sjd2_recipe

    trained = TrainConfig(noise=NoiseConfig(levels=7, t_min=0.02, spacing="uniform"))
    norm = EmbeddingNorm(torch.arange(4.0) + 1, torch.full((4,), 2.0))
    back = Sjd2Recipe.from_json(json.loads(json.dumps(sjd2_recipe(trained, norm).to_json())))
    assert back.noise == trained.noise and back.training["name"] == trained.name
    assert torch.equal(back.norm.mean, norm.mean) and torch.equal(back.norm.std, norm.std)
    options = Sjd2Options(denoise_steps=7, t_min=0.02, spacing="uniform")
    assert noise_config(**vars(options)) == trained.noise


def test_a_fine_tuned_checkpoint_declares_its_recipe_through_the_protocol():
    from omegaconf import OmegaConf

    from core.config import compose_config
    from models import load_adapter

    tuned = load_adapter(OmegaConf.to_container(compose_config(["model=tiny_sjd2"]).model))
    recipe = tuned.trained_recipe()
    assert isinstance(recipe, Sjd2Recipe) and isinstance(recipe.noise, NoiseConfig)
    assert recipe.norm is not None and recipe.norm.mean.numel() == tuned.model.config.hidden_size
    assert build(tuned.config.__class__(words=tuned.config.words, n_codes=8)).trained_recipe() is None
