"""Coupled redrafting (decode/coupling.py): SCD (``decoder=scd``) and SJD2 with coupling stay exact.

The rule alone: a maximally coupled draft follows p_new and keeps the old draft as often as a coupling can;
a chain d ~ q -> coupled to p1 -> tested against p2 emits p2 with q = p1, not with the SCD code's q (the old
draft's, for a kept draft). Gumbel noise is one vector per absolute position. Decoders: on the enumerable toy
the samples of SCD (maximal, Gumbel) and of lossless SJD2 with coupling follow the exact AR distribution at
batch 1 and B = 3 (chi-square), and the same test rejects a broken variant of each.
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from decode import coupling
from decode.batch import run_batched
from decode.sampling import SamplingConfig, sample
from decode.sjd import sjd_steps
from decode.sjd2 import sjd2_decode, sjd2_steps
from decode.speculative import accept
from models.tiny import build
from tests.conftest import micro_config, reinit
from tests.test_ar_sjd import N_TOY, chi_square_p_value, exact_ar_distribution, sjd_samples

V = 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dist(seed: int, power: float = 2.0) -> torch.Tensor:
    x = torch.rand(V, generator=gen(seed)) ** power
    return x / x.sum()


# ---------------------------------------------------------------- the rule alone


@pytest.mark.parametrize("one_hot_q", [False, True], ids=["q-dense", "q-one-hot"])
def test_maximal_coupling_follows_p_and_keeps_the_old_draft_maximally(one_hot_q):
    p, q = dist(0), dist(1)
    g, n = gen(2), 6000
    d = sample(q.expand(n, -1), g)  # old drafts ~ q
    q_rows = torch.nn.functional.one_hot(d, V).float() if one_hot_q else q.expand(n, -1)
    new, kept = coupling.maximal_coupling(p.expand(n, -1), q_rows, d, g)
    counts = torch.bincount(new, minlength=V).float()
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3
    assert torch.equal(new[kept], d[kept])
    # P(kept) = sum_x q(x) min(1, p(x)/q(x)): the total-variation bound, the most any coupling keeps
    want = (p[d] / q_rows.gather(1, d[:, None])[:, 0]).clamp(max=1).mean() if one_hot_q else torch.minimum(p, q).sum()
    se = (want * (1 - want) / n) ** 0.5
    assert abs(float(kept.float().mean()) - float(want)) < 5 * se
    if not one_hot_q:  # (a one-hot q keeps d with p(d): what a fresh draw agrees with it, no better)
        assert float(want) > float((p * q).sum()) + 5 * se  # more agreement than two independent draws


def chain_counts(rule: str, n: int = 8000) -> tuple[torch.Tensor, torch.Tensor]:
    """d0 ~ q0; coupled to p1 (a stale target); tested against p2 = p1 with the coupled q: emitted counts."""
    q0 = torch.tensor([0.70, 0.10, 0.05, 0.05, 0.05, 0.05])  # the old draft's q, far from the new target
    p1 = torch.tensor([0.20, 0.40, 0.10, 0.10, 0.10, 0.10])
    g, counts = gen(5), torch.zeros(V)
    for _ in range(n):
        d0 = sample(q0[None], g)
        d1, kept = coupling.maximal_coupling(p1[None], q0[None], d0, g)
        q1 = coupling.coupled_q(p1[None], q0[None], kept, rule)
        n_acc, token = accept(p1[None], q1, d1, g)
        counts[int(d1[0]) if n_acc else token] += 1
    return counts, p1


def test_a_coupled_chain_emits_the_target_and_the_scd_codes_q_does_not():
    counts, p = chain_counts("target")
    assert chisquare(counts.numpy(), (p * counts.sum()).numpy()).pvalue > 1e-3
    counts, p = chain_counts("kept_old")  # junhyukso/SCD SCDMC.py: a kept draft keeps the old q
    assert chisquare(counts.numpy(), (p * counts.sum()).numpy()).pvalue < 1e-6


def test_gumbel_noise_is_one_vector_per_absolute_position():
    noise, g = coupling.GumbelNoise(V, "cpu"), gen(0)
    first = noise.rows(3, 4, g).clone()  # positions 3..6
    again = noise.rows(5, 4, g)  # 5, 6 kept; 7, 8 new
    assert torch.equal(again[:2], first[2:]) and not torch.equal(again[2], first[3])
    p = dist(1)[None].expand(2, -1)
    assert torch.equal(noise.sample(p, 5, g), noise.sample(p, 5, g))  # same noise, same p: same draft
    with pytest.raises(ValueError, match="forgotten"):
        noise.rows(4, 1, g)


def test_a_gumbel_draft_of_fresh_noise_follows_p():
    p, g, n = dist(2), gen(3), 6000
    counts = torch.zeros(V)
    for i in range(n):
        counts[int(coupling.GumbelNoise(V, "cpu").sample(p[None], i, g)[0])] += 1
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3


def test_unknown_couplings_are_refused():
    with pytest.raises(ValueError, match="decoder.coupling must be one of"):
        coupling.validate("optimal", "target")
    with pytest.raises(ValueError, match="decoder.coupled_q must be one of"):
        coupling.validate("maximal", "old")


# ---------------------------------------------------------------- the decoders on the enumerable toy

# SCD: every window position is drafted ("all"), spatial init (a copied neighbour with one-hot q): stale
# positions are coupled often, which gives the test its power against the broken variants.
SCD_CASE = (SamplingConfig(cfg_scale=2.0, temperature=1.5), {"window": 11, "init": "spatial", "jacobi_region": "all"})
# SJD2 (lossless): a toy with sharper, context-dependent predictions (weights scale 1.0), where clean slots are
# accepted often after being redrafted.
SJD2_CASE = (SamplingConfig(cfg_scale=2.0, temperature=1.5),
             {"window": 11, "denoise_steps": 2, "accept_only_clean_inputs": True, "jacobi_region": "all"})


@pytest.fixture(scope="module")
def sharp_toy():
    return reinit(build(micro_config(n_codes=3, hidden_size=32, num_hidden_layers=1), seed=0, image_size=8), scale=1.0)


def free_of(layout) -> torch.Tensor:
    return (layout.forced_ids(torch.arange(layout.n_tokens)) < 0).nonzero().flatten()


def sjd2_samples(adapter, prefill, sampling, n: int, seed: int, **options) -> list[tuple[int, ...]]:
    free, g = free_of(adapter.layout), gen(seed)
    out = []
    for _ in range(n):
        res = sjd2_decode(adapter, prefill, sampling, g, **options)
        assert adapter.layout.violations(res.tokens) == []
        out.append(tuple(res.tokens[free].tolist()))
    return out


def batched_samples(adapter, steps, prefill, sampling, n: int, **options) -> list[tuple[int, ...]]:
    """n images decoded three rows at a time, each row with its own generator."""
    free = free_of(adapter.layout)
    jobs = ((i, steps(adapter, prefill, sampling, gen(1000 + i), **options)) for i in range(n))
    done = list(run_batched(adapter, jobs, 3))
    assert len({f.result.n_forwards for f in done}) > 1  # rows of a batch finish at different forwards
    assert all(adapter.layout.violations(f.result.tokens) == [] for f in done)
    return [tuple(f.result.tokens[free].tolist()) for f in done]


def always_keep(p, q, d, generator):
    """Broken maximal coupling: the old draft is always kept (the ratio test forgotten), its q claimed p_new."""
    return d.clone(), torch.ones_like(d, dtype=torch.bool)


def q_of_old_draft(p, q_old, kept, rule):
    """Broken maximal coupling: every coupled draft keeps the old draft's q (kept or redrawn)."""
    return q_old


