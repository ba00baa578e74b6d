"""final_probs and sample on tiny hand-made tensors."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from decode.sampling import SamplingConfig, final_probs, sample
from models.base import ImageLayout

# vocab of 10: codes 0..4; sequence = [7] + 2 rows of (2 codes + EOL 6) + [8]  (8 tokens)
LAYOUT = ImageLayout(height=2, width=2, head=(7,), eol=6, tail=(8,), code_start=0, code_stop=5)
V = 10
FREE_POS = torch.tensor([1, 2, 4, 5])
FORCED_POS = torch.tensor([0, 3, 6, 7])
FORCED_IDS = [7, 6, 6, 8]


def rand_logits(n_streams: int, n_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_streams, n_rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def code_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the code ids only (the reference for free rows)."""
    out = torch.zeros_like(x)
    out[..., :5] = torch.softmax(x[..., :5], dim=-1)
    return out


def test_cfg_mixes_raw_logits():
    logits = rand_logits(2, 4)
    s = 3.0
    got = final_probs(logits, FREE_POS, LAYOUT, SamplingConfig(cfg_scale=s))
    mixed = logits[1] + s * (logits[0] - logits[1])
    torch.testing.assert_close(got, code_softmax(mixed))


def test_single_stream_means_no_cfg():
    logits = rand_logits(1, 4)
    got = final_probs(logits, FREE_POS, LAYOUT, SamplingConfig(cfg_scale=3.0))
    torch.testing.assert_close(got, code_softmax(logits[0]))


def test_cfg_scale_one_equals_conditional():
    logits = rand_logits(2, 4)
    got = final_probs(logits, FREE_POS, LAYOUT, SamplingConfig(cfg_scale=1.0))
    torch.testing.assert_close(got, code_softmax(logits[0]))


def test_constraints_per_row():
    positions = torch.arange(LAYOUT.n_tokens)
    logits = rand_logits(2, LAYOUT.n_tokens)
    probs = final_probs(logits, positions, LAYOUT, SamplingConfig())
    assert probs.dtype == torch.float32 and probs.shape == (LAYOUT.n_tokens, V)
    for row, fid in zip(FORCED_POS.tolist(), FORCED_IDS):
        expected = torch.zeros(V)
        expected[fid] = 1.0
        assert torch.equal(probs[row], expected), f"forced row {row} is not exactly one-hot at {fid}"
    free = probs[FREE_POS]
    assert torch.all(free[:, 5:] == 0) and torch.all(free[:, :5] > 0)
    torch.testing.assert_close(free.sum(-1), torch.ones(4))


def test_forced_rows_one_hot_even_when_the_model_disagrees():
    logits = torch.zeros(1, 1, V)
    logits[0, 0, 7] = -1e4  # the model hates the forced id
    probs = final_probs(logits, torch.tensor([0]), LAYOUT, SamplingConfig(top_k=1, top_p=0.5, temperature=0.3))
    assert probs[0, 7] == 1.0 and probs.sum() == 1.0


def test_temperature():
    logits = rand_logits(1, 4)
    t = 1.7
    got = final_probs(logits, FREE_POS, LAYOUT, SamplingConfig(temperature=t))
    torch.testing.assert_close(got, code_softmax(logits[0] / t))


def test_top_k_keeps_the_k_best_codes():
    logits = rand_logits(2, 4, seed=3)
    got = final_probs(logits, FREE_POS, LAYOUT, SamplingConfig(cfg_scale=2.0, top_k=2))
    mixed = (logits[1] + 2.0 * (logits[0] - logits[1]))[:, :5]
    best = mixed.topk(2, dim=-1).indices
    for r in range(4):
        kept = set(got[r].nonzero().flatten().tolist())
        assert kept == set(best[r].tolist())
        ref = torch.softmax(mixed[r, best[r]], dim=-1)
        torch.testing.assert_close(got[r, best[r]], ref)


def test_top_k_larger_than_codes_is_no_op():
    logits = rand_logits(1, 4)
    got = final_probs(logits, FREE_POS, LAYOUT, SamplingConfig(top_k=50))
    torch.testing.assert_close(got, code_softmax(logits[0]))


def test_top_k_one_is_argmax():
    logits = rand_logits(1, 4, seed=5)
    got = final_probs(logits, FREE_POS, LAYOUT, SamplingConfig(top_k=1))
    assert torch.equal(got.argmax(-1), logits[0, :, :5].argmax(-1))
    assert torch.equal(got.max(-1).values, torch.ones(4))


