"""Grouped acceptance (decode/grouped.py, ``decoder=gsd``): the rule as junhyukso/GSD's code defines it, and
its price: on the enumerable toy GSD's samples do NOT follow the AR distribution (it is labelled lossy)."""
from __future__ import annotations

import pytest
import torch

from decode.grouped import GroupedTest
from decode.sampling import SamplingConfig
from tests.test_ar_sjd import N_TOY, TOY_CASES, chi_square_p_value, exact_ar_distribution, sjd_samples

V = 12
CODES = (2, 12)  # ids 0, 1 are not image codes


def table_embed(emb: torch.Tensor):
    return lambda ids: emb[ids]


def one_test(p: torch.Tensor, q: torch.Tensor, d: int, emb: torch.Tensor, **kw) -> float:
    return float(GroupedTest(table_embed(emb), CODES, **kw).ratio(p[None], q[None], torch.tensor([d]))[0])


def spread(values: dict[int, float]) -> torch.Tensor:
    p = torch.zeros(V)
    for i, v in values.items():
        p[i] = v
    return p


def test_the_group_is_the_rank_window_filtered_by_probability_and_distance():
    # p ranks (ascending) 0, 1 (p = 0, not codes), then codes 2..11 by increasing p
    p = spread({i: float(i - 1) for i in range(2, 12)})
    p /= p.sum()
    q = torch.full((V,), 1.0 / V)
    emb = torch.zeros(V, 1)
    emb[9, 0] = 10.0  # code 9 is far from every other code
    d = 7  # rank 7: window = ranks 0..13 clipped to 0..11 -> every id; |p(g) - p(d)| < thr keeps a few
    thr = float(p[8] - p[7]) * 2.5  # keeps 5, 6, 7, 8, 9 by probability
    got = one_test(p, q, d, emb, half_width=7, p_thr=thr, d_thr=0.5)
    # the window holds ids 0, 1 (not codes): the distance filter is skipped, as the code skips it for ids > 10000
    want = float(p[[5, 6, 7, 8, 9]].sum() / q[[5, 6, 7, 8, 9]].sum())
    assert got == pytest.approx(min(1.0, want))
    d = 10  # rank 10: window ranks 3..11 = codes 3..11, all codes: the distance filter applies (9 is out)
    got = one_test(p, q, d, emb, half_width=7, p_thr=thr, d_thr=0.5)
    keep = [8, 10, 11]
    assert got == pytest.approx(min(1.0, float(p[keep].sum() / q[keep].sum())))


def test_a_lone_draft_is_tested_as_sjd_and_a_bottom_ranked_one_falls_back_to_sjd():
    p = torch.linspace(0.0, 1.0, V)
    p[:2] = 0.0
    p /= p.sum()
    q = torch.roll(p, 3)
    emb = torch.arange(V, dtype=torch.float32)[:, None] * 10  # every pair far apart
    for d in (4, 9, 11):
        plain = float((p[d] / q[d]).clamp(max=1))
        assert one_test(p, q, d, emb, p_thr=1.0) == pytest.approx(plain)  # distance leaves d alone
    emb = torch.zeros(V, 1)  # all close: only the bottom-rank fallback keeps SJD's ratio
    q = torch.roll(p, -3)  # q(d) > p(d) for the middle codes: SJD's ratio < 1
    assert one_test(p, q, 3, emb, p_thr=1.0) == pytest.approx(float((p[3] / q[3]).clamp(max=1)))
    plain = float(p[8] / q[8])
    assert plain < 0.9 and one_test(p, q, 8, emb, p_thr=1.0) == pytest.approx(min(1.0, float(p[1:].sum() / q[1:].sum())))


def test_gsd_is_lossy_on_the_toy_and_its_tv_distance_is_reported(toy_model, capsys):
    """GSD's samples on the enumerable toy: the chi-square test against exact AR rejects them, and their total
    variation distance to AR is well above SJD's sampling noise at the same sample size."""
    sampling, options = TOY_CASES[0]
    prefill = toy_model.prompt("a red circle")
    exact = exact_ar_distribution(toy_model, prefill, sampling)

    def tv(samples):
        counts: dict = {}
        for s in samples:
            counts[s] = counts.get(s, 0) + 1
        return 0.5 * sum(abs(counts.get(k, 0) / len(samples) - v) for k, v in exact.items())

    gsd = sjd_samples(toy_model, prefill, sampling, N_TOY, seed=0, **{**options, "window": 16}, acceptance="grouped")
    sjd = sjd_samples(toy_model, prefill, sampling, N_TOY, seed=0, **{**options, "window": 16})
    tv_gsd, tv_sjd = tv(gsd), tv(sjd)
    with capsys.disabled():
        print(f"\n[gsd] toy TV distance to AR: GSD {tv_gsd:.3f}, SJD (sampling noise) {tv_sjd:.3f}, N={N_TOY}")
    assert chi_square_p_value(gsd, exact) < 1e-6
    assert tv_gsd > 2 * tv_sjd


def test_greedy_gsd_equals_greedy_ar(tiny_trained):
    from decode.ar import ar_decode
    from decode.sjd import sjd_decode

    greedy = SamplingConfig(top_k=1)
    for text in ("a red circle left of a blue square", "a blue square"):
        prefill = tiny_trained.prompt(text)
        ar = ar_decode(tiny_trained, prefill, greedy, torch.Generator().manual_seed(0))
        gsd = sjd_decode(tiny_trained, prefill, greedy, torch.Generator().manual_seed(1), acceptance="grouped")
        assert gsd.tokens.tolist() == ar.tokens.tolist() and gsd.n_forwards < ar.n_forwards