def one_noise_vector(self, start, n, generator):
    """Broken Gumbel coupling: one noise vector for every position."""
    if self.table.shape[0] == 0:
        self.table = torch.empty(1, self.vocab_size).exponential_(1, generator=generator)
    return self.table.expand(n, -1)


@pytest.fixture(scope="module")
def scd_exact(toy_model):
    sampling, _ = SCD_CASE
    prefill = toy_model.prompt("a red circle")
    return prefill, exact_ar_distribution(toy_model, prefill, sampling)


@pytest.fixture(scope="module")
def sjd2_exact(sharp_toy):
    sampling, _ = SJD2_CASE
    prefill = sharp_toy.prompt("a red circle")
    return prefill, exact_ar_distribution(sharp_toy, prefill, sampling)


@pytest.mark.parametrize("kind", ["maximal", "gumbel"])
def test_scd_is_lossless_on_the_toy(toy_model, scd_exact, kind):
    sampling, options = SCD_CASE
    prefill, exact = scd_exact
    samples = sjd_samples(toy_model, prefill, sampling, N_TOY, seed=0, **options, coupling=kind)
    assert chi_square_p_value(samples, exact) > 1e-3


@pytest.mark.parametrize("kind", ["maximal", "gumbel"])
def test_scd_is_lossless_at_batch_three(toy_model, scd_exact, kind):
    sampling, options = SCD_CASE
    prefill, exact = scd_exact
    samples = batched_samples(toy_model, sjd_steps, prefill, sampling, N_TOY, **options, coupling=kind)
    assert chi_square_p_value(samples, exact) > 1e-3


