"""The decoder family on one loop (issue 19): SCD (``decoder=scd``), GSD (``decoder=gsd``) and SJD2 with coupling
behave like SJD where they must -- greedy equals AR, the cache equals a full recompute, a batch of four decodes
what each row decodes alone -- and their YAML files mirror the keyword options."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from decode.api import DECODERS, resolve_decoder
from decode.ar import ar_decode
from decode.sampling import SamplingConfig
from decode.sjd import sjd_decode
from decode.sjd2 import sjd2_decode
from tests.conftest import RecomputeChecked
from tests.test_batch import TEXTS

CONF = Path(__file__).resolve().parents[1] / "conf" / "decoder"
FAMILY = {  # SJD-loop settings of the new decoders
    "scd-maximal": {"coupling": "maximal"},
    "scd-gumbel": {"coupling": "gumbel"},
    "gsd": {"acceptance": "grouped"},
    "gsd-gumbel": {"acceptance": "grouped", "coupling": "gumbel"},
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("model", ["tiny_random", "tiny_trained"])
def test_greedy_family_equals_greedy_ar(request, model, name):
    adapter = request.getfixturevalue(model)
    greedy = SamplingConfig(top_k=1)
    for text in ("a red circle left of a blue square", "a blue square"):
        prefill = adapter.prompt(text)
        ar = ar_decode(adapter, prefill, greedy, gen(0))
        res = sjd_decode(adapter, prefill, greedy, gen(1), window=16, **FAMILY[name])
        assert res.tokens.tolist() == ar.tokens.tolist() and res.n_forwards < ar.n_forwards


@pytest.mark.parametrize("kind", ["maximal", "gumbel"])
def test_greedy_lossless_sjd2_with_coupling_equals_greedy_ar(tiny_sjd2_trained, kind):
    greedy = SamplingConfig(cfg_scale=3.0, top_k=1)
    prefill = tiny_sjd2_trained.prompt("two blue squares left of a green triangle")
    ar = ar_decode(tiny_sjd2_trained, prefill, greedy, gen(0))
    res = sjd2_decode(tiny_sjd2_trained, prefill, greedy, gen(1), window=32, denoise_steps=5,
                      accept_only_clean_inputs=True, coupling=kind)
    assert res.tokens.tolist() == ar.tokens.tolist() and res.n_forwards < ar.n_forwards


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_cache_equals_full_recompute(tiny_random, name):
    checked = RecomputeChecked(tiny_random)
    res = sjd_decode(checked, tiny_random.prompt(TEXTS[0]), SamplingConfig(), gen(3), window=6, **FAMILY[name])
    assert tiny_random.layout.violations(res.tokens) == [] and res.n_forwards == checked.n_forwards
    assert res.extra["n_drafts_accepted"] == res.n_tokens - res.n_forwards
    assert res.extra["decoder"] == ("gsd" if "gsd" in name else "scd")


@pytest.mark.parametrize("name", ["scd-maximal", "scd-gumbel", "gsd", "sjd2-maximal", "sjd2-gumbel"])
def test_batch_of_four_equals_batch_one(tiny_trained, tiny_sjd2_trained, name):
    from decode.batch import run_batched, run_one
    from decode.sjd import sjd_steps
    from decode.sjd2 import sjd2_steps

    if name.startswith("sjd2"):
        adapter, steps = tiny_sjd2_trained, sjd2_steps
        options = {"window": 12, "denoise_steps": 3, "coupling": name.split("-")[1]}
    else:
        adapter, steps, options = tiny_trained, sjd_steps, {"window": 8, **FAMILY[name]}
    sampling = SamplingConfig(cfg_scale=3.0)
    alone = [run_one(adapter, steps(adapter, adapter.prompt(t), sampling, gen(i), **options)) for i, t in enumerate(TEXTS)]
    jobs = ((i, steps(adapter, adapter.prompt(t), sampling, gen(i), **options)) for i, t in enumerate(TEXTS))
    batched = {f.key: f.result for f in run_batched(adapter, jobs, 4)}
    for i, a in enumerate(alone):
        b = batched[i]
        assert torch.equal(a.tokens, b.tokens) and a.accepted_per_forward == b.accepted_per_forward
        assert a.extra == b.extra
    assert sum(a.extra["n_redrafts"] for a in alone) > 0


def test_coupling_changes_the_draws_but_none_is_sjd_draw_for_draw(tiny_trained):
    prefill = tiny_trained.prompt(TEXTS[1])
    sjd = sjd_decode(tiny_trained, prefill, SamplingConfig(), gen(0))
    none = sjd_decode(tiny_trained, prefill, SamplingConfig(), gen(0), coupling="none", acceptance="exact")
    assert torch.equal(sjd.tokens, none.tokens) and sjd.accepted_per_forward == none.accepted_per_forward
    for kind in ("maximal", "gumbel"):
        res = sjd_decode(tiny_trained, prefill, SamplingConfig(), gen(0), coupling=kind)
        assert not torch.equal(res.tokens, sjd.tokens)


@pytest.mark.parametrize("name", ["scd", "gsd", "scd_lumina_mgpt", "gsd_emu3"])
def test_family_yaml_mirrors_the_keyword_options(name):
    conf = OmegaConf.load(CONF / f"{name}.yaml")
    if "defaults" in conf and conf.defaults[0] in ("scd", "gsd"):  # a preset: its base + its overrides
        base = OmegaConf.load(CONF / f"{conf.defaults[0]}.yaml")
        conf = OmegaConf.merge(base, {k: v for k, v in conf.items() if k != "defaults"})
    conf = OmegaConf.to_container(conf)
    conf.pop("defaults")
    fn, options = resolve_decoder(conf)
    assert fn is DECODERS[name.split("_")[0]]
    keyword = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert set(options) == keyword


def test_bad_family_options_name_the_fix(tiny_random):
    prefill = tiny_random.prompt("a")
    for kwargs, fix in [({"coupling": "optimal"}, "decoder.coupling must be one of"),
                        ({"acceptance": "loose"}, "decoder.acceptance must be one of"),
                        ({"acceptance": "grouped", "group_half_width": 0}, "group_half_width"),
                        ({"coupled_q": "old"}, "decoder.coupled_q must be one of")]:
        with pytest.raises(ValueError, match=fix):
            sjd_decode(tiny_random, prefill, SamplingConfig(), gen(0), **kwargs)
    with pytest.raises(ValueError, match="decoder.coupling must be one of"):
        sjd2_decode(tiny_random, prefill, SamplingConfig(), gen(0), coupling="optimal", check_trained_noise=False)
