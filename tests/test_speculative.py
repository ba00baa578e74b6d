"""The acceptance rule alone: whatever q is, the emitted token follows p."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from decode.sampling import sample
from decode.speculative import accept, residual

V = 6


def dist(seed: int, zeros: tuple[int, ...] = ()) -> torch.Tensor:
    x = torch.rand(V, generator=torch.Generator().manual_seed(seed)) ** 2
    x[list(zeros)] = 0.0
    return x / x.sum()


def broken_accept(p, q, drafts, generator):
    """The Lumina-mGPT-2.0 bug: resample from p (not from the residual) at the first rejection."""
    n, token = accept(p, q, drafts, generator)
    return (n, token) if token is None else (n, int(sample(p[n][None], generator)[0]))


def emitted_first(rule, p: torch.Tensor, q: torch.Tensor, n_trials: int, seed: int, one_hot_q: bool) -> torch.Tensor:
    """Counts [V] of the first emitted token when a draft is tested against p (bonus from p when accepted)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    for _ in range(n_trials):
        d = sample(q[None], gen)  # draft ~ q
        q_row = torch.nn.functional.one_hot(d, V).float() if one_hot_q else q[None]
        n, token = rule(p[None], q_row, d, gen)
        counts[int(d[0]) if n == 1 else token] += 1
    return counts


def p_value(counts: torch.Tensor, p: torch.Tensor) -> float:
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token with p = 0 was emitted"
    return chisquare(counts[keep].numpy(), (p[keep] * counts.sum()).numpy()).pvalue


@pytest.mark.parametrize("one_hot_q", [False, True], ids=["q-dense", "q-one-hot"])
def test_emitted_token_follows_p(one_hot_q):
    p, q = dist(0, zeros=(5,)), dist(1, zeros=(2,))  # different supports too
    counts = emitted_first(accept, p, q, 6000, seed=0, one_hot_q=one_hot_q)
    assert p_value(counts, p) > 1e-3


def test_the_same_check_catches_resampling_from_p():
    p, q = dist(0, zeros=(5,)), dist(1, zeros=(2,))
    counts = emitted_first(broken_accept, p, q, 6000, seed=0, one_hot_q=False)
    keep = p > 0
    bad = counts[~keep].sum() > 0 or chisquare(counts[keep].numpy(), (p[keep] * 6000).numpy()).pvalue < 1e-6
    assert bad, "the distribution test has no power against the classic bug"


def test_second_position_follows_its_p_after_the_first_passes():
    p, q = torch.stack([dist(2), dist(3)]), torch.stack([dist(4), dist(5)])
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(6000):
        d = sample(q, gen)  # [2]
        n, token = accept(p, q, d, gen)
        if n >= 1:
            counts[int(d[1]) if n == 2 else token] += 1
    assert counts.sum() > 1000
    assert p_value(counts, p[1]) > 1e-3


def test_all_accepted_leaves_the_bonus_to_the_caller():
    p = torch.stack([dist(0), dist(1), dist(2)])
    drafts = torch.tensor([0, 3, 1])
    assert accept(p, p.clone(), drafts, torch.Generator().manual_seed(0)) == (3, None)
    assert accept(p[:0], p[:0], drafts[:0], torch.Generator().manual_seed(0)) == (0, None)


def test_zero_target_draft_is_rejected_and_never_emitted():
    p, q = dist(0, zeros=(3,)), torch.nn.functional.one_hot(torch.tensor([3]), V).float()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, token = accept(p[None], q, torch.tensor([3]), gen)
        assert n == 0 and token != 3


def test_one_uniform_per_position():
    p = torch.stack([dist(0), dist(1), dist(2), dist(3)])
    gen = torch.Generator().manual_seed(7)
    assert accept(p, p.clone(), torch.tensor([0, 1, 2, 3]), gen) == (4, None)
    ref = torch.Generator().manual_seed(7)
    torch.rand(4, generator=ref)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref))


def test_residual():
    p, q = torch.tensor([0.5, 0.3, 0.2, 0.0]), torch.tensor([0.2, 0.5, 0.2, 0.1])
    torch.testing.assert_close(residual(p, q), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    p2 = torch.tensor([0.6, 0.1, 0.3, 0.0])
    torch.testing.assert_close(residual(p2, q), torch.tensor([0.8, 0.0, 0.2, 0.0]))
    assert torch.equal(residual(p, p), p)  # no residual mass: fall back to p


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="accept needs"):
        accept(torch.rand(3, V), torch.rand(2, V), torch.tensor([0, 1]), torch.Generator())


def reference_accept(p, q, drafts, generator):
    """The rule as first written here (ratio clamped at 1, residual row by row): the decisions and draws
    accept and accept_prefix must reproduce exactly."""
    n = int(drafts.numel())
    p_d, q_d = p.gather(1, drafts[:, None]).squeeze(1), q.gather(1, drafts[:, None]).squeeze(1)
    ratio = torch.where(q_d > 0, p_d / q_d.clamp_min(1e-30), (p_d > 0).float())
    rejected = (torch.rand(n, generator=generator) >= ratio.clamp(max=1.0)).tolist()
    if True not in rejected:
        return n, None
    i = rejected.index(True)
    return i, int(sample(residual(p[i], q[i])[None], generator)[0])


def test_accept_prefix_is_the_rule_with_the_token_on_the_device():
    """accept and the decoders' accept_prefix make the reference's decisions and draws (q_d = 0 included),
    and accept_prefix reads no row of p and q past the drafts it tests."""
    from decode.speculative import accept_prefix

    n_rejected = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        p = torch.stack([dist(seed * 10 + i, zeros=(0,)) for i in range(4)])
        q = torch.stack([dist(seed * 10 + 5 + i, zeros=(0, 1)) for i in range(4)])  # q_d = 0 with p_d = 0 or > 0
        drafts = torch.randint(0, 3, (3,), generator=g)
        gens = [torch.Generator().manual_seed(seed) for _ in range(3)]
        n, token = reference_accept(p[:3], q[:3], drafts, gens[0])
        assert accept(p[:3], q[:3], drafts, gens[1]) == (n, token)
        n2, token2 = accept_prefix(torch.cat([p[:3], torch.full((1, V), float("nan"))]), q, drafts, gens[2])
        assert n2 == n and (token2 is None) == (token is None)
        assert token is None or (token2.shape == (1,) and int(token2[0]) == token)
        assert torch.equal(gens[0].get_state(), gens[1].get_state()) and torch.equal(gens[0].get_state(),
                                                                                      gens[2].get_state())
        n_rejected += token is not None
    assert 0 < n_rejected < 60