@pytest.mark.parametrize("top_p, kept", [(0.45, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((1, 1, V), -1e9)
    logits[0, 0, :4] = base.log()
    logits[0, 0, 4] = -30.0  # a code with ~0 mass
    got = final_probs(logits, torch.tensor([1]), LAYOUT, SamplingConfig(top_p=top_p))[0]
    assert got.nonzero().flatten().tolist() == kept
    torch.testing.assert_close(got[kept[:4]], base[kept[:4]] / base[kept[:4]].sum())


def test_non_mutating_and_float32_from_bf16():
    logits = rand_logits(2, 8).to(torch.bfloat16)
    before = logits.clone()
    probs = final_probs(logits, torch.arange(8), LAYOUT, SamplingConfig(top_k=3, top_p=0.9, temperature=0.7))
    assert torch.equal(logits, before)
    assert probs.dtype == torch.float32


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one image at a time"):
        final_probs(rand_logits(3, 4), FREE_POS, LAYOUT, SamplingConfig())
    with pytest.raises(ValueError, match="positions"):
        final_probs(rand_logits(2, 4), torch.arange(3), LAYOUT, SamplingConfig())


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"temperature": 0.0}, "top_k=1"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "integer"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, r"\(0, 1\]"),
        ({"cfg_scale": math.nan}, "cfg_scale"),
    ],
)
def test_bad_sampling_config(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        SamplingConfig(**kwargs)


def test_sample_follows_probs():
    probs = torch.tensor([[0.1, 0.6, 0.0, 0.3], [0.25, 0.25, 0.25, 0.25]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(probs, gen) for _ in range(4000)])  # [N, 2]
    assert draws.shape == (4000, 2) and draws.dtype == torch.long
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=4).double()
        assert counts[probs[row] == 0].sum() == 0
        keep = probs[row] > 0
        assert chisquare(counts[keep].numpy(), (probs[row][keep] * 4000).numpy()).pvalue > 1e-3


def test_sample_is_reproducible_with_the_generator():
    probs = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(1)), -1)
    a = sample(probs, torch.Generator().manual_seed(9))
    b = sample(probs, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_sample_draws_what_torch_multinomial_draws():
    """sample() is torch.multinomial's one-sample path without its per-call checks (and their device
    sync): the same tokens from the same generator state, so batch-1 outputs stay what they were."""
    from decode.sampling import sample

    probs = torch.softmax(torch.randn(17, 320, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    probs[3] = 0.0
    probs[3, 7] = 1.0  # a one-hot (forced) row
    ours, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(50):
        assert torch.equal(sample(probs, ours), torch.multinomial(probs, 1, generator=ref).squeeze(-1))
    assert torch.equal(torch.rand(3, generator=ours), torch.rand(3, generator=ref))  # same draws consumed


def unfused_final_probs(logits: torch.Tensor, positions: list[int], sampling: SamplingConfig) -> torch.Tensor:
    """The pipeline of the module docstring step by step on whole rows (guide, constrain, temperature,
    top-k, top-p, softmax, forced rows one-hot): what final_probs must equal bit for bit."""
    from decode.sampling import constrain, guide, top_k_filter, top_p_filter

    forced = LAYOUT.forced_ids(torch.tensor(positions))
    x = constrain(guide(logits, sampling.cfg_scale), forced, LAYOUT)
    x = top_p_filter(top_k_filter(x / sampling.temperature, sampling.top_k), sampling.top_p)
    probs = torch.softmax(x, dim=-1)
    for row, fid in enumerate(forced.tolist()):
        if fid >= 0:
            probs[row] = 0.0
            probs[row, fid] = 1.0
    return probs


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(cfg_scale=1.0, temperature=0.7),
                                      SamplingConfig(cfg_scale=4.0, top_k=3), SamplingConfig(top_p=0.8)])
@pytest.mark.parametrize("n_streams", [1, 2])
def test_final_probs_equals_the_unfused_pipeline_bit_for_bit(sampling, n_streams):
    """Guidance on the code columns only and forced rows looked up per window change no bit of p."""
    for start, stop in ((0, 8), (1, 5), (2, 4), (3, 4), (5, 8)):
        logits = rand_logits(n_streams, stop - start, seed=start) * 3
        for positions in (range(start, stop), torch.arange(start, stop)):
            got = final_probs(logits, positions, LAYOUT, sampling)
            assert torch.equal(got, unfused_final_probs(logits, list(range(start, stop)), sampling)), (start, stop)