@pytest.mark.parametrize("kind, target, broken", [("maximal", "coupled_q", q_of_old_draft),
                                                  ("gumbel", "GumbelNoise.rows", one_noise_vector)],
                         ids=["maximal-q-of-old-draft", "gumbel-one-noise-vector"])
def test_the_scd_test_rejects_a_broken_coupling(toy_model, scd_exact, monkeypatch, kind, target, broken):
    sampling, options = SCD_CASE
    prefill, exact = scd_exact
    owner, _, attr = target.rpartition(".")
    monkeypatch.setattr(getattr(coupling, owner) if owner else coupling, attr, broken)
    samples = sjd_samples(toy_model, prefill, sampling, N_TOY, seed=0, **options, coupling=kind)
    assert chi_square_p_value(samples, exact) < 1e-6


@pytest.mark.parametrize("kind", ["maximal", "gumbel"])
def test_lossless_sjd2_with_coupling_follows_ar(sharp_toy, sjd2_exact, kind):
    sampling, options = SJD2_CASE
    prefill, exact = sjd2_exact
    samples = sjd2_samples(sharp_toy, prefill, sampling, N_TOY, seed=0, **options, coupling=kind)
    assert chi_square_p_value(samples, exact) > 1e-3


@pytest.mark.parametrize("kind", ["maximal", "gumbel"])
def test_lossless_sjd2_with_coupling_follows_ar_at_batch_three(sharp_toy, sjd2_exact, kind):
    sampling, options = SJD2_CASE
    prefill, exact = sjd2_exact
    samples = batched_samples(sharp_toy, sjd2_steps, prefill, sampling, N_TOY, **options, coupling=kind)
    assert chi_square_p_value(samples, exact) > 1e-3


@pytest.mark.parametrize("kind, target, broken", [("maximal", "maximal_coupling", always_keep),
                                                  ("gumbel", "GumbelNoise.rows", one_noise_vector)],
                         ids=["maximal-always-keep", "gumbel-one-noise-vector"])
def test_the_sjd2_test_rejects_a_broken_coupling(sharp_toy, sjd2_exact, monkeypatch, kind, target, broken):
    sampling, options = SJD2_CASE
    prefill, exact = sjd2_exact
    owner, _, attr = target.rpartition(".")
    monkeypatch.setattr(getattr(coupling, owner) if owner else coupling, attr, broken)
    samples = sjd2_samples(sharp_toy, prefill, sampling, N_TOY, seed=0, **options, coupling=kind)
    assert chi_square_p_value(samples, exact) < 1e-6
